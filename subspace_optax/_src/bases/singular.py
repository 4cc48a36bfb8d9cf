"""Singular-vector bases: the exact SVD (GaLore) and a randomized range finder.

Halko, Martinsson & Tropp, `Finding structure with randomness
<https://arxiv.org/abs/0909.4061>`_, 2011: a Gaussian sketch, power
iterations and a Rayleigh–Ritz step give the top-``r`` left singular vectors
in ``O(klr)`` matmuls, without an SVD of the ``k x l`` gradient.
"""
from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp

from subspace_optax._src.bases import base as bases_lib
from subspace_optax._src.pipeline import batching
from subspace_optax._src.pipeline import sharding

_HIGHEST = jax.lax.Precision.HIGHEST


# ---------------------------------------------------------------- dense bases


def _finish(new: jax.Array, old: jax.Array, align: bool) -> jax.Array:
  new = sharding.reshard_like(new.astype(jnp.float32), old)
  if align:
    new = bases_lib.align_signs(new, old)
  return new


def singular_vectors(
    g: jax.Array, algorithm: Optional[Any] = None) -> tuple[jax.Array, jax.Array]:
  """``(U, σ)`` of the thin SVD ``g = U diag(σ) Vᵀ``; ``algorithm`` is a
  ``jax.lax.linalg.SvdAlgorithm`` or None (JAX's default). Under ``jax.vmap``
  on CPU it loops over the batch (:func:`batching.loop_on_cpu`)."""

  @batching.loop_on_cpu
  def left(g):
    if algorithm is None:
      u, s, _ = jnp.linalg.svd(g, full_matrices=False)
    else:
      u, s, _ = jax.lax.linalg.svd(g, full_matrices=False, algorithm=algorithm)
    return u, s

  return left(g)


def svd(algorithm: Optional[Any] = None) -> bases_lib.BasisMethod:
  """Exact top-``rank`` left singular vectors of the gradient, in float32.

  This is GaLore's basis (Zhao et al., 2024, arXiv 2403.03507): ``Q = U[:, :r]``
  with ``G = U Σ Vᵀ``. Cost ``O(k l min(k, l))`` per refresh; on a sharded
  gradient the SVD gathers the whole matrix, deliberately: on a mesh each
  refresh all-gathers the ``k x l`` gradient and every device runs the same SVD
  (explicit ``reshard`` under an Explicit mesh; the compiler inserts the same
  gather on an Auto mesh). Use :func:`randomized` on sharded weights.

  Args:
    algorithm: optional ``jax.lax.linalg.SvdAlgorithm`` (e.g. ``POLAR`` is much
      faster on GPU); None uses JAX's default.

  Returns:
    A :class:`BasisMethod`, for ``basis=`` of :func:`subspace_optax.low_rank`
    and the presets.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import subspace_optax as so
    >>> tx = so.low_rank(optax.scale_by_adam(), rank=2,
    ...                  basis=so.bases.svd())
    >>> params = {'w': jnp.ones((8, 6))}
    >>> updates, state = tx.update(params, tx.init(params))
    >>> so.bases.svd().name
    'svd'
  """

  def refresh(g, old, key, align):
    del key
    g = sharding.replicate_matrix(g.astype(jnp.float32))  # the deliberate gather
    u, _ = singular_vectors(g, algorithm)
    return _finish(u[:, : old.shape[1]], old, align)

  return bases_lib.BasisMethod(
      'svd', bases_lib.dense_init, refresh, bases_lib.dense_project, bases_lib.dense_unproject,
      bases_lib.dense_transition,
  )


def randomized(oversample: int = 8, power_iterations: int = 1) -> bases_lib.BasisMethod:
  """Randomized range finder with power iterations and Rayleigh–Ritz.

  Halko, Martinsson & Tropp, `Finding structure with randomness
  <https://arxiv.org/abs/0909.4061>`_, 2011. With ``p = rank + oversample``:

  .. math::
    Y = G Ω,\\ Ω \\in R^{l×p};\\quad Q = orth(Y);\\quad
    Q \\leftarrow orth(G\\, orth(GᵀQ))\\ (power\\ iterations);\\quad
    B = QᵀG,\\ B Bᵀ = W Λ Wᵀ;\\quad basis = Q W_{:, :r}.

  Cost ``O(k l p)`` per refresh instead of an SVD's ``O(k l min(k, l))``; all
  factorisations are ``p x p``, so row-sharded gradients are never gathered.

  Args:
    oversample: extra sketch columns beyond the rank.
    power_iterations: subspace iterations sharpening the spectrum.

  Returns:
    A :class:`BasisMethod`, for ``basis=`` of :func:`subspace_optax.low_rank`
    and the presets.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import subspace_optax as so
    >>> tx = so.low_rank(optax.scale_by_adam(), rank=2,
    ...                  basis=so.bases.randomized())
    >>> params = {'w': jnp.ones((8, 6))}
    >>> updates, state = tx.update(params, tx.init(params))
    >>> so.bases.randomized().name
    'randomized'
  """
  if oversample < 0 or power_iterations < 0:
    raise ValueError('`oversample` and `power_iterations` must be >= 0.')

  def refresh(g, old, key, align):
    g = g.astype(jnp.float32)
    # The basis is scale invariant: each product of G is divided by its own
    # largest magnitude (a k x p or p x l matrix; max |G| would be a
    # reduction of the gradient, which XLA:CPU reads from a transposed copy
    # of it), so that the Gram matrices below neither overflow (|G| >~ 1e18)
    # nor underflow (|G| <~ 1e-18). A product itself overflows only for
    # |G| >~ 1e35.
    def times_g(spec, a, b):
      product = sharding.einsum(spec, a, b, precision=_HIGHEST)
      peak = jnp.max(jnp.abs(product))
      return product / jnp.where(peak > 0, peak, 1.0)

    k, l = g.shape
    rank = old.shape[1]
    p = min(rank + oversample, k, l)
    keys = jax.random.split(key, 2 * power_iterations + 2)
    sketch = bases_lib.normal_matrix(keys[0], (l, p))
    # Only the last orthonormalisation needs full precision (the final basis is
    # Q times an orthogonal matrix); the earlier ones only keep the span stable.
    last = lambda i: 2 if i == power_iterations else 1
    q = bases_lib.orthonormalize(
        times_g('kl,lp->kp', g, sketch), keys[1], last(0))
    for i in range(power_iterations):
      z = bases_lib.orthonormalize(
          times_g('kl,kp->lp', g, q), keys[2 + 2 * i], 1)
      q = bases_lib.orthonormalize(
          times_g('kl,lp->kp', g, z), keys[3 + 2 * i], last(i + 1))
    b = times_g('kp,kl->pl', q, g)
    # A NaN/Inf in G reaches every product; the eigensolver (iterative) sees
    # zeros instead, and the basis is NaN (handles_non_finite).
    finite = jnp.all(jnp.isfinite(b))
    gram = sharding.einsum('pl,ql->pq', b, b, precision=_HIGHEST)
    vectors = _eigenvectors(jnp.where(finite, gram, 0.0))
    top = jnp.where(finite, vectors[:, ::-1][:, :rank], jnp.nan)  # ascending
    return _finish(
        sharding.einsum('kp,pr->kr', q, top, precision=_HIGHEST), old, align)

  return bases_lib.BasisMethod(
      'randomized', bases_lib.dense_init, refresh, bases_lib.dense_project, bases_lib.dense_unproject,
      bases_lib.dense_transition, handles_non_finite=True,
  )


@batching.loop_on_cpu
def _eigenvectors(symmetric: jax.Array) -> jax.Array:
  return jnp.linalg.eigh(symmetric)[1]


