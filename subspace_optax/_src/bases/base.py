"""Basis methods: how the subspace of one gradient matrix is chosen and used.

Every method works on one *oriented* matrix ``g`` of shape ``(k, l)`` whose
first axis is the projected one (see :mod:`layout`); the combinator vmaps it
over stacked layers. A method is a :class:`BasisMethod` of pure functions:

* ``init(k, l, rank)`` -> the basis state of one matrix (arrays of static shape);
* ``refresh(g, state, key, align_signs)`` -> a new basis state from gradient ``g``;
* ``project(g, state)`` -> coefficients ``C`` of shape ``(rank, l)``;
* ``unproject(c, state)`` -> the ``(k, l)`` matrix that ``c`` stands for;
* ``transition(old, new)`` -> ``R`` (``rank x rank``) with ``C_new ~= R C_old``,
  used to carry moments into a new basis (None if the method cannot say);
* optionally ``init_from_weights(w, rank, path)`` -> the initial basis state
  built from the param itself (``w``: the oriented ``(*batch, k, l)`` view of
  the weight; the state has the batch axes), used by ``low_rank``'s init
  instead of ``init`` (e.g. :func:`~subspace_optax.bases.weight_singular`).

Dense bases store ``Q`` (``k x rank``, orthonormal columns, float32 unless
``low_rank(basis_dtype=...)`` stores them in another float dtype): ``C = QᵀG``
and ``unproject(C) = QC``.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

from subspace_optax._src import utils
from subspace_optax._src.pipeline import batching
from subspace_optax._src.pipeline import layout as layout_lib
from subspace_optax._src.pipeline import per_matrix
from subspace_optax._src.pipeline import sharding

_HIGHEST = jax.lax.Precision.HIGHEST


class BasisMethod(NamedTuple):
  """A way to choose, store and apply the basis of one oriented matrix."""

  name: str
  init: Callable[[int, int, int], Any]
  refresh: Callable[[jax.Array, Any, jax.Array, bool], Any]
  project: Callable[[jax.Array, Any], jax.Array]
  unproject: Callable[[jax.Array, Any], jax.Array]
  transition: Optional[Callable[[Any, Any], jax.Array]] = None
  # Refresh on every step without a ``lax.cond`` (online bases).
  every_step: bool = False
  # For ``every_step`` methods: the refresh used at update 0 instead of
  # ``refresh`` (an initial basis from the first gradient), chosen by one
  # unbatched ``lax.cond`` on the step count. Same signature as ``refresh``.
  first_refresh: Optional[Callable[[jax.Array, Any, jax.Array, bool], Any]] = None
  # ``(w, rank, path) -> state``: the initial state from the weight's oriented
  # ``(*batch, k, l)`` view (with the batch axes); ``init`` still gives the
  # shapes and dtypes of one matrix's state. None: ``init``.
  init_from_weights: Optional[Callable[[jax.Array, int, str], Any]] = None
  # The refresh takes a gradient with NaN/Inf entries as it is and returns a
  # non-finite state for it (its factorisations are of small matrices and
  # return on NaN/Inf: Cholesky, QR, or an eigensolver given a matrix it has
  # made finite). False: the stages give it the gradient with those entries
  # zeroed, a full-size copy, since LAPACK's SVD never returns on a matrix
  # mixing Inf and finite entries.
  handles_non_finite: bool = False


def initial_state(method: BasisMethod, param: Any, layout: Any) -> Any:
  """The basis state of one projected leaf, with its batch axes.

  ``method.init`` broadcast over the batch axes, or, for a method with
  ``init_from_weights``, the state built from the values of ``param`` (cast
  to the dtypes of ``method.init``, e.g. ``low_rank(basis_dtype=...)``).

  Raises:
    TypeError: ``init_from_weights`` needs values and ``param`` is a
      ``jax.ShapeDtypeStruct``.
    ValueError: its state does not have the shapes of ``init``'s.
  """
  k, l, r = layout.projected_dim, layout.other_dim, layout.rank
  batch = layout.batch_shape
  if method.init_from_weights is None:
    return jax.tree.map(lambda a: jnp.broadcast_to(a, batch + a.shape),
                        method.init(k, l, r))
  if isinstance(param, jax.ShapeDtypeStruct):
    raise TypeError(
        f'{layout.path}: the {method.name!r} basis is built from the values '
        'of the weights, but init got a jax.ShapeDtypeStruct. Call init on '
        'the (pre-trained) params, or trace it with jax.eval_shape/jax.jit.')
  template = jax.eval_shape(lambda: method.init(k, l, r))
  view = layout_lib.matrix_view(jnp.asarray(param), layout)
  state = method.init_from_weights(view, r, layout.path)

  def fit(a, t):
    if tuple(a.shape) != batch + tuple(t.shape):
      raise ValueError(
          f'{layout.path}: init_from_weights of the {method.name!r} basis '
          f'gave an array of shape {tuple(a.shape)}; expected '
          f'{batch + tuple(t.shape)} (the batch axes, then init\'s shape).')
    return a.astype(t.dtype)

  return jax.tree.map(fit, state, template)


# ---------------------------------------------------------------- dense bases


def normal_matrix(key: jax.Array, shape: tuple[int, int]) -> jax.Array:
  """A ``(k, p)`` float32 matrix of independent ``N(0, 1)`` entries.

  Column ``j`` is ``jax.random.normal(jax.random.fold_in(key, j), (k,))``.
  XLA:CPU runs threefry as a loop whose state is the whole draw: drawn at
  once, a ``4096 x 1024`` matrix compiles to three times its size in
  temporaries. On the CPU the columns are therefore drawn one at a time, each
  written in place into the matrix (no temporary of its size); elsewhere,
  where threefry is one fused kernel, all at once (``vmap``). The values are
  the same.

  Args:
    key: PRNG key.
    shape: ``(k, p)``.

  Returns:
    The ``(k, p)`` float32 matrix.
  """
  k, p = shape

  def column(j):
    return jax.random.normal(jax.random.fold_in(key, j), (k,), jnp.float32)

  def one_at_a_time(columns):
    return jax.lax.fori_loop(
        0, p, lambda j, y: y.at[:, j].set(column(columns[j])),
        jnp.zeros((k, p), jnp.float32))

  return per_matrix.on_platform(jnp.arange(p, dtype=jnp.uint32),
                                cpu=one_at_a_time,
                                gpu=jax.vmap(column, out_axes=1))


@utils.compiled('k', 'l', 'rank')
def dense_init(k: int, l: int, rank: int) -> jax.Array:
  """A valid orthonormal placeholder, ``I[:, :rank]``, until the first refresh."""
  del l
  return jnp.eye(k, rank, dtype=jnp.float32)


def _accumulation_dtype(basis: jax.Array):
  return jnp.promote_types(basis.dtype, jnp.float32)


def dense_project(g: jax.Array, basis: jax.Array) -> jax.Array:
  """``C = QᵀG`` with operands in the basis' dtype, accumulated in float32."""
  return sharding.einsum(
      'kr,kl->rl', basis, g.astype(basis.dtype),
      preferred_element_type=_accumulation_dtype(basis))


def dense_unproject(c: jax.Array, basis: jax.Array) -> jax.Array:
  """``QC`` with operands in the basis' dtype, accumulated in float32."""
  return sharding.einsum(
      'kr,rl->kl', basis, c.astype(basis.dtype),
      preferred_element_type=_accumulation_dtype(basis))


def dense_transition(old: jax.Array, new: jax.Array) -> jax.Array:
  """``R = Q_newᵀ Q_old``, so that ``Q_newᵀ G ~= R (Q_oldᵀ G)``."""
  return sharding.einsum('kr,ks->rs', new, old, precision=_HIGHEST)


@utils.compiled()
def align_signs(new: jax.Array, old: jax.Array) -> jax.Array:
  """Flip columns of ``new`` so each has a non-negative dot with ``old``'s.

  Singular vectors are defined up to sign; without this, moments kept across
  a refresh are silently negated column by column.

  Args:
    new: the new basis ``(..., k, r)``.
    old: the previous basis, same shape.

  Returns:
    ``new`` with each column negated where its dot with ``old``'s is
    negative.

  Examples:
    >>> import jax.numpy as jnp
    >>> import subspace_optax as so
    >>> so.bases.align_signs(-jnp.eye(2), jnp.eye(2))
    Array([[1., 0.],
           [0., 1.]], dtype=float32)
  """
  dots = jnp.sum(new * old, axis=0)
  return new * jnp.where(dots < 0, -1.0, 1.0).astype(new.dtype)


@utils.compiled('passes')
def orthonormalize(y: jax.Array, key: jax.Array, passes: int = 3) -> jax.Array:
  """Orthonormal basis of ``span(y)`` with only ``p x p`` factorisations.

  Shifted Cholesky-QR followed by two plain Cholesky-QR passes (Fukaya et al.,
  2020, `Shifted Cholesky QR for computing the QR factorization of
  ill-conditioned matrices <https://arxiv.org/abs/1809.11085>`_): every step
  forms the ``p x p`` Gram matrix ``YᵀY`` (one all-reduce when ``y``'s rows are
  sharded) and solves with its Cholesky factor, so a row-sharded ``y`` is never
  gathered. A tiny random component (1e-4 of ``y``'s RMS) is added first so a
  rank-deficient ``y`` (gradients of rank below ``p``) still gives ``p``
  orthonormal columns; those extra directions carry no gradient energy.

  ``passes=1`` (the shifted pass alone) gives a well-conditioned basis of the
  same span, enough between power iterations. With ``passes > 1`` the shifted
  pass is followed by a Householder QR of the ``k x p`` result, orthonormal to
  float32 precision: in float32 the shift is a sizeable fraction of the trace,
  so after it a sketch of a gradient with a decaying spectrum (``σ_j = 0.9^j``)
  is still too ill-conditioned for plain Cholesky-QR passes, which then break
  down. On a mesh that QR gathers the sketch (``k x p``, the size of the basis),
  never the gradient.

  Args:
    y: a ``(k, p)`` matrix (float32), ``p <= k``.
    key: PRNG key (fills columns of a rank-deficient ``y`` at random).
    passes: Cholesky-QR passes.

  Returns:
    A ``(k, p)`` matrix with orthonormal columns spanning ``y``'s range.

  Examples:
    >>> import jax
    >>> import jax.numpy as jnp
    >>> import subspace_optax as so
    >>> y = jax.random.normal(jax.random.key(0), (8, 3))
    >>> q = so.bases.orthonormalize(y, jax.random.key(1))
    >>> bool(jnp.allclose(q.T @ q, jnp.eye(3), atol=1e-5))
    True
  """
  k, p = y.shape
  y = y.astype(jnp.float32)
  rms = jnp.sqrt(jnp.mean(y * y))
  noise_scale = jnp.where(rms > 0, 1e-4 * rms, 1.0)
  y = y + noise_scale * sharding.reshard_like(normal_matrix(key, (k, p)), y)
  eye = jnp.eye(p, dtype=jnp.float32)
  unit_roundoff = jnp.finfo(jnp.float32).eps / 2
  gram = sharding.einsum('kp,kq->pq', y, y, precision=_HIGHEST)
  gram = gram + 11 * (k * p + p * (p + 1)) * unit_roundoff * jnp.trace(gram) * eye
  y = sharding.einsum('kp,pq->kq', y, inverse_cholesky_factor(gram),
                      precision=_HIGHEST)
  if passes > 1:
    y = sharding.reshard_like(_householder_q(sharding.replicate_matrix(y)), y)
  return y


@batching.loop_on_cpu
def inverse_cholesky_factor(gram: jax.Array) -> jax.Array:
  """``R⁻¹`` with ``gram = RᵀR`` (Cholesky), so that ``Y R⁻¹`` is orthonormal."""
  lower = jnp.linalg.cholesky(gram)
  eye = jnp.eye(gram.shape[-1], dtype=gram.dtype)
  return jax.scipy.linalg.solve_triangular(lower, eye, lower=True).T


@batching.loop_on_cpu
def _householder_q(y: jax.Array) -> jax.Array:
  return jnp.linalg.qr(y)[0]


