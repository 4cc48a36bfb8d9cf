"""Optimizer-state memory: measured bytes and the analytic size per method."""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np

from subspace_optax._src import layout as layout_lib


def _leaf_bytes(x) -> int:
  if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
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

  Example:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import subspace_optax as so
    >>> params = {'w': jnp.zeros((256, 128))}
    >>> so.state_bytes(optax.adam(1e-3).init(params))  # 2 moments + a counter
    262148
    >>> so.state_bytes(so.galore(1e-3, rank=32).init(params))  # a quarter
    65552
  """
  return sum(_leaf_bytes(x) for x in jax.tree.leaves(opt_state))


def galore_bytes(
    params: Any,
    rank: int | float,
    side: str = 'compact',
    dimension_numbers: Any = None,
    moment_bytes: int = 4,
    basis_bytes: int = 4,
) -> int:
  """Analytic state size of :func:`subspace_optax.galore` (Adam inner).

  Per projected ``m x n`` matrix with basis on the ``k`` side and ``l`` the
  other: basis ``k r`` plus two moments ``2 r l`` (compact side: ``k = max``,
  so ``2 r min(m, n) + r max(m, n)``; reference side ``2 r max + r min``), plus
  the refresh schedule (two int32 per projected leaf). Every other leaf keeps
  full Adam moments ``2 |p|``. Plus the step counters (Adam's and the
  pipeline's, int32).
  """
  layouts = layout_lib.leaf_layouts(params, dimension_numbers, side, rank)
  total = 2 * 4  # the pipeline's count and Adam's count
  for p, lay in zip(
      jax.tree.leaves(params),
      jax.tree.leaves(layouts, is_leaf=lambda x: x is None or isinstance(
          x, layout_lib.MatrixLayout))):
    if lay is None:
      total += 2 * moment_bytes * math.prod(np.shape(p))
      continue
    matrices = lay.num_matrices
    total += matrices * basis_bytes * lay.projected_dim * lay.rank
    total += matrices * 2 * moment_bytes * lay.rank * lay.other_dim
    total += 2 * 4
  return total
