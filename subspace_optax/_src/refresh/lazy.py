"""Lazy, layer-adaptive refresh: stretch a leaf's period once its basis settles."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from subspace_optax._src.refresh import every as refresh_lib

_MAX_PERIOD = 1 << 30  # a stretched period stops growing here
_MAX_WINDOW = 1 << 16


class LazyState(NamedTuple):
  next_refresh: jax.Array  # int32 scalar: update count of the next refresh
  period: jax.Array  # int32 scalar: this leaf's current gap between refreshes
  offset: jax.Array  # int32 scalar: this leaf's stagger offset
  refreshes: jax.Array  # int32 scalar: refreshes done so far
  similarities: jax.Array  # float32 (window,): the latest similarities, oldest first


def _check_number(name: str, value, low: float, high: float,
                  meaning: str) -> None:
  """A real number in [low, high], or a named error.

  A traced scalar (``optax.inject_hyperparams`` under jit) is checked when the
  value is known; a concrete one is checked as the number it holds.
  """
  if isinstance(value, jax.core.Tracer) and jnp.ndim(value) == 0:
    return
  if isinstance(value, jax.Array) and jnp.ndim(value) == 0:
    value = value.item()
  if isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
    raise TypeError(
        f'`{name}` must be a real number ({meaning}), got '
        f'{type(value).__name__}.')
  if not low <= value <= high:
    raise ValueError(
        f'`{name}`={value} is outside [{low:g}, {high:g}]; it is {meaning}.')


def lazy(
    period: int,
    threshold: float = 0.4,
    window: int = 5,
    growth: float = 2.0,
    stagger: bool = True,
) -> refresh_lib.RefreshPolicy:
  """Refresh every ``period`` updates; multiply a leaf's period once its bases agree.

  Q-GaLore's layer-adaptive lazy update (Zhang et al., `Q-GaLore
  <https://arxiv.org/abs/2407.08296>`_, §3.3). Each refresh after the first
  records the similarity of the new basis to the old one; once ``window`` of
  them are recorded and their mean reaches ``threshold``, the leaf's period is
  multiplied by ``growth``. The window is not cleared, so a leaf that stays
  stable keeps stretching its period at every later refresh (as the reference).

  The similarity is the mean squared cosine of the principal angles between the
  old and new subspaces (``‖Q_newᵀQ_old‖_F² / r``, in [0, 1], averaged over a
  stack's matrices), which ignores the arbitrary signs and order of singular
  vectors. The reference uses the *signed* cosine of the first basis vectors
  only, which SVD sign flips drive to -1 in roughly 8 % of refreshes of an
  unchanged subspace; the two measures differ, so the reference's threshold 0.4
  is a starting point, not an equivalent.

  Args:
    period: initial updates between refreshes (``update_proj_gap``).
    threshold: mean similarity over the window that stretches the period
      (``cos_threshold``).
    window: number of latest similarities averaged (``queue_size``).
    growth: factor applied to the period (``gamma_proj``).
    stagger: spread the refreshes of different leaves over the first period, as
      :func:`~subspace_optax.refresh.every`.

  Returns:
    A :class:`RefreshPolicy`, for ``refresh=``.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import subspace_optax as so
    >>> tx = so.low_rank(optax.scale_by_adam(), rank=2,
    ...                  refresh=so.refresh.lazy(100, threshold=0.4))
    >>> params = {'w': jnp.ones((8, 6))}
    >>> updates, state = tx.update(params, tx.init(params))
    >>> int(state.refresh['w'].period)
    100
  """
  refresh_lib.check_period(period, 'period')
  _check_number('threshold', threshold, 0.0, 1.0,
                'the mean squared cosine between successive bases, in [0, 1] '
                '(1: identical subspaces)')
  _check_number('growth', growth, 1.0, float('inf'),
                'the factor that stretches a settled period (inf: stop '
                'refreshing once settled)')
  if isinstance(window, np.integer):
    window = int(window)
  if isinstance(window, bool) or not isinstance(window, int) or not (
      0 < window <= _MAX_WINDOW):
    raise ValueError(
        f'`window`={window!r} must be an int in [1, {_MAX_WINDOW}]: the number '
        'of latest similarities averaged (its state holds one float each).')

  def init(leaf_index: int, num_leaves: int) -> LazyState:
    offset = (leaf_index * period) // max(num_leaves, 1) if stagger else 0
    int32 = lambda v: jnp.asarray(v, jnp.int32)
    return LazyState(int32(0), int32(period), int32(offset), int32(0),
                     jnp.zeros((window,), jnp.float32))

  def due(state: LazyState, count):
    return count >= state.next_refresh

  def after(state: LazyState, count, refreshed, similarity):
    record = refreshed & (state.refreshes >= 1)
    similarities = jnp.where(
        record,
        jnp.concatenate([state.similarities[1:], similarity[None].astype(
            jnp.float32)]),
        state.similarities)
    refreshes = state.refreshes + refreshed.astype(jnp.int32)
    recorded = refreshes - 1
    grow = record & (recorded >= window) & (
        jnp.mean(similarities) >= threshold)
    grown = jnp.minimum(
        jnp.floor(state.period.astype(jnp.float32) * growth), _MAX_PERIOD)
    grown = jnp.maximum(grown.astype(jnp.int32), state.period)  # never shrinks
    period_now = jnp.where(grow, grown, state.period)
    following = jnp.where(
        count == 0, period_now - state.offset, count + period_now)
    following = jnp.where(following <= count, count + period_now, following)
    return LazyState(
        next_refresh=jnp.where(
            refreshed, following.astype(jnp.int32), state.next_refresh),
        period=period_now, offset=state.offset, refreshes=refreshes,
        similarities=similarities)

  return refresh_lib.RefreshPolicy(
      'lazy', init, due, after, needs_similarity=True)
