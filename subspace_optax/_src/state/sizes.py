"""Optimizer-state memory: measured bytes and the analytic size per method.

:func:`state_bytes` measures any optimizer state. The ``*_bytes`` functions
give the exact size each method's state must have (the tests compare the two),
so a user can size a run before building it. The low-rank ones share one
per-leaf sum, :func:`low_rank_bytes`: per projected ``m x n`` matrix the basis
spans ``k`` (``projected_dim``) and the coefficients keep ``l``
(``other_dim``), with rank ``r`` clamped to ``min(m, n)``.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional

import jax
import numpy as np

from subspace_optax._src.pipeline import layout as layout_lib
from subspace_optax._src.transforms import quantized_moments

INT32 = 4
FLOAT32 = 4
# The refresh schedule of :func:`subspace_optax.refresh.every`: two int32.
EVERY_SCHEDULE = 2 * INT32


def _leaf_bytes(x) -> int:
  if isinstance(x, jax.Array) and jax.dtypes.issubdtype(
      x.dtype, jax.dtypes.prng_key):
    return int(x.size * np.dtype(np.uint32).itemsize * 2)
  if hasattr(x, 'shape') and hasattr(x, 'dtype'):
    return int(math.prod(x.shape) * np.dtype(x.dtype).itemsize)
  if isinstance(x, (int, float, bool, np.number)):
    return int(np.asarray(x).nbytes)
  return 0


def state_bytes(opt_state: Any) -> int:
  """Bytes held by every array leaf of an optimizer state.

  Works on concrete states, on ``jax.eval_shape`` outputs (ShapeDtypeStruct)
  and inside flax ``nnx.Optimizer`` states (Variables are unwrapped).

  Args:
    opt_state: any optimizer state (or pytree of arrays).

  Returns:
    The total bytes, an int.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import subspace_optax as so
    >>> params = {'w': jnp.ones((8, 6))}
    >>> so.state_bytes(optax.adam(1e-3).init(params))  # 2 moments + a count
    388
  """
  return sum(_leaf_bytes(x) for x in jax.tree.leaves(opt_state))


def low_rank_bytes(
    params: Any,
    rank: int | float,
    side: str,
    dimension_numbers: Any,
    per_matrix: Callable[[layout_lib.MatrixLayout], int],
    *,
    per_projected_leaf: int | Callable[[layout_lib.MatrixLayout], int] = (
        EVERY_SCHEDULE),
    per_other_element: int = 2 * FLOAT32,
    other_leaf: Optional[Callable[[tuple[int, ...]], int]] = None,
    fixed: int = 2 * INT32,
) -> int:
  """The state size of a :func:`subspace_optax.low_rank` method.

  Args:
    params: the parameters (arrays or ``jax.ShapeDtypeStruct``).
    rank, side, dimension_numbers: as given to the method.
    per_matrix: bytes per projected matrix (each layer of a stacked leaf).
    per_projected_leaf: bytes per projected leaf (its refresh schedule), or a
      function of its layout (state kept per leaf, not per matrix).
    per_other_element: bytes per element of a leaf that is not projected (the
      inner optimizer at full size; Adam: two float32 moments).
    other_leaf: bytes of a leaf that is not projected, from its shape, where
      they are not proportional to its size (replaces ``per_other_element``).
    fixed: bytes once per state (step counts).
  """
  total = fixed
  for p, lay in zip(
      jax.tree.leaves(params),
      layout_lib.flat_layouts(params, dimension_numbers, side, rank)):
    if lay is None:
      total += (other_leaf(np.shape(p)) if other_leaf is not None
                else per_other_element * math.prod(np.shape(p)))
    else:
      total += lay.num_matrices * per_matrix(lay) + (
          per_projected_leaf(lay) if callable(per_projected_leaf)
          else per_projected_leaf)
  return total


def galore_bytes(
    params: Any,
    rank: int | float,
    *,
    side: str = 'reference',
    dimension_numbers: Any = None,
    moment_bytes: int = 4,
    basis_bytes: int = 4,
    mu_bytes: Optional[int] = None,
) -> int:
  """Analytic state size of :func:`subspace_optax.galore` (Adam inner).

  Per projected matrix: the basis ``k r`` plus two moments ``2 r l`` (compact
  side: ``k = max(m, n)``, so ``2 r min(m, n) + r max(m, n)``; reference side
  ``2 r max + r min``), plus the refresh schedule (two int32 per projected
  leaf). Every other leaf keeps full Adam moments ``2 |p|``. Plus the step
  counters (Adam's and the pipeline's, int32). Also the size of
  :func:`subspace_optax.golore` and :func:`subspace_optax.i3s`.

  Bytes per entry: ``basis_bytes`` for the basis (2 with
  ``basis_dtype=jnp.bfloat16``), ``mu_bytes`` for the first moment (2 with
  ``mu_dtype=jnp.bfloat16``; None: ``moment_bytes``) and ``moment_bytes`` for
  the second.

  Args:
    params: the parameters (arrays or ``jax.ShapeDtypeStruct``).
    rank, side, dimension_numbers: as given to the method.
    moment_bytes: bytes per entry of the second moment (and of the first when
      ``mu_bytes`` is None).
    basis_bytes: bytes per entry of the basis.
    mu_bytes: bytes per entry of the first moment; None: ``moment_bytes``.

  Returns:
    The bytes of the state, an int.

  Examples:
    >>> import jax.numpy as jnp
    >>> import subspace_optax as so
    >>> params = {'w': jnp.ones((8, 6))}  # r = 2: basis 6·2, moments 2·2·8
    >>> so.state_sizes.galore_bytes(params, rank=2) == 4 * (12 + 32) + 8 + 8
    True
  """
  moments = moment_bytes + (moment_bytes if mu_bytes is None else mu_bytes)
  return low_rank_bytes(
      params, rank, side, dimension_numbers,
      lambda lay: (basis_bytes * lay.projected_dim * lay.rank
                   + moments * lay.rank * lay.other_dim),
      per_other_element=moments)


def q_galore_bytes(
    params: Any,
    rank: int | float = 128,
    *,
    bits: int = 4,
    group_size: int = 256,
    window: int = 5,
    side: str = 'reference',
    dimension_numbers: Any = None,
    eight_bit_moments: bool = True,
    mu_bytes: int = FLOAT32,
) -> int:
  """Analytic state size of :func:`subspace_optax.q_galore`.

  Per projected matrix (``k x r`` basis, ``r x l`` coefficients): basis codes
  ``k r`` bytes (8 bits) or ``k ceil(r/2)`` (4 bits), a float32 scale and a
  uint8 zero point per group (``5 ceil(k/g) r`` bytes). Per projected leaf the
  lazy schedule: four int32 and ``window`` float32. Two Adam moments per leaf,
  of the coefficients' shape (projected) or the leaf's (not projected): ``4 s``
  bytes for ``s`` entries in float32; with ``eight_bit_moments``, a moment of
  at least 4096 entries takes ``s + 4 s / b`` (codes and one float32 scale per
  block of ``b``, :func:`subspace_optax.quantize_moments`). Plus the
  pipeline's and Adam's step counts. ``mu_bytes`` is the bytes per entry of a
  first moment stored unquantized (2 for ``mu_dtype=jnp.bfloat16``).

  Args:
    params: the parameters (arrays or ``jax.ShapeDtypeStruct``).
    rank, side, dimension_numbers: as given to the method.
    bits, group_size, window, eight_bit_moments: as given to
      :func:`subspace_optax.q_galore`.
    mu_bytes: bytes per entry of an unquantized first moment.

  Returns:
    The bytes of the state, an int (equal to
    :func:`subspace_optax.state_bytes` of ``init(params)``).

  Examples:
    >>> import jax.numpy as jnp
    >>> import subspace_optax as so
    >>> params = {'w': jnp.ones((8, 6)), 'b': jnp.ones(6)}
    >>> tx = so.q_galore(1e-3, rank=2, group_size=4)
    >>> so.state_sizes.q_galore_bytes(params, 2, group_size=4) == (
    ...     so.state_bytes(tx.init(params)))
    True
  """
  moment = (quantized_moments.moment_bytes if eight_bit_moments
            else lambda shape: FLOAT32 * math.prod(shape))

  def first_moment(shape):
    if eight_bit_moments and quantized_moments.moment_bytes(shape) != (
        FLOAT32 * math.prod(shape)):
      return moment(shape)  # quantized
    return mu_bytes * math.prod(shape)

  def moments(shape):
    return first_moment(shape) + moment(shape)

  def per_matrix(lay):  # the quantized basis
    k, r = lay.projected_dim, lay.rank
    codes = k * r if bits == 8 else k * (-(-r // 2))
    return codes + 5 * -(-k // group_size) * r

  return low_rank_bytes(
      params, rank, side, dimension_numbers, per_matrix,
      per_projected_leaf=lambda lay: (moments(lay.coefficient_shape)
                                      + 4 * INT32 + FLOAT32 * window),
      other_leaf=moments)


def online_subspace_descent_bytes(
    params: Any,
    rank: int | float,
    *,
    inner: str = 'adam',
    basis_optimizer: str = 'adam',
    lagged: bool = False,
    side: str = 'reference',
    dimension_numbers: Any = None,
    mu_bytes: int = FLOAT32,
) -> int:
  """Analytic state size of :func:`subspace_optax.online_subspace_descent`.

  Per projected matrix (basis on the ``k`` side, coefficients ``r x l``,
  float32): the basis ``k r``, the inner moments (Adam ``2 r l``, Lion
  ``r l``), the basis optimizer (AdamW: ``2 k r`` plus an int32 count; SGD:
  nothing), ``k r`` more with ``lagged``, and the refresh schedule (two int32
  per leaf). Every other leaf keeps full inner moments. Plus the pipeline's and
  the inner's counts. Constant learning rates assumed (a schedule adds one int32
  count per matrix for the basis optimizer). ``mu_bytes`` is the bytes per
  entry of the inner first moment (2 for ``mu_dtype=jnp.bfloat16``).

  Args:
    params: the parameters (arrays or ``jax.ShapeDtypeStruct``).
    rank, side, dimension_numbers: as given to the method.
    inner, basis_optimizer, lagged: as given to the method.
    mu_bytes: bytes per entry of the inner first moment.

  Returns:
    The bytes of the state, an int (equal to
    :func:`subspace_optax.state_bytes` of ``init(params)``).

  Examples:
    >>> import jax.numpy as jnp
    >>> import subspace_optax as so
    >>> params = {'w': jnp.ones((8, 6)), 'b': jnp.ones(6)}
    >>> tx = so.online_subspace_descent(1e-3, rank=2)
    >>> so.state_sizes.online_subspace_descent_bytes(params, 2) == (
    ...     so.state_bytes(tx.init(params)))
    True
  """
  moments = {'adam': mu_bytes + FLOAT32, 'lion': mu_bytes}[inner]

  def per_matrix(lay):
    basis = lay.projected_dim * lay.rank
    size = FLOAT32 * basis + moments * lay.rank * lay.other_dim
    if basis_optimizer == 'adam':
      size += 2 * FLOAT32 * basis + INT32
    if lagged:
      size += FLOAT32 * basis
    return size

  return low_rank_bytes(params, rank, side, dimension_numbers, per_matrix,
                         per_other_element=moments)


def dct_adamw_bytes(
    params: Any,
    rank: int | float,
    *,
    side: str = 'reference',
    dimension_numbers: Any = None,
    mu_bytes: int = FLOAT32,
) -> int:
  """Analytic state size of :func:`subspace_optax.dct_adamw` (float32 moments).

  Per projected matrix: two Adam moments ``2 r l`` and ``r`` int32 indices;
  the refresh schedule (two int32 per projected leaf); full Adam moments for
  every other leaf; the pipeline's and Adam's int32 counts. ``mu_bytes`` is
  the bytes per entry of the first moment (2 for ``mu_dtype=jnp.bfloat16``).

  Args:
    params: the parameters (arrays or ``jax.ShapeDtypeStruct``).
    rank, side, dimension_numbers: as given to the method.
    mu_bytes: bytes per entry of the first moment.

  Returns:
    The bytes of the state, an int (equal to
    :func:`subspace_optax.state_bytes` of ``init(params)``).

  Examples:
    >>> import jax.numpy as jnp
    >>> import subspace_optax as so
    >>> params = {'w': jnp.ones((8, 6)), 'b': jnp.ones(6)}
    >>> so.state_sizes.dct_adamw_bytes(params, 2) == so.state_bytes(
    ...     so.dct_adamw(1e-3, rank=2).init(params))
    True
  """
  moments = mu_bytes + FLOAT32
  return low_rank_bytes(
      params, rank, side, dimension_numbers,
      lambda lay: moments * lay.rank * lay.other_dim + INT32 * lay.rank,
      per_other_element=moments)


def adamp_bytes(params: Any, *, mu_bytes: int = FLOAT32) -> int:
  """Analytic state size of :func:`subspace_optax.adamp` (float32 params).

  Two moments per element (``mu_bytes`` per entry for the first, 2 for
  ``mu_dtype=jnp.bfloat16``; float32 for the second) and one int32 count.

  Args:
    params: the parameters (arrays or ``jax.ShapeDtypeStruct``).
    mu_bytes: bytes per entry of the first moment.

  Returns:
    The bytes of the state, an int (equal to
    :func:`subspace_optax.state_bytes` of ``init(params)``).

  Examples:
    >>> import jax.numpy as jnp
    >>> import subspace_optax as so
    >>> params = {'w': jnp.ones((8, 6)), 'b': jnp.ones(6)}
    >>> so.state_sizes.adamp_bytes(params) == so.state_bytes(
    ...     so.adamp(1e-3).init(params))
    True
  """
  return INT32 + (mu_bytes + FLOAT32) * sum(
      math.prod(np.shape(p)) for p in jax.tree.leaves(params))


def auon_bytes(params: Any, *, matrix_mask: Optional[Any] = None) -> int:
  """Analytic state size of :func:`subspace_optax.auon`.

  AuON leaves: one momentum ``|w|``; AdamW leaves: ``2|w|`` (in the leaf's
  dtype); plus AdamW's int32 count.

  Args:
    params: the parameters (arrays or ``jax.ShapeDtypeStruct``).
    matrix_mask: as given to :func:`subspace_optax.auon` (None: leaves of
      rank >= 2).

  Returns:
    The bytes of the state, an int (equal to
    :func:`subspace_optax.state_bytes` of ``init(params)``).

  Examples:
    >>> import jax.numpy as jnp
    >>> import subspace_optax as so
    >>> params = {'w': jnp.ones((8, 6)), 'b': jnp.ones(6)}
    >>> so.state_sizes.auon_bytes(params) == so.state_bytes(
    ...     so.auon(1e-3).init(params))
    True
  """
  leaves = jax.tree.leaves(params)
  if callable(matrix_mask):
    matrix_mask = matrix_mask(params)
  mask = (jax.tree.leaves(matrix_mask) if matrix_mask is not None
          else [np.ndim(p) >= 2 for p in leaves])
  return INT32 + sum(
      (1 if is_matrix else 2) * np.dtype(p.dtype).itemsize
      * math.prod(np.shape(p)) for p, is_matrix in zip(leaves, mask))
