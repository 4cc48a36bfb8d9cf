"""Per-layer updates inside the backward pass of a scanned layer stack.

A whole-tree train step holds every gradient at once: ``jax.grad`` returns
the full tree, then ``tx.update`` consumes it. With the layers stacked and
scanned, XLA cannot move layer ``l``'s update into the reverse scan that
produces its gradient (jax-ml/jax#30338), so :func:`per_layer_train_step`
writes that schedule out:

1. a forward scan saves each layer's input (only that: the layer is
   recomputed in the backward, i.e. rematerialised);
2. the head's loss and its vector-Jacobian product give ``∂L/∂h_L``;
3. a reverse scan takes ``jax.vjp`` of one layer per iteration, gives the
   layer's gradient ``G_l`` to ``tx.update`` on a one-layer tree (leading axis
   of size 1), and writes the new layer params and the layer's slice of the
   optimizer state in place into the carried stacks
   (``lax.dynamic_update_slice``); ``G_l`` then dies;
4. the other leaves (embedding, norms, head) are updated once at the end.

Design: the optimizer state is the ordinary whole-tree ``tx.init(params)``,
so checkpoints, ``state_bytes`` and a whole-tree step share it. Which state
leaves carry the stack axis is found from shapes alone: the state is sized
(``jax.eval_shape``) for ``L`` and ``L + 1`` layers and the leaves whose
leading axis changes are the per-layer ones; layer ``l`` gets their ``l``-th
slice. Every other leaf is shared (counts, refresh schedules, the moments of
the non-stack leaves) and each one-layer update sees its value before the
step, as the whole-tree update does. The non-stack leaves are zero-size in
the one-layer tree (so positions in the flat tree, hence the leaf keys of
random bases, are those of the whole tree) and the stack leaves are
zero-size in the final update. Random bases draw layer ``l``'s key of the
whole-tree split (:mod:`~subspace_optax._src.pipeline.layer_index`).

The result equals the whole-tree step's when the transform is separable over
the layers: per-leaf, per-matrix maths (every method built on
:func:`~subspace_optax.low_rank`, Adam, weight decay). Transforms that need
the whole gradient first get a :class:`NotLayerSeparableError` naming what to
use: ``clip_by_global_norm`` (pass ``clip_norm=`` here: a first backward pass
computes the global norm), ``apply_if_finite`` and ``MultiSteps`` (use the
whole-tree step), a lazy refresh policy (its period follows the similarity
averaged over the layers; use ``refresh=<int>``). ``check_shared=True`` also
returns whether every one-layer update left the shared leaves as the final
update did (a test of separability for transforms not listed here).

Memory: params + state + one layer's gradient and optimizer temporaries + the
saved layer inputs (``L x batch x seq x dim``) + the head's activations.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import optax
from jax import lax
from jax.experimental import layout

from subspace_optax._src.pipeline import layer_index
from subspace_optax._src.pipeline import layer_state
from subspace_optax._src.pipeline import separability

NotLayerSeparableError = separability.NotLayerSeparableError


def _index(stacks, l: jax.Array):
  """Layer ``l`` of every stack in ``stacks`` (the leading axis dropped).

  The scans here carry the stacks through an ``optimization_barrier`` and
  index them, instead of scanning over them: XLA:CPU would otherwise convert
  each whole bfloat16 stack (params, saved inputs) to float32 ahead of the
  loop, GBs that a GPU compile does not allocate.
  """
  return jax.tree.map(lambda x: lax.dynamic_index_in_dim(x, l, 0, False),
                      stacks)


def _row_major(x: jax.Array) -> jax.Array:
  """``x`` pinned to the default (row-major) layout, that of the stacks.

  XLA's GPU layout assignment can give a layer's new params a column-major
  layout (seen for ``low_rank``'s unprojection dot fused with the param add)
  and propagate it to the whole carried stack: the compiled step then holds a
  transposed copy of each such stack through the reverse scan (at LLaMA-7B,
  w_gate's and w_up's, 2.9 GB each: a 27.8 GB peak against 22.0 GB pinned,
  H100 ahead-of-time compile). Pinned, any transpose is one layer's. GPUs
  only: on the CPU the pin costs a copy of the layer and saves nothing.
  """
  if sum(size > 1 for size in x.shape) < 2:  # a vector has one layout
    return x
  pin = lambda y: layout.with_layout_constraint(
      y, layout.Layout(tuple(range(y.ndim))))
  return lax.platform_dependent(x, cuda=pin, rocm=pin, default=lambda y: y)


def _equal(a: jax.Array, b: jax.Array) -> jax.Array:
  same = a == b
  if jnp.issubdtype(a.dtype, jnp.inexact):
    same = same | (jnp.isnan(a) & jnp.isnan(b))
  return jnp.all(same)


def per_layer_train_step(
    tx: optax.GradientTransformation,
    *,
    embed: Callable[[Any, Any], jax.Array],
    layer: Callable[[Any, jax.Array], jax.Array],
    head_loss: Callable[[Any, jax.Array, Any], jax.Array],
    stack: str = 'blocks',
    clip_norm: float | None = None,
    check_shared: bool = False,
) -> Callable[..., tuple]:
  """A train step that updates each layer of a stack inside the backward scan.

  The model is ``loss = head_loss(rest, h_L, batch)`` with
  ``h_{l+1} = layer(params[stack][l], h_l)`` and ``h_0 = embed(rest, batch)``,
  where ``rest`` is ``params`` without ``params[stack]``. The step equals
  ``g = jax.grad(loss)(params); u, s = tx.update(g, s, params);
  params = optax.apply_updates(params, u)`` for a transform separable over
  the layers (see the module docstring), but never holds ``g``: peak memory
  is params + state + one layer's gradient.

  Args:
    tx: the optimizer of the whole tree; its state is ``tx.init(params)``.
    embed: ``(rest, batch) -> h_0``.
    layer: ``(layer_params, h) -> h`` for one layer (its params without the
      leading layer axis).
    head_loss: ``(rest, h_L, batch) -> scalar loss``.
    stack: the key of ``params`` (a dict) holding the stacked layers, every
      leaf with the same leading layer axis.
    clip_norm: if set, the gradient is scaled by
      ``min(1, clip_norm / ‖g‖)`` (``optax.clip_by_global_norm``) before the
      updates; ``‖g‖`` comes from a first backward pass (no updates), so the
      step costs one more backward.
    check_shared: also return a bool: every one-layer update left the shared
      state leaves as the others did (separability, for tests).

  Returns:
    ``step(params, opt_state, batch) -> (params, opt_state, loss[, same])``,
    to be jitted (donate params and state).

  Raises:
    NotLayerSeparableError: on the first call, for a transform that needs the
      whole gradient first (global-norm clipping, ``apply_if_finite``,
      ``MultiSteps``, a lazy refresh policy).

  Examples:
    >>> import jax, jax.numpy as jnp, optax
    >>> import subspace_optax as so
    >>> params = {'embed': jnp.ones((3,)), 'blocks': jnp.full((4, 3, 3), 0.1)}
    >>> step = so.per_layer_train_step(
    ...     optax.adam(1e-2),
    ...     embed=lambda rest, x: x * rest['embed'],
    ...     layer=lambda w, h: jnp.tanh(h @ w),
    ...     head_loss=lambda rest, h, x: jnp.sum(h ** 2))
    >>> state = optax.adam(1e-2).init(params)
    >>> params, state, loss = jax.jit(step)(params, state, jnp.ones((2, 3)))
    >>> params['blocks'].shape
    (4, 3, 3)
  """
  if not isinstance(stack, str):
    raise TypeError(f'`stack` must be a dict key (str), got {stack!r}.')

  def forward(rest, stacked, size, batch):
    h0, embed_vjp = jax.vjp(lambda r: embed(r, batch), rest)

    def body(carry, l):
      h, stacked = lax.optimization_barrier(carry)
      return (layer(_index(stacked, l), h), stacked), h

    (h, _), saved = lax.scan(body, (h0, stacked), jnp.arange(size))
    loss, head_vjp = jax.vjp(lambda r, x: head_loss(r, x, batch), rest, h)
    rest_grad, g_h = head_vjp(jnp.ones_like(loss))
    return loss, saved, embed_vjp, rest_grad, g_h

  def global_norm(stacked, size, saved, embed_vjp, rest_grad, g_h):
    """``‖g‖`` by a backward pass over the saved inputs (no updates)."""

    def body(carry, l):
      g, total, stacked, saved = lax.optimization_barrier(carry)
      _, vjp = jax.vjp(layer, _index(stacked, l), _index(saved, l))
      g_p, g = vjp(g)
      return (g, total + optax.tree.norm(g_p, squared=True), stacked,
              saved), None

    (g_h0, total, _, _), _ = lax.scan(
        body, (g_h, jnp.zeros([], jnp.float32), stacked, saved),
        jnp.arange(size), reverse=True)
    rest_grad = jax.tree.map(jnp.add, rest_grad, embed_vjp(g_h0)[0])
    return jnp.sqrt(total + optax.tree.norm(rest_grad, squared=True))

  def step(params, opt_state, batch):
    if not isinstance(params, Mapping) or stack not in params:
      raise ValueError(f'per_layer_train_step: params must be a dict with the '
                       f'stacked layers under {stack!r}; got keys '
                       f'{list(params) if isinstance(params, dict) else params}.')
    plan = layer_state.plan(tx, params, stack)
    whole = plan.treedef.flatten_up_to(opt_state)
    stacked = params[stack]
    size = jax.tree.leaves(stacked)[0].shape[0]
    rest = {k: v for k, v in params.items() if k != stack}
    split = layer_state.Split.of(params, stack)
    rest_flat = split.parts(params)[1]
    if [jnp.shape(x) for x in jax.tree.leaves(rest)] != [
        jnp.shape(x) for x in rest_flat]:
      raise ValueError('per_layer_train_step: the leaves of the params '
                       f'outside {stack!r} are not in key order.')
    loss, saved, embed_vjp, rest_grad, g_h = forward(
        rest, stacked, size, batch)
    scale = None
    if clip_norm is not None:  # the same forward; one more backward
      norm = global_norm(stacked, size, saved, embed_vjp, rest_grad, g_h)
      scale = jnp.minimum(1.0, clip_norm / jnp.maximum(norm, 1e-38))
    clip = (lambda g: g) if scale is None else (
        lambda g: jax.tree.map(lambda x: (x * scale).astype(x.dtype), g))

    # Shared leaves of the one-layer updates: compared between layers.
    carried_index, shared_index = plan.carried_index, plan.shared_index

    def layer_slices(stacks, l):
      return [lax.dynamic_slice_in_dim(x, l, 1, 0) for x in stacks]

    stack_leaves, stack_def = jax.tree.flatten(stacked)
    num_params = len(stack_leaves)

    # The stacks (the layer params, then the per-layer state leaves) are
    # written in place, one layer per iteration. Layer l's slices are read at
    # the end of the iteration before, after its writes, and carried: nothing
    # reads a whole stack while it is written (XLA would copy every stack on
    # every layer to keep the old value for a fused read).
    def body(carry, l):
      g_h, saved, stacks, slices, shared, same = carry
      saved = lax.optimization_barrier(saved)
      one_p = jax.tree.unflatten(stack_def, slices[:num_params])
      p_l = jax.tree.map(lambda x: x[0], one_p)
      _, vjp = jax.vjp(layer, p_l, _index(saved, l))
      g_p, g_h = vjp(g_h)
      one = lambda t: jax.tree.map(lambda x: x[None], t)
      others = [jnp.zeros((0,) + x.shape[1:], x.dtype) for x in rest_flat]
      grads = split.build(jax.tree.leaves(one(clip(g_p))), others)
      layer_params = split.build(slices[:num_params], others)
      with layer_index.layer(l, size):
        updates, new_state = tx.update(
            grads, plan.layer_state(whole, slices[num_params:]), layer_params)
      new_p = optax.apply_updates(one_p, jax.tree.unflatten(
          stack_def, split.parts(updates)[0]))
      new_leaves = plan.layer_def.flatten_up_to(new_state)
      by_index = {i: x for i, x in zip(plan.layer_map, new_leaves)
                  if i is not None}
      written = [_row_major(x) for x in jax.tree.leaves(new_p)] + [
          by_index[i] for i in carried_index]
      stacks = [lax.dynamic_update_slice_in_dim(x, w.astype(x.dtype), l, 0)
                for x, w in zip(stacks, written)]
      slices = layer_slices(stacks, jnp.maximum(l - 1, 0))
      new_shared = [by_index[i] for i in shared_index]
      first = l == size - 1
      same = same & (first | _all(
          [_equal(a, b) for a, b in zip(shared, new_shared)]))
      return (g_h, saved, stacks, slices, new_shared, same), None

    stacks = stack_leaves + [whole[i] for i in carried_index]
    init = (g_h, saved, stacks, layer_slices(stacks, size - 1),
            [whole[i] for i in shared_index], jnp.asarray(True))
    (g_h0, _, stacks, _, shared, same), _ = lax.scan(
        body, init, jnp.arange(size), reverse=True)
    new_stack, carried = stacks[:num_params], stacks[num_params:]

    # The other leaves, once, with the stack zero-size.
    rest_grad = clip(jax.tree.map(jnp.add, rest_grad, embed_vjp(g_h0)[0]))
    zero_stack = lambda x: jnp.zeros((0,) + x.shape[1:], x.dtype)
    empty = [zero_stack(x) for x in new_stack]
    rest_grad = jax.tree.leaves(rest_grad)
    updates, new_rest = tx.update(
        split.build(empty, rest_grad), plan.rest_state(whole),
        split.build(empty, rest_flat))
    new_rest_params = optax.apply_updates(rest_flat, split.parts(updates)[1])
    new_params = split.build(new_stack, new_rest_params)

    rest_values = plan.rest_values(new_rest)
    for x, i in zip(shared, shared_index):
      if i in rest_values:
        same = same & _equal(x, rest_values[i])
    new_state = plan.new_state(whole, carried, shared, new_rest)
    if check_shared:
      return new_params, new_state, loss, same
    return new_params, new_state, loss

  return step


def _all(checks: list[jax.Array]) -> jax.Array:
  """``all(checks)`` as one bool array (True for no checks)."""
  out = jnp.asarray(True)
  for check in checks:
    out = out & check
  return out
