"""Momentum reset on a fixed schedule, around any optax optimizer."""

from __future__ import annotations

import jax.numpy as jnp
import optax

from subspace_optax._src import arguments
from subspace_optax._src.transforms import moments as moments_lib
from subspace_optax._src.transforms import momentum_reset as momentum_reset_lib


@arguments.declare_static_args('period')
def reset_moments_every(
    inner: optax.GradientTransformation,
    period: int,
    *,
    second_moment: bool = False,
    reset_count: bool | None = None,
) -> optax.GradientTransformationExtraArgs:
  """Wrap ``inner`` so its moments are zeroed every ``period`` updates.

  Glentis et al., `Scalable Parameter and Memory Efficient Pretraining for LLM:
  Recipes and Insights <https://arxiv.org/abs/2505.22922>`_, 2025 ("momentum
  reset", their best single trick for low-rank pre-training; period 200).
  Before updates ``period, 2·period, ...`` the first moments of every optax
  state inside ``inner`` are set to 0, so the update at a reset step is
  ``inner`` applied from fresh moments:

  .. math::
    m_{t} = (1-β_1) g_t \\quad (t \\equiv 0 \\bmod T,\\ t > 0).

  Works around anything (``optax.adamw``, ``subspace_optax.low_rank``: only the
  inner moments are reset, not the basis or its count). The paper's text says
  "momentum"; whether the second moment was also cleared is not stated, so it
  is an option. With ``second_moment`` the counts of the reset states are
  reset too by default (restarting the bias correction; without it Adam's
  ``m/√v`` would jump by ``√(1-β_2)/(1-β_1)``-ish factors).

  Args:
    inner: the optimizer whose moments are reset.
    period: updates between resets (static int).
    second_moment: also zero ``nu``.
    reset_count: also zero the ``count`` of the states that hold the reset
      moments; defaults to ``second_moment``.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state wraps ``inner``'s
    with a step count.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import subspace_optax as so
    >>> params = {'w': jnp.ones((8, 6))}
    >>> tx = so.reset_moments_every(optax.adam(1e-3), period=200)
    >>> state = tx.init(params)
    >>> updates, state = tx.update(params, state, params)
    >>> int(state.count)
    1
  """
  if isinstance(period, bool) or not isinstance(period, int) or period <= 0:
    raise ValueError(f'`period` must be a positive Python int, got {period!r}.')
  fields = moments_lib.FIRST_MOMENTS + (
      moments_lib.SECOND_MOMENTS if second_moment else ())
  reset_count = second_moment if reset_count is None else reset_count
  inner = optax.with_extra_args_support(inner)

  def init_fn(params):
    return momentum_reset_lib.ResetMomentsState(jnp.zeros([], jnp.int32), inner.init(params))

  def update_fn(updates, state, params=None, **extra_args):
    due = (state.count > 0) & (state.count % period == 0)
    inner_state = momentum_reset_lib.reset_moments(state.inner_state, fields, reset_count, due)
    updates, inner_state = inner.update(updates, inner_state, params, **extra_args)
    return updates, momentum_reset_lib.ResetMomentsState(optax.safe_increment(state.count), inner_state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
