"""Sub-MoE: training-free merging of the experts of a mixture of experts.

Li et al., `Sub-MoE: Efficient Mixture-of-Expert LLMs Compression via Subspace
Expert Merging <https://arxiv.org/abs/2506.23266>`_, 2025. ``E`` experts
become ``G`` in three steps:

1. **Grouping.** Spherical k-means (:func:`~subspace_optax.merging.kmeans`,
   cosine distance) on each expert's outputs over calibration tokens.
2. **Shared basis.** Each group's weights (gate, up and down separately) are
   stacked along the input axis and factored by one joint SVD.
3. **Merging.** The expert-specific factors are averaged with weights
   proportional to each expert's routing frequency, then truncated to a rank.

The router is remapped by :func:`remap_logits` (see there for the choice).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from subspace_optax._src.merging import kmeans as kmeans_lib
from subspace_optax._src.merging import whitening

Rank = int | Mapping[str, int | None] | None


class MergeResult(NamedTuple):
  """What :func:`sub_moe` returns (``E`` experts merged into ``G``).

  Attributes:
    experts: the merged weights, ``{name: (G, m, n)}``, same names as given.
    groups: ``(E,)`` int32, the group of each original expert.
    router_remap: ``(G, E)`` 0/1 membership, ``router_remap[g, i] = 1`` iff
      expert ``i`` is in group ``g``; :func:`remap_logits` turns the original
      router's ``E`` logits into ``G`` group logits with it.
    weights: ``(G, E)`` merge weights, ``f_i / sum_{j in g} f_j`` for the
      members of each group and 0 elsewhere (rows sum to 1).
  """

  experts: dict[str, jax.Array]
  groups: jax.Array
  router_remap: jax.Array
  weights: jax.Array


def remap_logits(logits: jax.Array, router_remap: jax.Array) -> jax.Array:
  """Group router logits: ``log`` of the summed softmax mass of each group.

  .. math::
    \\ell'_g = \\log \\sum_{i \\in g} e^{\\ell_i},\\qquad
    softmax(\\ell')_g = \\sum_{i \\in g} softmax(\\ell)_i.

  The original router is kept (``d × E``, a negligible cost) and the merged
  expert ``g`` receives exactly the probability mass its members received,
  whatever the calibration frequencies. The paper leaves the router remap
  unspecified. The alternative, a drop-in ``(d, G)`` router that averages the
  group's columns with the merge weights (``kernel @ result.weights.T``),
  ties with this one on ``examples/moe.py`` (byte-level top-2 MoE, 2 layers
  of 8 experts, validation loss, median of seeds 0-2,
  ``benchmarks/results/sub_moe_cpu.json``):

  ======================  =============  =============
  merge (8→6 / 8→4)       log-sum-exp    linear
  ======================  =============  =============
  average                 2.406 / 2.651  2.395 / 2.668
  freq. average           2.381 / 2.585  2.382 / 2.590
  Sub-MoE, rank 32        2.476 / 2.675  2.469 / 2.678
  ======================  =============  =============

  (full model 2.199). The differences (≤ 0.02 nats) are below the spread over
  seeds (≈ 0.05); log-sum-exp is kept for its exactness.

  Args:
    logits: ``(..., E)`` router logits of the original model.
    router_remap: ``(G, E)`` membership, :attr:`MergeResult.router_remap`.

  Returns:
    ``(..., G)`` logits of the merged model's router (float32 or wider).

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> import subspace_optax as so
    >>> logits = jnp.array([1.0, 2.0, 0.5])
    >>> remap = jnp.array([[1., 0., 1.], [0., 1., 0.]])  # groups {0, 2}, {1}
    >>> grouped = so.merging.remap_logits(logits, remap)
    >>> p = jax.nn.softmax(logits)
    >>> expected = jnp.array([p[0] + p[2], p[1]])
    >>> bool(jnp.allclose(jax.nn.softmax(grouped), expected))
    True
  """
  logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
  return jax.nn.logsumexp(
      logits[..., None, :], axis=-1, b=router_remap.astype(logits.dtype))


@functools.partial(jax.jit, static_argnames='rank')
def merge_group(
    weights: jax.Array, frequencies: jax.Array, rank: int | None = None,
    cholesky: jax.Array | None = None,
) -> jax.Array:
  """One group's merged ``(m, n)`` matrix from its ``(k, m, n)`` experts.

  In this library's convention ``y = x @ W`` with ``W_i`` of shape
  ``(m, n) = (in, out)`` (the transpose of the paper's ``d_out × d_in``
  weights), stacking along the input axis and one SVD give

  .. math::
    \\begin{bmatrix} W_1 \\\\ \\vdots \\\\ W_k \\end{bmatrix}
    = V Σ Uᵀ,\\quad V = \\begin{bmatrix} V_1 \\\\ \\vdots \\\\ V_k
    \\end{bmatrix},\\quad W_i = V_i Σ Uᵀ,

  so the output-side basis ``U`` (``n × q``) is shared and ``V_i`` (``m × q``)
  is expert-specific (paper: ``W_i = U Σ V_iᵀ``). With ``w_i = f_i / Σ f_j``
  the merged matrix is

  .. math::
    W = \\Big(\\sum_i w_i V_i\\Big)_{:, :r} Σ_r U_rᵀ
      = \\Big(\\sum_i w_i W_i\\Big) U_r U_rᵀ.

  Untruncated (``r = q``) it is the frequency-weighted average of the
  experts; truncated, it is that average projected on the group's top-``r``
  joint output subspace, and ``||W - Σ_i w_i W_i||_F² ≤ Σ_{j>r} σ_j²``.
  A zero matrix with frequency 0 is padding: it changes neither ``U``, ``Σ``
  nor ``W`` (:func:`sub_moe` pads groups to one size to batch them).

  **Activation whitening** (``cholesky``; SVD-LLM, Wang et al. 2024,
  arXiv:2403.07378, as proposed by Sub-MoE): with expert ``i``'s calibration
  inputs ``X_i`` (``N x m``) and ``X_iᵀX_i = S_i S_iᵀ`` (Cholesky, lower),
  ``X_i S_i^{-ᵀ}`` has orthonormal columns, so
  ``||X_i (W' - W_i)||_F = ||S_iᵀ (W' - W_i)||_F``. The joint SVD is taken of
  the whitened stack ``[S_1ᵀW_1; …; S_kᵀW_k] = V Σ Uᵀ``, truncated, and
  multiplied back: ``W = Σ_i w_i S_i^{-ᵀ} V_{i,:r} Σ_r U_rᵀ``
  (``= (Σ_i w_i W_i) U_r U_rᵀ``). Untruncated it is still the weighted
  average; truncated, ``U_r`` minimises the calibration error
  ``Σ_i ||X_i W_i (I - U_rU_rᵀ)||_F²`` over rank-``r`` output bases (Eckart–
  Young on the whitened stack) instead of ``Σ_i ||W_i (I - U_rU_rᵀ)||_F²``.

  Args:
    weights: ``(k, m, n)`` the experts of the group.
    frequencies: ``(k,)`` positive routing frequencies (any scale).
    rank: ``r``; ``None`` or at least ``min(k m, n)`` keeps every direction.
    cholesky: optional ``(k, m, m)`` lower Cholesky factors ``S_i`` of each
      expert's input covariance
      (:func:`~subspace_optax.merging.input_cholesky`); None: no whitening.

  Returns:
    The merged ``(m, n)`` matrix, in the dtype of ``weights``.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> import subspace_optax as so
    >>> w = jax.random.normal(jax.random.key(0), (3, 4, 6))
    >>> f = jnp.array([1., 2., 1.])
    >>> average = jnp.einsum('k,kmn->mn', f / f.sum(), w)
    >>> bool(jnp.allclose(so.merging.merge_group(w, f), average, atol=1e-5))
    True
    >>> int(jnp.linalg.matrix_rank(so.merging.merge_group(w, f, rank=2)))
    2
  """
  k, m, n = weights.shape
  compute = jnp.promote_types(weights.dtype, jnp.float32)
  mm = functools.partial(jnp.einsum, precision=jax.lax.Precision.HIGHEST)
  weights_c = weights.astype(compute)
  if cholesky is not None:  # S_iᵀ W_i
    weights_c = mm('kam,kan->kmn', cholesky.astype(compute), weights_c)
  v, s, ut = jnp.linalg.svd(weights_c.reshape(k * m, n), full_matrices=False)
  r = s.shape[0] if rank is None else min(rank, s.shape[0])
  w = frequencies.astype(compute) / jnp.sum(frequencies.astype(compute))
  v = v[:, :r].reshape(k, m, r) * s[:r]
  if cholesky is not None:  # multiplied back: S_i^{-ᵀ} V_i Σ
    v = jax.vmap(lambda c, x: jax.scipy.linalg.solve_triangular(
        c, x, lower=True, trans='T'))(cholesky.astype(compute), v)
  return mm('mr,rn->mn', mm('k,kmr->mr', w, v), ut[:r]).astype(weights.dtype)


def group_experts(
    expert_outputs: jax.Array, num_groups: int, key: jax.Array, *,
    restarts: int = 10) -> jax.Array:
  """``(E,)`` groups: cosine k-means on each expert's flattened outputs.

  Sub-MoE's adaptive expert clustering: experts whose outputs on the same
  calibration tokens point the same way (cosine similarity) share a group.
  The ``E`` unit-norm points ``P`` (``E × N d``) are replaced by the ``E × E``
  coordinates ``Rᵀ`` of ``Pᵀ = Q R``: inner products, hence cosine k-means,
  are unchanged (centroids are means, so they stay in the span), and each
  k-means step costs ``O(E² k)`` instead of ``O(E N d k)``.

  Args:
    expert_outputs: ``(E, N, d)`` each expert's outputs on ``N`` tokens.
    num_groups: ``k``, between 1 and ``E``.
    key: the k-means key.
    restarts: k-means restarts; the lowest inertia is kept.

  Returns:
    ``(E,)`` int32 group indices; every group is non-empty.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> import subspace_optax as so
    >>> a, b = jnp.ones((5, 2)), jnp.arange(10.).reshape(5, 2) - 4.5
    >>> outputs = jnp.stack([a, 2 * a, b, 3 * b])
    >>> g = so.merging.group_experts(outputs, 2, jax.random.key(0)).tolist()
    >>> g[0] == g[1] != g[2] == g[3]
    True
  """
  points = expert_outputs.reshape(expert_outputs.shape[0], -1)
  points = points.astype(jnp.promote_types(points.dtype, jnp.float32))
  points = points / jnp.linalg.norm(points, axis=1, keepdims=True)
  if points.shape[1] > points.shape[0]:
    points = jnp.linalg.qr(points.T)[1].T
  return kmeans_lib.kmeans(
      points, num_groups, key, metric='cosine', restarts=restarts).assignments


def _finite(name: str, x) -> None:
  bad = ~np.isfinite(np.asarray(x, np.float64))
  if bad.any():
    where = np.argwhere(bad)[0].tolist()
    raise ValueError(
        f'{name} holds {int(bad.sum())} non-finite value(s) (NaN or inf), the '
        f'first at index {where}; merge a model (and calibration outputs) '
        'with finite values only.')


def _ranks(experts: Mapping[str, jax.Array], rank: Rank) -> dict:
  ranks = dict(rank) if isinstance(rank, Mapping) else {
      name: rank for name in experts}
  unknown = sorted(set(ranks) - set(experts))
  if unknown:
    raise ValueError(f'rank names {unknown} are not experts {sorted(experts)}.')
  for name, value in experts.items():
    r = ranks.setdefault(name, None)
    if r is None:
      continue
    if isinstance(r, bool) or not isinstance(r, (int, np.integer)) or r < 1:
      raise ValueError(f'rank for {name!r} must be a positive int or None, '
                       f'got {r!r}.')
    if r > value.shape[2]:
      raise ValueError(
          f'rank={r} for {name!r} exceeds its output size n={value.shape[2]} '
          f'(expert matrices (m, n)={tuple(value.shape[1:])}): the shared '
          f'basis has at most n columns. Use rank <= {value.shape[2]} or '
          'None (no truncation).')
  return ranks


def _validate(experts, expert_outputs, frequencies, num_groups, groups):
  """Checks shapes and values; returns the number of experts ``E``."""
  if not experts:
    raise ValueError('experts is empty: pass {name: (E, m, n) array}.')
  shapes = {name: tuple(jnp.shape(w)) for name, w in experts.items()}
  for name, shape in shapes.items():
    if len(shape) != 3:
      raise ValueError(f'experts[{name!r}] must be (E, m, n), got {shape}.')
  counts = {shape[0] for shape in shapes.values()}
  if len(counts) != 1:
    raise ValueError(
        f'The expert weights disagree on the number of experts E: {shapes}.')
  e = counts.pop()
  if {'gate', 'up', 'down'} <= set(shapes):
    gate, up, down = shapes['gate'], shapes['up'], shapes['down']
    if gate != up or down[1:] != gate[:0:-1]:
      raise ValueError(
          "SwiGLU experts need gate and up of shape (E, d, f) and down of "
          f"shape (E, f, d); got gate {gate}, up {up}, down {down}.")
  out_shape = tuple(jnp.shape(expert_outputs))
  if len(out_shape) < 2 or out_shape[0] != e:
    raise ValueError(
        f'expert_outputs must be (E, N, d) with E={e} experts, got '
        f'{out_shape}.')
  if tuple(jnp.shape(frequencies)) != (e,):
    raise ValueError(f'frequencies must have shape ({e},), got '
                     f'{tuple(jnp.shape(frequencies))}.')
  if isinstance(num_groups, bool) or not isinstance(
      num_groups, (int, np.integer)) or not 1 <= num_groups <= e:
    raise ValueError(
        f'num_groups must be an int between 1 and the number of experts '
        f'E={e}, got {num_groups!r}.')
  for name, w in experts.items():
    _finite(f'experts[{name!r}]', w)
  _finite('expert_outputs', expert_outputs)
  _finite('frequencies', frequencies)
  f = np.asarray(frequencies, np.float64)
  if (f < 0).any():
    raise ValueError(f'frequencies must be >= 0, got {f.tolist()}.')
  unused = np.flatnonzero(f == 0).tolist()
  if unused:
    raise ValueError(
        f'Expert(s) {unused} were never routed to in the calibration set '
        '(frequency 0), so their merge weight would be 0 and their outputs '
        'say nothing about how the model uses them. Use a larger or more '
        'varied calibration set, or prune these experts first (drop them '
        'from experts, expert_outputs, frequencies and the router columns).')
  if groups is not None:
    g = np.asarray(groups)
    if g.shape != (e,) or g.min() < 0 or g.max() >= num_groups or len(
        np.unique(g)) != num_groups:
      raise ValueError(
          f'groups must be (E,)=({e},) ints covering every group 0..'
          f'{num_groups - 1}, got {g.tolist()}.')
  return e


def sub_moe(
    experts: Mapping[str, jax.Array],
    expert_outputs: jax.Array,
    frequencies: jax.Array,
    num_groups: int,
    rank: Rank = None,
    key: jax.Array | None = None,
    *,
    groups: jax.Array | None = None,
    restarts: int = 10,
    whiten: Mapping[str, jax.Array] | None = None,
) -> MergeResult:
  """Merges ``E`` experts into ``num_groups`` by Sub-MoE (training-free).

  Li et al., `Sub-MoE <https://arxiv.org/abs/2506.23266>`_, 2025. Experts are
  grouped by spherical k-means on their calibration outputs (``groups`` skips
  this), then each group's weights, one name at a time, are merged by a joint
  SVD with the frequency weights ``w_i = f_i / Σ_{j ∈ g} f_j``
  (:func:`merge_group`; ``x @ W`` convention, ``W_i`` of shape ``(m, n)``):

  .. math::
    [W_1; …; W_k] = V Σ Uᵀ,\\qquad
    W_g = \\Big(\\sum_{i \\in g} w_i V_i\\Big)_{:, :r} Σ_r U_rᵀ
        = \\Big(\\sum_{i \\in g} w_i W_i\\Big) U_r U_rᵀ.

  Without truncation this is the frequency-weighted average of the group; the
  rank ``r`` is where it differs. ``whiten`` gives the paper's
  activation-whitened variant (SVD-LLM style, see :func:`merge_group`): the
  truncation then keeps the output directions that matter on the calibration
  inputs. The paper's second, intra-expert low-rank step is not implemented.
  Run this outside ``jit`` (inputs are validated on host).

  Args:
    experts: ``{name: (E, m, n)}``, e.g. ``{'gate', 'up', 'down'}`` of SwiGLU
      experts (gate/up ``(E, d, f)``, down ``(E, f, d)``).
    expert_outputs: ``(E, N, d)`` each expert's output on the same ``N``
      calibration tokens (whether or not the router picked it).
    frequencies: ``(E,)`` how often each expert was routed to (counts or
      fractions); every entry must be positive.
    num_groups: ``G``, between 1 and ``E``.
    rank: ``r`` for every name, a ``{name: r}`` mapping, or ``None`` (no
      truncation); at most the output size ``n`` of each weight.
    key: the k-means key (default ``jax.random.key(0)``).
    groups: optional ``(E,)`` group indices to use instead of k-means.
    restarts: k-means restarts; the lowest inertia is kept.
    whiten: optional ``{name: inputs}``: the calibration inputs of the named
      weights, ``(N, m)`` shared by every expert (e.g. the tokens reaching
      ``gate`` and ``up``) or ``(E, N, m)`` one set per expert (e.g. each
      expert's intermediate activations, the inputs of ``down``); those
      weights are merged with the whitened SVD
      (:func:`~subspace_optax.merging.input_cholesky`, :func:`merge_group`).
      Names left out are not whitened.

  Returns:
    A :class:`MergeResult`; route with :func:`remap_logits`.

  Raises:
    ValueError: mismatched shapes, ``num_groups`` outside ``[1, E]``, a rank
      above a matrix's output size, non-finite inputs, an expert with routing
      frequency 0, or ``whiten`` inputs of the wrong shape.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> import subspace_optax as so
    >>> experts = {'up': jax.random.normal(jax.random.key(0), (4, 3, 5))}
    >>> outputs = jnp.repeat(experts['up'][:, None, 0], 2, axis=1)
    >>> freq = jnp.array([1., 3., 1., 1.])
    >>> result = so.merging.sub_moe(experts, outputs, freq, num_groups=4)
    >>> bool(jnp.allclose(result.experts['up'][result.groups],
    ...                   experts['up'], atol=1e-5))
    True
  """
  e = _validate(experts, expert_outputs, frequencies, num_groups, groups)
  ranks = _ranks(experts, rank)
  factors = whitening.cholesky_factors(experts, whiten or {}, e)
  if groups is None:
    key = jax.random.key(0) if key is None else key
    groups = group_experts(
        jnp.asarray(expert_outputs), num_groups, key, restarts=restarts)
  groups = np.asarray(groups).astype(np.int32)
  frequencies = jnp.asarray(frequencies, jnp.float32)
  membership = np.zeros((num_groups, e), np.float32)
  membership[groups, np.arange(e)] = 1.0
  # Pad every group to the largest with zero experts of frequency 0, so the
  # groups are merged by one batched SVD (one compilation per shape).
  size = int(np.bincount(groups, minlength=num_groups).max())
  index = np.zeros((num_groups, size), np.int32)
  mask = np.zeros((num_groups, size), np.float32)
  for g in range(num_groups):
    members = np.flatnonzero(groups == g)
    index[g, :len(members)], mask[g, :len(members)] = members, 1.0
  merge = jax.vmap(merge_group, in_axes=(0, 0, None, 0))
  merged = {
      name: merge(jnp.asarray(w)[index] * mask[..., None, None].astype(
          jnp.asarray(w).dtype), frequencies[index] * mask, ranks[name],
                  None if name not in factors else factors[name][index])
      for name, w in experts.items()}
  weights = membership * frequencies[None, :]
  weights = weights / weights.sum(1, keepdims=True)
  return MergeResult(
      merged, jnp.asarray(groups), jnp.asarray(membership), weights)
