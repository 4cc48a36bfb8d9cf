"""Index bases: subspaces spanned by coordinates, never stored as matrices.

FRUGAL's coordinate and block projections (Zmushko et al., `FRUGAL:
Memory-Efficient Optimization by Reducing State Overhead for Scalable Training
<https://arxiv.org/abs/2411.07837>`_, ICML 2025, §3): the basis is a set of
columns of the identity, so projecting is a gather and unprojecting a scatter;
no ``k x rank`` matrix exists anywhere.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from subspace_optax._src.bases import base as bases_lib


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SelectedColumns:
  """``rank`` selected columns of a fixed ``size x size`` orthonormal matrix,
  stored as indices: the identity here (coordinates of the projected axis), the
  DCT matrix in :mod:`dct`.

  Attributes:
    indices: int32 ``(rank,)`` selected column indices, ascending.
    size: ``k``, the length of the projected axis (static pytree metadata, not
      an array), so ``unproject`` knows the shape to rebuild without the
      gradient.
  """

  indices: jax.Array
  size: int = dataclasses.field(metadata=dict(static=True))


def random_columns() -> bases_lib.BasisMethod:
  """``rank`` coordinates of the projected axis drawn uniformly at random.

  FRUGAL's ``CoordOptimizer`` / ``randperm`` projection: ``Q = I[:, S]`` for a
  random subset ``S`` (``|S| = rank``) redrawn from the key at every refresh,

  .. math::
    C = G_{S,:}\\ (gather),\\qquad unproject(C) = scatter(C\\ \\to\\ rows\\ S),\\qquad
    G - QQᵀG = G\\ with\\ rows\\ S\\ zeroed.

  The state is the ``rank`` int32 indices (4 r bytes per matrix); with
  ``side='reference'`` and a float rank ``ρ`` the subset is the fraction ``ρ``
  of the smaller dimension's coordinates, so the inner optimizer holds state for
  exactly the fraction ``ρ`` of the entries. The transition between two subsets
  is the partial permutation ``R_{ab} = [S_new[a] = S_old[b]]``, so
  ``on_refresh='transport'`` carries the moments of coordinates kept in both.

  Returns:
    A :class:`BasisMethod`, for ``basis=`` of :func:`subspace_optax.low_rank`
    and the presets.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import subspace_optax as so
    >>> tx = so.low_rank(optax.scale_by_adam(), rank=2,
    ...                  basis=so.bases.random_columns())
    >>> params = {'w': jnp.ones((8, 6))}
    >>> updates, state = tx.update(params, tx.init(params))
    >>> so.bases.random_columns().name
    'random_columns'
  """

  def init(k: int, l: int, rank: int) -> SelectedColumns:
    del l
    return SelectedColumns(jnp.arange(rank, dtype=jnp.int32), k)

  def refresh(g, old: SelectedColumns, key, align) -> SelectedColumns:
    del g, align
    rank = old.indices.shape[-1]
    chosen = jax.random.choice(key, old.size, (rank,), replace=False)
    return SelectedColumns(jnp.sort(chosen).astype(jnp.int32), old.size)

  def project(g, state: SelectedColumns):
    return jnp.take(g, state.indices, axis=0)

  def unproject(c, state: SelectedColumns):
    return jnp.zeros((state.size,) + c.shape[1:], c.dtype).at[
        state.indices].set(c)

  def transition(old: SelectedColumns, new: SelectedColumns):
    return (new.indices[:, None] == old.indices[None, :]).astype(jnp.float32)

  return bases_lib.BasisMethod(
      'random_columns', init, refresh, project, unproject, transition)


class BlockState(NamedTuple):
  active: jax.Array  # float32 scalar: 1 = the inner optimizer runs on this matrix


def blocks(density: float = 0.25) -> bases_lib.BasisMethod:
  """All or nothing per matrix: a whole matrix is active or inactive (BAdam-like).

  FRUGAL's ``BlockOptimizer`` (after BAdam, Luo et al., `BAdam: A Memory
  Efficient Full Parameter Optimization Method for Large Language Models
  <https://arxiv.org/abs/2404.02827>`_): at each refresh every matrix is made
  active with probability ``density``, independently, from the refresh key.
  An active matrix is its own subspace (``Q = I``: the inner optimizer sees all
  of ``G`` and the residual is 0); an inactive one projects to 0 (the whole
  gradient goes to the residual path, e.g. signSGD).

  It needs the coefficients to be the whole matrix: use it with ``rank=1.0``
  and ``side='reference'`` (``k = min(m, n)``), as :func:`subspace_optax.frugal`
  does. Differences from the reference, both forced by static shapes:

  * **Memory**: the inner optimizer's state is allocated at full size for every
    matrix, active or not (its moments are zero while it is inactive under
    ``on_refresh='reset'``), so this basis reproduces the *algorithm*, not
    BAdam's memory saving. For the memory saving the active set must be static:
    partition the params with ``optax.multi_transform`` instead.
  * The reference activates exactly ``round(ρ · #tensors)`` tensors in random
    order; here each matrix (and each layer of a stack) is active with
    probability ``ρ``, so the count is ``ρ · #matrices`` on average.

  No transition: moments cannot be carried into a block that was inactive; use
  ``on_refresh='reset'`` (FRUGAL) or ``'keep'``.

  Args:
    density: probability ``ρ`` in [0, 1] that a matrix is active after a
      refresh. ``1`` runs the inner optimizer everywhere, ``0`` nowhere.

  Returns:
    A :class:`BasisMethod`, for ``basis=`` of :func:`subspace_optax.low_rank`
    and the presets.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import subspace_optax as so
    >>> tx = so.low_rank(optax.scale_by_adam(), rank=1.0, on_refresh='reset',
    ...                  basis=so.bases.blocks(density=0.5))
    >>> params = {'w': jnp.ones((8, 6))}
    >>> updates, state = tx.update(params, tx.init(params))
    >>> updates['w'].shape
    (8, 6)
  """
  if not 0.0 <= density <= 1.0:
    raise ValueError(f'`density` must lie in [0, 1], got {density}.')

  def init(k: int, l: int, rank: int) -> BlockState:
    del l
    if rank != k:
      raise ValueError(
          f'The blocks basis needs the whole matrix as coefficients (rank = '
          f'k = {k}), got rank {rank}: use rank=1.0 and side="reference".')
    return BlockState(jnp.zeros([], jnp.float32))

  def refresh(g, old: BlockState, key, align) -> BlockState:
    del g, old, align
    return BlockState(jax.random.bernoulli(key, density).astype(jnp.float32))

  def project(g, state: BlockState):
    return g * state.active.astype(g.dtype)

  def unproject(c, state: BlockState):
    return c * state.active.astype(c.dtype)

  return bases_lib.BasisMethod('blocks', init, refresh, project, unproject)
