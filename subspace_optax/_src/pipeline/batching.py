"""A ``lax.cond`` that stays a conditional under ``jax.vmap``.

``jax.vmap`` of ``lax.cond`` with a batched predicate becomes a ``select`` of
both branches, so an ensemble of optimizers (``jax.vmap(tx.update)``) would
run every basis refresh (an SVD per matrix) on every step. :func:`cond` has
its own batching rule (``jax.custom_batching.custom_vmap``):

* predicate not batched (e.g. a count shared through ``in_axes=None``): one
  ``lax.cond`` whose branches are vmapped;
* predicate batched: ``lax.cond(any(pred), select(pred, vmap(true_fn),
  vmap(false_fn)), vmap(false_fn))``, so the expensive branch runs, for the
  whole batch at once, only on steps where some member needs it. Members whose
  predicate is false get ``false_fn``'s result, exactly as without vmap.

Outside ``vmap`` it is ``lax.cond``; with a concrete predicate (an eager call,
outside any trace) it calls the branch the predicate picks, as Python's ``if``
would: an eager ``lax.cond`` compiles both branches (a refresh's SVD included)
on every call, since the library's branch functions are new closures each
step. ``true_fn`` and ``false_fn`` must take every traced value they use as an
operand (no closure over batched values).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
from jax.custom_batching import custom_vmap
import jax.numpy as jnp


def _broadcast(x, batched: bool, axis_size: int):
  return x if batched else jnp.broadcast_to(x, (axis_size,) + jnp.shape(x))


def cond(
    pred: jax.Array, true_fn: Callable[..., Any], false_fn: Callable[..., Any],
    *operands: Any,
) -> Any:
  """``lax.cond(pred, true_fn, false_fn, *operands)`` that vmaps lazily."""
  if not isinstance(pred, jax.core.Tracer):
    return true_fn(*operands) if pred else false_fn(*operands)

  @custom_vmap
  def run(pred, *operands):
    return jax.lax.cond(pred, true_fn, false_fn, *operands)

  @run.def_vmap
  def rule(axis_size, in_batched, pred, *operands):
    pred_batched, *operands_batched = in_batched
    operands = [
        jax.tree.map(lambda x, b: _broadcast(x, b, axis_size), op, batched)
        for op, batched in zip(operands, operands_batched)]
    # Branch outputs are batched along axis 0 (inner vmaps, e.g. stacked
    # layers, stay inside the branch functions).
    vmapped_true, vmapped_false = jax.vmap(true_fn), jax.vmap(false_fn)
    if not pred_batched:
      out = jax.lax.cond(pred, vmapped_true, vmapped_false, *operands)
    else:

      def some(*ops):
        return jax.tree.map(
            lambda t, f: jnp.where(
                pred.reshape(pred.shape + (1,) * (t.ndim - 1)), t, f),
            vmapped_true(*ops), vmapped_false(*ops))

      out = jax.lax.cond(jnp.any(pred), some, vmapped_false, *operands)
    return out, jax.tree.map(lambda _: True, out)

  return run(pred, *operands)


def loop_on_cpu(fn: Callable[..., Any]) -> Callable[..., Any]:
  """``fn`` whose ``jax.vmap`` is a loop (``lax.map``) on multi-device CPU.

  For LAPACK calls such as the SVD. jaxlib's batched CPU LAPACK kernels split
  the batch over the intra-op thread pool; in a sharded program on several
  CPU devices, devices that run such a kernel at the same time can all wait
  on that pool and never return (seen with jax 0.10.2: a batched SVD of
  stacked layers inside a refresh ``lax.cond`` on an 8-device CPU mesh, every
  device thread parked in ``ParallelBatchMap``). One matrix per call avoids
  that kernel path. On other backends the batched call is kept.
  """
  wrapped = custom_vmap(fn)

  @wrapped.def_vmap
  def rule(axis_size, in_batched, *args):
    args = [jax.tree.map(lambda x, b: _broadcast(x, b, axis_size), a, batched)
            for a, batched in zip(args, in_batched)]
    if jax.default_backend() == 'cpu' and jax.device_count() > 1:
      out = jax.lax.map(lambda a: wrapped(*a), tuple(args))
    else:
      out = jax.vmap(fn)(*args)
    return out, jax.tree.map(lambda _: True, out)

  return wrapped
