"""Refresh policies: when each leaf's basis is recomputed.

A policy keeps a small per-leaf state (arrays of static shape, saved with the
optimizer state) and answers two questions each step:

* ``due(state, count)``: is a refresh due at update number ``count``?
* ``after(state, count, refreshed, similarity)``: the state after this step,
  given whether the refresh ran and the similarity of the new basis to the old
  one (mean squared cosine of the principal angles, in [0, 1]; only computed when
  ``needs_similarity``).

A due refresh is skipped when the gradient is not finite (the old basis is
kept and the refresh stays due), so a NaN/Inf gradient never becomes a basis.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class RefreshPolicy(NamedTuple):
  """When a leaf's basis is refreshed. See the module docstring."""

  name: str
  # (leaf_index, num_leaves) -> per-leaf state; leaf_index is static.
  init: Callable[[int, int], Any]
  due: Callable[[Any, jax.Array], jax.Array]
  after: Callable[[Any, jax.Array, jax.Array, jax.Array], Any]
  needs_similarity: bool = False


# Periods are compared with the int32 update count.
MAX_PERIOD = 1 << 31


class EveryState(NamedTuple):
  next_refresh: jax.Array  # int32 scalar: update count of the next refresh
  offset: jax.Array  # int32 scalar: this leaf's stagger offset


def check_period(period: Any, name: str) -> None:
  """Construction-time check of a refresh period (a static Python int)."""
  if isinstance(period, np.integer):
    period = int(period)
  if isinstance(period, bool) or not isinstance(period, int):
    raise TypeError(
        f'`{name}` must be a Python int, got {type(period).__name__}. With '
        f"optax.inject_hyperparams, list it in static_args=('{name}', ...)."
    )
  if period <= 0:
    raise ValueError(
        f'`{name}`={period} is not positive; give the number of updates '
        'between basis refreshes (1 refreshes every step).')
  if period >= MAX_PERIOD:
    raise ValueError(
        f'`{name}`={period} does not fit the int32 step counter; give a '
        f'period below 2**31 = {MAX_PERIOD} (a period longer than the '
        'training run refreshes only at the first update).')


def every(period: int, stagger: bool = True) -> RefreshPolicy:
  """Refresh at update 0, then every ``period`` updates.

  With ``stagger`` the ``j``-th of ``n`` projected leaves refreshes at updates
  ``period - offset_j, 2 period - offset_j, ...`` with ``offset_j = j period // n``,
  so at most ``ceil(n / period)`` leaves refresh on the same step instead of
  all of them (GaLore's refresh spike).

  Args:
    period: updates between refreshes (GaLore's ``update_proj_gap``, T).
    stagger: spread the refreshes of different leaves over the period.

  Returns:
    A :class:`RefreshPolicy`, for ``refresh=``.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import subspace_optax as so
    >>> tx = so.low_rank(optax.scale_by_adam(), rank=2,
    ...                  refresh=so.refresh.every(100, stagger=False))
    >>> params = {'w': jnp.ones((8, 6))}
    >>> state = tx.init(params)
    >>> int(state.refresh['w'].next_refresh)
    0
  """
  check_period(period, 'period')

  def init(leaf_index: int, num_leaves: int) -> EveryState:
    offset = (leaf_index * period) // max(num_leaves, 1) if stagger else 0
    return EveryState(jnp.asarray(0, jnp.int32), jnp.asarray(offset, jnp.int32))

  def due(state: EveryState, count: jax.Array) -> jax.Array:
    return count >= state.next_refresh

  def after(state, count, refreshed, similarity):
    del similarity
    following = jnp.where(count == 0, period - state.offset, count + period)
    following = jnp.where(following <= count, count + period, following)
    return state._replace(next_refresh=jnp.where(
        refreshed, following.astype(jnp.int32), state.next_refresh))

  return RefreshPolicy('every', init, due, after)


def resolve(refresh: int | RefreshPolicy) -> RefreshPolicy:
  """A policy from an int period (staggered :func:`every`) or itself."""
  if isinstance(refresh, RefreshPolicy):
    return refresh
  if isinstance(refresh, np.integer):
    refresh = int(refresh)
  if isinstance(refresh, bool) or not isinstance(refresh, int):
    raise TypeError(
        '`refresh` must be a Python int period or a subspace_optax.refresh '
        f'policy, got {type(refresh).__name__}. With optax.inject_hyperparams, '
        "list it in static_args=('refresh', ...)."
    )
  return every(refresh)
