"""Gradient accumulation in the subspace: ``QᵀG`` summed, not ``G``.

``optax.MultiSteps(tx, k)`` keeps a full-size sum of the gradients (one more
copy of the params) and runs ``tx`` on the mean every ``k`` calls. Projection
is linear, ``Qᵀ(mean_j G_j) = mean_j QᵀG_j``, so a low-rank method can sum
the coefficients ``C_j = QᵀG_j`` instead: an ``r x n`` buffer per matrix
(:func:`~subspace_optax.low_rank` with ``accumulate_steps=k``). Three pieces:

* :func:`accumulate_coefficients` wraps the inner optimizer: it sums the
  coefficients of ``k`` calls and runs the inner update on their mean at the
  ``k``-th, emitting zeros (and keeping the inner state) before.
* :func:`at_cycle_start` wraps the refresh policy: a basis is refreshed only
  at the first micro-batch of a cycle, from that micro-batch's gradient, so
  every coefficient of the cycle is taken in the same basis. Periods count
  optimizer steps (cycles), not micro-batches.
* :func:`once_per_update` gates the stages after the projection (weight
  decay, the learning rate), so they act once per cycle.

The result equals ``optax.MultiSteps(tx, k)`` whenever the basis does not
depend on the gradient (random bases) and differs at refreshes otherwise:
there the basis comes from the cycle's first micro-batch instead of the mean
of all ``k`` (the residual ``G - QQᵀG`` of the other micro-batches is never
seen, which is the memory saved). A transform chained before the method,
such as ``optax.clip_by_global_norm`` (or ``per_layer_train_step``'s
``clip_norm``), acts on each micro-batch's gradient, where ``MultiSteps``
around the whole chain would act on their mean.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import optax
from jax import lax

from subspace_optax._src.refresh import every as refresh_lib


class AccumulateState(NamedTuple):
  """State of :func:`accumulate_coefficients`."""

  micro_step: jax.Array  # int32 scalar in [0, k): calls since the last update
  accumulated: Any  # sum of this cycle's inputs, float32, the inputs' shapes
  inner_state: optax.OptState  # the inner optimizer's, advanced once a cycle


def check_accumulate_steps(accumulate_steps: Any) -> int:
  """``accumulate_steps`` as a positive Python int, or a named error."""
  if isinstance(accumulate_steps, bool) or not isinstance(
      accumulate_steps, int):
    raise TypeError('`accumulate_steps` must be a Python int (micro-batches '
                    f'per update), got {accumulate_steps!r}.')
  if accumulate_steps < 1:
    raise ValueError(f'`accumulate_steps`={accumulate_steps} is not positive; '
                     'give the number of micro-batches per update (1: none).')
  return accumulate_steps


def accumulate_coefficients(
    inner: optax.GradientTransformation, accumulate_steps: int
) -> optax.GradientTransformationExtraArgs:
  """Run ``inner`` once every ``accumulate_steps`` calls, on the inputs' mean.

  .. math::
    N = inner\\Big(\\frac{1}{k}\\sum_{j=1}^{k} C_j\\Big)
    \\text{ at call } k \\text{ of a cycle, } 0 \\text{ before.}

  Inside :func:`~subspace_optax.low_rank` the inputs are the coefficients
  ``C_j = QᵀG_j``, so the sum is ``r x n`` per matrix.

  Args:
    inner: any params-free optax transform.
    accumulate_steps: ``k``, calls per inner update.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is an
    :class:`AccumulateState`.

  Examples:
    >>> import jax.numpy as jnp, optax
    >>> from subspace_optax._src.pipeline import accumulation
    >>> tx = accumulation.accumulate_coefficients(optax.sgd(1.0), 2)
    >>> state = tx.init({'c': jnp.zeros(2)})
    >>> first, state = tx.update({'c': jnp.array([1., 3.])}, state)
    >>> second, state = tx.update({'c': jnp.array([3., 5.])}, state)
    >>> first['c'].tolist(), second['c'].tolist()
    ([0.0, 0.0], [-2.0, -4.0])
  """
  accumulate_steps = check_accumulate_steps(accumulate_steps)
  inner = optax.with_extra_args_support(inner)

  def zeros(tree):
    return jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), tree)

  def init_fn(params):
    return AccumulateState(micro_step=jnp.zeros([], jnp.int32),
                           accumulated=zeros(params),
                           inner_state=inner.init(params))

  def update_fn(updates, state, params=None, **extra_args):
    accumulated = jax.tree.map(
        lambda a, u: a + u.astype(jnp.float32), state.accumulated, updates)
    last = state.micro_step == accumulate_steps - 1

    def emit(_):
      mean = jax.tree.map(lambda a, u: (a / accumulate_steps).astype(u.dtype),
                          accumulated, updates)
      out, inner_state = inner.update(mean, state.inner_state, params,
                                      **extra_args)
      return out, inner_state, zeros(accumulated)

    def wait(_):
      return (jax.tree.map(jnp.zeros_like, updates), state.inner_state,
              accumulated)

    out, inner_state, accumulated = lax.cond(last, emit, wait, None)
    return out, AccumulateState(
        micro_step=jnp.where(last, 0, state.micro_step + 1).astype(jnp.int32),
        accumulated=accumulated, inner_state=inner_state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def at_cycle_start(policy: refresh_lib.RefreshPolicy,
                   accumulate_steps: int) -> refresh_lib.RefreshPolicy:
  """``policy`` over cycles of ``accumulate_steps`` updates of ``low_rank``.

  Due only at the first call of a cycle (``count % k == 0``), and then as
  ``policy`` is at cycle ``count // k``; its state moves only then.
  """
  k = check_accumulate_steps(accumulate_steps)
  if k == 1:
    return policy

  def due(state, count):
    return (count % k == 0) & policy.due(state, count // k)

  def after(state, count, refreshed, similarity):
    moved = policy.after(state, count // k, refreshed, similarity)
    return jax.tree.map(lambda new, old: jnp.where(count % k == 0, new, old),
                        moved, state)

  return policy._replace(name=f'{policy.name}/{k}', due=due, after=after)


def once_per_update(stages: Sequence[optax.GradientTransformation],
                    accumulate_steps: int) -> list[optax.GradientTransformation]:
  """The stages chained after a low-rank update with ``accumulate_steps``
  (weight decay, the learning rate and its schedule), made to act once per
  update: at the last call of each cycle, zeros (and their states kept) at
  the others. With ``accumulate_steps=1`` they are returned as they are, so
  a preset's state is unchanged.

  Examples:
    >>> import jax.numpy as jnp, optax
    >>> from subspace_optax._src.pipeline import accumulation
    >>> tx = optax.chain(*accumulation.once_per_update(
    ...     [optax.scale_by_learning_rate(0.5)], 2))
    >>> state = tx.init(jnp.zeros(1))
    >>> [float(tx.update(jnp.ones(1), state)[0][0]),
    ...  float(tx.update(jnp.ones(1), tx.update(jnp.ones(1), state)[1])[0][0])]
    [0.0, -0.5]
  """
  k = check_accumulate_steps(accumulate_steps)
  if k == 1:
    return list(stages)
  return [optax.conditionally_mask(optax.chain(*stages),
                                   lambda step: step % k == k - 1)]
