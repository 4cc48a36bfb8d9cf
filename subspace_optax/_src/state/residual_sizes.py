"""Analytic state sizes of the methods with a residual path: FRUGAL, Fira, APOLLO.

The shared per-leaf sum and the byte sizes are in :mod:`sizes`.
"""

from __future__ import annotations

from typing import Any

import jax

from subspace_optax._src.state import sizes


def frugal_bytes(
    params: Any,
    rank: int | float = 0.25,
    *,
    basis: str = 'svd',
    side: str = 'reference',
    dimension_numbers: Any = None,
    mu_bytes: int = sizes.FLOAT32,
    basis_bytes: int = sizes.FLOAT32,
) -> int:
  """Analytic state size of :func:`subspace_optax.frugal` (float32 moments).

  Per projected matrix: two Adam moments ``2 · 4 r l`` bytes, plus the basis:
  ``4 k r`` (svd, random), ``4 r`` (columns: int32 indices) or ``4`` (blocks:
  one flag; the moments are then full size, ``r = k``). Per projected leaf the
  refresh schedule (two int32). Every other leaf keeps full Adam moments
  ``2 · 4 |p|``. Plus one int32 step count per leaf (the restartable bias
  correction) and the pipeline's count. The signSGD/SGD residual holds nothing.
  ``mu_bytes`` and ``basis_bytes`` are the bytes per entry of the first moment
  and of a dense basis (2 for ``mu_dtype`` and ``basis_dtype`` bfloat16).

  Args:
    params: the parameters (arrays or ``jax.ShapeDtypeStruct``).
    rank, side, dimension_numbers: as given to the method.
    basis: ``'svd'``, ``'random'``, ``'columns'`` or ``'blocks'`` (or the
      registry's ``'random_orthonormal'``, ``'random_columns'``).
    mu_bytes: bytes per entry of the first moment.
    basis_bytes: bytes per entry of a dense basis.

  Returns:
    The bytes of the state, an int (equal to
    :func:`subspace_optax.state_bytes` of ``init(params)``).

  Examples:
    >>> import jax.numpy as jnp
    >>> import subspace_optax as so
    >>> params = {'w': jnp.ones((8, 6)), 'b': jnp.ones(6)}
    >>> tx = so.frugal(1e-3, rank=0.5, basis='columns')
    >>> so.state_sizes.frugal_bytes(params, 0.5, basis='columns') == (
    ...     so.state_bytes(tx.init(params)))
    True
  """
  if basis == 'blocks':
    rank, side = 1.0, 'reference'
  basis_size = {
      'svd': lambda lay: basis_bytes * lay.projected_dim * lay.rank,
      'random': lambda lay: basis_bytes * lay.projected_dim * lay.rank,
      'random_orthonormal': lambda lay: (
          basis_bytes * lay.projected_dim * lay.rank),
      'columns': lambda lay: sizes.INT32 * lay.rank,
      'random_columns': lambda lay: sizes.INT32 * lay.rank,
      'blocks': lambda lay: sizes.INT32,
  }[basis]
  moments = mu_bytes + sizes.FLOAT32
  return sizes.low_rank_bytes(
      params, rank, side, dimension_numbers,
      lambda lay: moments * lay.rank * lay.other_dim + basis_size(lay),
      per_other_element=moments,
      fixed=sizes.INT32 + sizes.INT32 * len(jax.tree.leaves(params)))


def fira_bytes(
    params: Any,
    rank: int | float = 128,
    *,
    side: str = 'reference',
    limiter: bool = True,
    dimension_numbers: Any = None,
    mu_bytes: int = sizes.FLOAT32,
    basis_bytes: int = sizes.FLOAT32,
) -> int:
  """Analytic state size of :func:`subspace_optax.fira` (float32, SVD basis).

  GaLore's state (per projected matrix: basis ``4 k r`` and two moments
  ``2 · 4 r l`` bytes; per projected leaf the refresh schedule, two int32) plus
  the limiter's previous norm (one float32 per matrix). Other leaves keep full
  Adam moments ``2 · 4 |p|``. Plus the pipeline's and the bias correction's
  step counts (int32). ``mu_bytes`` and ``basis_bytes`` are the bytes per
  entry of the first moment and the basis (2 for ``mu_dtype`` and
  ``basis_dtype`` bfloat16).

  Args:
    params: the parameters (arrays or ``jax.ShapeDtypeStruct``).
    rank, side, dimension_numbers: as given to the method.
    limiter: whether the norm-growth limiter is on.
    mu_bytes: bytes per entry of the first moment.
    basis_bytes: bytes per entry of the basis.

  Returns:
    The bytes of the state, an int (equal to
    :func:`subspace_optax.state_bytes` of ``init(params)``).

  Examples:
    >>> import jax.numpy as jnp
    >>> import subspace_optax as so
    >>> params = {'w': jnp.ones((8, 6)), 'b': jnp.ones(6)}
    >>> so.state_sizes.fira_bytes(params, 2) == so.state_bytes(
    ...     so.fira(1e-3, rank=2).init(params))
    True
  """
  limiter_bytes = sizes.FLOAT32 if limiter else 0
  moments = mu_bytes + sizes.FLOAT32
  return sizes.low_rank_bytes(
      params, rank, side, dimension_numbers,
      lambda lay: (basis_bytes * lay.projected_dim * lay.rank
                   + moments * lay.rank * lay.other_dim + limiter_bytes),
      per_other_element=moments)


def apollo_bytes(
    params: Any,
    rank: int | float = 256,
    *,
    side: str = 'reference',
    basis: str = 'seeded_gaussian',
    limiter: bool = True,
    dimension_numbers: Any = None,
    mu_bytes: int = sizes.FLOAT32,
) -> int:
  """Analytic state size of :func:`subspace_optax.apollo` / ``apollo_mini``.

  Per projected matrix (float32): two moments ``2 · 4 r l`` bytes, the basis
  (4 bytes of seed for ``'seeded_gaussian'``, ``4 k r`` for a dense basis) and
  the limiter's previous norm (4 bytes); per projected leaf the refresh
  schedule (two int32). Other leaves keep full Adam moments ``2 · 4 |p|``. Plus
  the pipeline's and the bias correction's step counts. ``apollo_mini`` is
  ``rank=1``. ``mu_bytes`` is the bytes per entry of the first moment (2 for
  ``mu_dtype=jnp.bfloat16``).

  Args:
    params: the parameters (arrays or ``jax.ShapeDtypeStruct``).
    rank, side, dimension_numbers: as given to the method.
    basis: ``'seeded_gaussian'`` (a seed) or the name of a dense basis.
    limiter: whether the norm-growth limiter is on.
    mu_bytes: bytes per entry of the first moment.

  Returns:
    The bytes of the state, an int (equal to
    :func:`subspace_optax.state_bytes` of ``init(params)``).

  Examples:
    >>> import jax.numpy as jnp
    >>> import subspace_optax as so
    >>> params = {'w': jnp.ones((8, 6)), 'b': jnp.ones(6)}
    >>> so.state_sizes.apollo_bytes(params, 2) == so.state_bytes(
    ...     so.apollo(1e-3, rank=2).init(params))
    True
  """
  limiter_bytes = sizes.FLOAT32 if limiter else 0
  moments = mu_bytes + sizes.FLOAT32

  def per_matrix(lay):
    basis_size = (sizes.INT32 if basis == 'seeded_gaussian'
                  else sizes.FLOAT32 * lay.projected_dim * lay.rank)
    return (moments * lay.rank * lay.other_dim + basis_size
            + limiter_bytes)

  return sizes.low_rank_bytes(params, rank, side, dimension_numbers, per_matrix,
                         per_other_element=moments)


