"""A Gaussian basis stored as its seed (APOLLO): ``O(1)`` state per matrix."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from subspace_optax._src.bases import base as bases_lib
from subspace_optax._src.pipeline import sharding

_HIGHEST = jax.lax.Precision.HIGHEST


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SeedState:
  """A Gaussian sketch stored as its seed.

  Attributes:
    seed: uint32 scalar the ``k x rank`` matrix is regenerated from.
    size: ``k`` (static pytree metadata, not an array).
    rank: ``r`` (static pytree metadata).
  """

  seed: jax.Array
  size: int = dataclasses.field(metadata=dict(static=True))
  rank: int = dataclasses.field(metadata=dict(static=True))


def seeded_matrix(state: SeedState) -> jax.Array:
  """The ``k x rank`` matrix of ``N(0, 1/rank)`` entries that ``state`` encodes.

  Args:
    state: a :class:`SeedState` (one seed, the static sizes).

  Returns:
    The float32 ``(..., k, rank)`` matrix, regenerated from the seed.

  Examples:
    >>> import jax.numpy as jnp
    >>> import subspace_optax as so
    >>> state = so.bases.SeedState(jnp.uint32(7), 8, 2)
    >>> so.bases.seeded_matrix(state).shape
    (8, 2)
  """
  return bases_lib.normal_matrix(
      jax.random.key(state.seed), (state.size, state.rank)
  ) / math.sqrt(state.rank)


def seeded_gaussian() -> bases_lib.BasisMethod:
  """A Gaussian sketch ``N(0, 1/rank)`` stored as one uint32 seed per matrix.

  APOLLO's projection (Zhu et al., arXiv 2412.05270, §4): at each refresh a new
  seed is drawn from the refresh key (itself ``fold_in`` of the optimizer's
  seed, the step and the leaf), and the matrix

  .. math::
    P_{ij} \\sim N(0, 1/r),\\qquad C = PᵀG

  is regenerated from it whenever it is used, so the basis state is 4 bytes per
  matrix (the paper's "seed only"; the reference keeps the dense ``P``). The
  price is drawing ``k r`` normals per use, cheap next to the ``k r l``
  projection. Same distribution as :func:`~subspace_optax.bases.gaussian`
  (which stores the dense matrix); ``align_signs`` is ignored.

  Returns:
    A :class:`BasisMethod`, for ``basis=`` of :func:`subspace_optax.low_rank`
    and the presets.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import subspace_optax as so
    >>> tx = so.low_rank(optax.scale_by_adam(), rank=2,
    ...                  basis=so.bases.seeded_gaussian())
    >>> params = {'w': jnp.ones((8, 6))}
    >>> updates, state = tx.update(params, tx.init(params))
    >>> so.bases.seeded_gaussian().name
    'seeded_gaussian'
  """

  def init(k: int, l: int, rank: int) -> SeedState:
    del l
    return SeedState(jnp.zeros([], jnp.uint32), k, rank)

  def refresh(g, old: SeedState, key, align) -> SeedState:
    del g, align
    return SeedState(jax.random.bits(key, (), jnp.uint32), old.size, old.rank)

  def project(g, state: SeedState):
    return sharding.einsum(
        'kr,kl->rl', seeded_matrix(state), g.astype(jnp.float32))

  def unproject(c, state: SeedState):
    return sharding.einsum(
        'kr,rl->kl', seeded_matrix(state), c.astype(jnp.float32))

  def transition(old: SeedState, new: SeedState):
    return jnp.einsum('kr,ks->rs', seeded_matrix(new), seeded_matrix(old),
                      precision=_HIGHEST)

  return bases_lib.BasisMethod(
      'seeded_gaussian', init, refresh, project, unproject, transition)


