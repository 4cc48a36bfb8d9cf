"""Continual-learning baselines as optax transforms, and LR re-warming.

* :func:`l2_to_anchor` — ``λ (θ - θ*)`` added to the gradient (L2 to the
  previous task's solution).
* :func:`ewc` — elastic weight consolidation, ``λ F ⊙ (θ - θ*)`` with a diagonal
  Fisher ``F`` (Kirkpatrick et al., arXiv 1612.00796); :func:`fisher_diagonal`
  estimates ``F``.
* :func:`rewarm_schedule` — linear warm-up then cosine decay, restarted at every
  task (continual pre-training; Gupta et al., arXiv 2308.04014; Ibrahim et al.,
  arXiv 2403.08763).

The regularisers read ``params`` and add the penalty's gradient to the incoming
updates, so they go **before** the optimizer, where the gradient is:
``optax.chain(ewc(strength=...), optax.adam(lr))``. Their anchor (and Fisher)
live in the state, so they are replaced between tasks without rebuilding or
re-jitting anything: ``optax.tree.set(opt_state, anchor=params, fisher=F)``.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax

from subspace_optax._src import arguments
from subspace_optax._src import utils


class AnchorState(NamedTuple):
  """State of :func:`l2_to_anchor`: the parameters to stay close to."""

  anchor: Any


class EwcState(NamedTuple):
  """State of :func:`ewc`: the anchor ``θ*`` and the diagonal Fisher ``F``."""

  anchor: Any
  fisher: Any


def _require_params(params, name):
  if params is None:
    raise ValueError(f'{name} needs the params: call update(updates, state, '
                     'params).')


def _copy_tree(tree):
  return jax.tree.map(lambda x: jnp.array(x, copy=True), utils.unbox(tree))


@arguments.declare_static_args()
def l2_to_anchor(
    anchor: Any = None,
    strength: float = 1.0,
) -> optax.GradientTransformation:
  """Add the gradient of ``(λ/2) ‖θ - θ*‖²``: ``u ← u + λ (θ - θ*)``.

  The simplest continual-learning regulariser ("L2" in Kirkpatrick et al.,
  `Overcoming catastrophic forgetting in neural networks
  <https://arxiv.org/abs/1612.00796>`_, 2017): every weight is pulled towards
  the solution of the previous task, equally.

  Args:
    anchor: ``θ*``; None uses the params given to ``init`` (a copy). Move it at
      each task boundary with ``optax.tree.set(opt_state, anchor=params)``.
    strength: ``λ``.

  Returns:
    An ``optax.GradientTransformation`` with an :class:`AnchorState`.

  Examples:
    >>> import jax.numpy as jnp
    >>> from subspace_optax import continual as cl
    >>> tx = cl.l2_to_anchor(strength=0.5)
    >>> state = tx.init({'w': jnp.zeros(2)})  # anchor at 0
    >>> updates, _ = tx.update({'w': jnp.zeros(2)}, state, {'w': jnp.ones(2)})
    >>> updates['w']
    Array([0.5, 0.5], dtype=float32)
  """

  def init_fn(params):
    return AnchorState(anchor=_copy_tree(params if anchor is None else anchor))

  def update_fn(updates, state, params=None):
    _require_params(params, 'l2_to_anchor')
    updates = jax.tree.map(
        lambda u, p, a: u + (strength * (p - a)).astype(u.dtype),
        updates, params, state.anchor)
    return updates, state

  return optax.with_extra_args_support(
      optax.GradientTransformation(init_fn, update_fn))


@arguments.declare_static_args()
def ewc(
    anchor: Any = None,
    fisher: Any = None,
    strength: float = 1.0,
) -> optax.GradientTransformation:
  """Elastic weight consolidation: ``u ← u + λ F ⊙ (θ - θ*)``.

  Kirkpatrick et al., `Overcoming catastrophic forgetting in neural networks
  <https://arxiv.org/abs/1612.00796>`_, PNAS 2017: the gradient of the penalty
  ``(λ/2) Σ_i F_i (θ_i - θ*_i)²`` with ``F`` the diagonal Fisher information at
  the previous solution ``θ*``. For several tasks, accumulate the Fisher
  (``F ← F + F_t``, or ``γF + F_t`` for online EWC, Schwarz et al.,
  arXiv 1805.06370) and move the anchor: :func:`consolidate_ewc`.

  Args:
    anchor: ``θ*``; None uses the params given to ``init`` (a copy).
    fisher: diagonal Fisher with the params' structure; None starts at zero (no
      penalty until the first task is consolidated).
    strength: ``λ``.

  Returns:
    An ``optax.GradientTransformation`` with an :class:`EwcState`.

  Examples:
    >>> import jax.numpy as jnp
    >>> from subspace_optax import continual as cl
    >>> tx = cl.ewc(fisher={'w': jnp.array([1.0, 0.0])}, strength=2.0)
    >>> state = tx.init({'w': jnp.zeros(2)})  # anchor at 0
    >>> grads = {'w': jnp.zeros(2)}
    >>> updates, _ = tx.update(grads, state, {'w': jnp.ones(2)})
    >>> updates['w']  # λ F (θ - θ*)
    Array([2., 0.], dtype=float32)
  """

  def init_fn(params):
    params = utils.unbox(params)
    f = (jax.tree.map(jnp.zeros_like, params) if fisher is None
         else _copy_tree(fisher))
    return EwcState(anchor=_copy_tree(params if anchor is None else anchor),
                    fisher=f)

  def update_fn(updates, state, params=None):
    _require_params(params, 'ewc')
    updates = jax.tree.map(
        lambda u, p, a, f: u + (strength * f * (p - a)).astype(u.dtype),
        updates, params, state.anchor, state.fisher)
    return updates, state

  return optax.with_extra_args_support(
      optax.GradientTransformation(init_fn, update_fn))


def consolidate_ewc(opt_state: Any, params: Any, fisher: Any,
                    decay: float = 1.0) -> Any:
  """``opt_state`` with the :func:`ewc` state moved to a finished task.

  ``F ← γ F + F_t`` and ``θ* ← θ`` (``γ = decay``; 1 is EWC with one penalty
  per task summed, ``γ < 1`` online EWC, Schwarz et al., arXiv 1805.06370).
  ``opt_state`` is any optax state holding one :class:`EwcState`; nothing is
  rebuilt or re-jitted.

  Args:
    opt_state: the optimizer state (e.g. of ``optax.chain(ewc(...), ...)``).
    params: ``θ``, the params at the end of the task.
    fisher: ``F_t``, e.g. from :func:`fisher_diagonal`.
    decay: ``γ``.

  Returns:
    ``opt_state`` with the :class:`EwcState` updated (same structure and
    shapes).

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> from subspace_optax import continual as cl
    >>> params = {'w': jnp.ones(2)}
    >>> tx = optax.chain(cl.ewc(strength=1.0), optax.sgd(0.1))
    >>> state = tx.init(params)
    >>> state = cl.consolidate_ewc(state, params, {'w': jnp.array([1.0, 0.0])})
    >>> state[0].fisher['w']
    Array([1., 0.], dtype=float32)
  """
  total = jax.tree.map(lambda old, new: decay * old + new,
                       optax.tree.get(opt_state, 'fisher'), fisher)
  return optax.tree.set(opt_state, anchor=params, fisher=total)


@functools.lru_cache(maxsize=32)
def _summed_squared_gradients(loss_fn):
  """Jitted ``Σ_i (∇ℓ_i)²`` over a chunk (cached per ``loss_fn``, so repeated
  calls with the same function compile once)."""
  return jax.jit(lambda p, chunk: jax.tree.map(
      lambda g: jnp.sum(jnp.square(g.astype(jnp.float32)), axis=0),
      jax.vmap(jax.grad(loss_fn), in_axes=(None, 0))(p, chunk)))


def fisher_diagonal(
    loss_fn: Callable[..., jax.Array],
    params: Any,
    examples: Any,
    *,
    batch_size: Optional[int] = None,
) -> Any:
  """Diagonal Fisher ``F = E[(∇_θ ℓ(θ; x))²]`` over single examples.

  ``loss_fn(params, example)`` is the negative log-likelihood of **one**
  example (``examples`` is a pytree whose leaves share a leading axis of N
  examples). With the true labels this is the *empirical* Fisher (what most
  EWC code uses); pass labels sampled from the model for the true Fisher.
  Per-example gradients are taken with ``vmap`` in chunks of ``batch_size``.

  Args:
    loss_fn: ``loss_fn(params, example) -> scalar``, the loss of one example.
    params: the parameters ``θ``.
    examples: a pytree of arrays with a leading axis of N examples.
    batch_size: examples per ``vmap`` chunk (None: all at once).

  Returns:
    A pytree like ``params``: the mean of the squared per-example gradients.

  Examples:
    >>> import jax.numpy as jnp
    >>> from subspace_optax import continual as cl
    >>> def loss(params, x):
    ...   return 0.5 * jnp.sum((params['w'] * x) ** 2)
    >>> cl.fisher_diagonal(loss, {'w': jnp.ones(2)}, jnp.array([[1.0, 0.0],
    ...                                                      [1.0, 2.0]]))
    {'w': Array([1., 8.], dtype=float32)}
  """
  params = utils.unbox(params)
  sizes = {int(jnp.shape(x)[0]) for x in jax.tree.leaves(examples)}
  if len(sizes) != 1:
    raise ValueError(f'Every leaf of `examples` needs the same leading axis; got '
                     f'sizes {sorted(sizes)}.')
  total = sizes.pop()
  batch_size = total if batch_size is None else min(batch_size, total)
  squared_grad = _summed_squared_gradients(loss_fn)
  accumulated = jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), jnp.float32),
                             params)
  for start in range(0, total, batch_size):
    chunk = jax.tree.map(lambda x: x[start:start + batch_size], examples)
    accumulated = jax.tree.map(jnp.add, accumulated, squared_grad(params, chunk))
  return jax.tree.map(lambda f: f / total, accumulated)


def rewarm_schedule(
    peak_value: float,
    steps_per_task: Union[int, Sequence[int]],
    warmup_steps: int,
    *,
    init_value: float = 0.0,
    end_value: float = 0.0,
) -> optax.Schedule:
  """Linear warm-up then cosine decay, restarted at the start of every task.

  Continual pre-training re-warms and re-decays the learning rate on each new
  data distribution (Gupta et al., `Continual Pre-Training of Large Language
  Models: How to (re)warm your model? <https://arxiv.org/abs/2308.04014>`_;
  Ibrahim et al., `Simple and Scalable Strategies to Continually Pre-train Large
  Language Models <https://arxiv.org/abs/2403.08763>`_, 2024). Within a task of
  ``T`` steps, at local step ``t``:

  .. math::
    η(t) = η_0 + (η_{peak} - η_0)\\,t / W \\quad (t < W), \\qquad
    η(t) = η_{end} + \\tfrac12 (η_{peak} - η_{end})
           (1 + \\cos(π (t - W) / (T - W))) \\quad (t \\ge W).

  Args:
    peak_value: ``η_peak``.
    steps_per_task: ``T`` for every task (int, periodic forever) or a sequence
      of task lengths (after the last one the schedule stays at ``end_value``).
    warmup_steps: ``W`` (< the length of every task).
    init_value: ``η_0`` at the start of every task.
    end_value: ``η_end`` at the end of every task.

  Returns:
    An ``optax.Schedule`` (a jittable function of the global step).

  Examples:
    >>> from subspace_optax import continual as cl
    >>> schedule = cl.rewarm_schedule(1.0, steps_per_task=10, warmup_steps=2)
    >>> [round(float(schedule(t)), 3) for t in (0, 1, 2, 10, 11)]
    [0.0, 0.5, 1.0, 0.0, 0.5]
  """
  lengths = ([steps_per_task] if isinstance(steps_per_task, int)
             else list(steps_per_task))
  if not lengths or any(int(t) <= warmup_steps for t in lengths):
    raise ValueError(
        f'Every task needs more steps than warmup_steps={warmup_steps}; got '
        f'{steps_per_task}.')
  periodic = isinstance(steps_per_task, int)
  starts = np.concatenate([[0], np.cumsum(lengths)])

  def within(local, length):
    local = local.astype(jnp.float32)
    warm = init_value + (peak_value - init_value) * local / max(warmup_steps, 1)
    progress = jnp.clip((local - warmup_steps) / (length - warmup_steps), 0, 1)
    cosine = end_value + 0.5 * (peak_value - end_value) * (
        1 + jnp.cos(jnp.pi * progress))
    return jnp.where(local < warmup_steps, warm, cosine)

  def schedule(count):
    count = jnp.asarray(count, jnp.int32)
    if periodic:
      return within(count % lengths[0], lengths[0])
    task = jnp.clip(jnp.searchsorted(jnp.asarray(starts[1:]), count,
                                     side='right'), 0, len(lengths) - 1)
    local = count - jnp.asarray(starts[:-1])[task]
    length = jnp.asarray(lengths, jnp.float32)[task]
    value = within(local, length)
    return jnp.where(count >= starts[-1], end_value, value)

  return schedule
