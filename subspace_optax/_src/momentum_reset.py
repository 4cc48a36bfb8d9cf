"""Momentum reset on a fixed schedule, around any optax optimizer."""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import optax

from subspace_optax._src import moments as moments_lib
from subspace_optax._src import presets


class ResetMomentsState(NamedTuple):
  count: jax.Array  # int32 scalar: updates so far
  inner_state: optax.OptState


def reset_moments(
    state: Any,
    fields: Sequence[str] = moments_lib.FIRST_MOMENTS,
    reset_count: bool = False,
    where: Any = True,
) -> Any:
  """Zero the moment fields of every optax state NamedTuple inside ``state``.

  A NamedTuple with a field named in ``fields`` (optax's ``mu``/``nu`` of
  Adam and Lion, ``trace`` of ``optax.trace``; the table is
  ``subspace_optax._src.moments``) gets those fields zeroed, and with
  ``reset_count`` its ``count`` too (bias correction restarts). Other
  leaves, including counts of other states (the subspace pipeline's step count),
  are untouched. ``where`` (a boolean scalar) makes the reset conditional
  without leaving ``jit``. Encoded moments (8-bit codes and scales) are
  zeroed as stored: every stored array zero stands for a zero moment.
  """
  fields = tuple(fields)
  zero = lambda x: jnp.where(where, jnp.zeros_like(x), x)
  names = fields + (('count',) if reset_count else ())

  def reset(name, subtree):
    return jax.tree.map(zero, subtree)

  def holds_moments(node) -> bool:
    return any(f in fields for f in moments_lib.field_names(node))

  def visit(node):
    if not holds_moments(node):
      return node
    return moments_lib.map_moment_fields(node, reset, names)

  return jax.tree.map(visit, state, is_leaf=holds_moments)


@presets.declare_static_args('period')
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
    return ResetMomentsState(jnp.zeros([], jnp.int32), inner.init(params))

  def update_fn(updates, state, params=None, **extra_args):
    due = (state.count > 0) & (state.count % period == 0)
    inner_state = reset_moments(state.inner_state, fields, reset_count, due)
    updates, inner_state = inner.update(updates, inner_state, params, **extra_args)
    return updates, ResetMomentsState(optax.safe_increment(state.count), inner_state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
