"""A whole-tree update one layer at a time: no temporary is stack-sized.

The stages of :func:`~subspace_optax.low_rank` run leaf by leaf, and their
full-size work one matrix at a time (:mod:`per_matrix`), but between the
stages a stacked ``(L, m, n)`` leaf still has stack-sized buffers: its new
bases (``L x k x r``), its coefficients ``C`` and the inner optimizer's output
``N`` (``L x r x l`` each). They grow with the number of layers: at
LLaMA-7B (32 layers, rank 1024) ``C`` and ``N`` of one MLP kernel are 8
matrices each. :func:`update` removes them: a ``lax.scan`` over the layers
calls the update on a one-layer tree (the stack's leaves sliced to a leading
axis of 1, the other leaves zero-size), and writes the layer's slice of every
per-layer state leaf back in place into the carried stacks; the other leaves
are updated once at the end, with the stack zero-size. Each layer's update
is written in place of its gradient in the carried gradient stacks, so in a
train step the update tree takes the gradient tree's memory instead of
adding its own (the staged update gets the same from XLA: its gradients die
once projected, before ``QN`` exists). The state is the
ordinary whole-tree state, split by :mod:`layer_state` (the same plan as
:func:`~subspace_optax.per_layer_train_step`, so the result is the
whole-tree update's for every transform that plan accepts; random bases draw
the whole tree's keys through :mod:`layer_index`, and so do the whole
stacked leaf's finiteness and whether every layer's new basis is finite,
which the caller computes before the loop).
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, Mapping, Optional

import jax
import jax.numpy as jnp
from jax import lax

from subspace_optax._src.pipeline import layer_index
from subspace_optax._src.pipeline import layer_state
from subspace_optax._src.pipeline import separability


def stack_of(updates, layouts: list) -> Optional[layer_state.Split]:
  """The projected leaves stacked along axis 0 that one loop can update.

  Those whose first batch axis is axis 0 and whose leading size is that of
  the largest such leaf (more than one layer); None if there are none.
  """
  leaves, treedef = jax.tree.flatten(updates)
  stacked = [lay is not None and lay.batch_axes[:1] == (0,) and x.size > 0
             for x, lay in zip(leaves, layouts)]
  candidates = [(x.size, x.shape[0]) for x, s in zip(leaves, stacked)
                if s and x.shape[0] > 1]
  if not candidates:
    return None
  _, size = max(candidates)
  return layer_state.Split(treedef, [
      s and x.shape[0] == size for x, s in zip(leaves, stacked)])


class Plans:
  """:func:`layer_state.plan` of a transform, cached per gradient shapes;
  None where the transform is not separable over the layers."""

  def __init__(self, tx):
    self._tx = tx
    self._plans: dict[Any, Optional[layer_state.Plan]] = {}

  def get(self, updates, split: layer_state.Split
          ) -> Optional[layer_state.Plan]:
    key = (split.treedef, tuple(split.is_stack),
           tuple((jnp.shape(x), jnp.result_type(x))
                 for x in jax.tree.leaves(updates)))
    if key not in self._plans:
      abstract = jax.tree.map(
          lambda x: jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x)),
          updates)
      try:
        with warnings.catch_warnings():
          warnings.simplefilter('ignore')  # init's warnings, on sub-trees
          self._plans[key] = layer_state.plan(
              self._tx, abstract, split, similarity_given=True)
      except separability.NotLayerSeparableError:
        self._plans[key] = None
    return self._plans[key]


def update(update_fn: Callable[..., Any], split: layer_state.Split,
           plan: layer_state.Plan, updates, state, extra_args: dict,
           finite: Mapping[int, jax.Array],
           refresh_finite: Mapping[int, jax.Array],
           similarity: Mapping[int, jax.Array]):
  """``update_fn(updates, state)`` with the stack of ``split`` one layer at a
  time (``plan`` from :class:`Plans`); same outputs.

  ``finite``, ``refresh_finite`` and ``similarity`` hold, by position in the
  flat tree, what a one-layer update must know of its whole stacked leaf
  (:class:`~subspace_optax._src.pipeline.layer_index.LayerIndex`).
  """
  whole = plan.treedef.flatten_up_to(state)
  stack_grads, rest_grads = split.parts(updates)
  size = stack_grads[0].shape[0]
  carried_index, shared_index = plan.carried_index, plan.shared_index
  zero_size = lambda xs: [jnp.zeros((0,) + x.shape[1:], x.dtype) for x in xs]

  slice_at = lambda xs, l: [lax.dynamic_slice_in_dim(x, l, 1, 0) for x in xs]

  # The per-layer state stacks are written in place. Layer l's slices are
  # read at the end of the iteration before, after its writes, and carried:
  # nothing reads a stack while it is written (XLA would copy the stack to
  # keep the old value for a fused read).
  def body(carry, l):
    # The gradients are carried through a barrier, not closed over: XLA
    # would otherwise convert a whole bfloat16 stack to float32 ahead of the
    # loop.
    grads, stacks, slices, _ = carry
    grads = lax.optimization_barrier(grads)
    with layer_index.layer(l, size, finite, refresh_finite, similarity):
      layer_updates, new_state = update_fn(
          split.build(slice_at(grads, l), zero_size(rest_grads)),
          plan.layer_state(whole, slices),
          None, **extra_args)
    by_index = {i: x for i, x in zip(
        plan.layer_map, plan.layer_def.flatten_up_to(new_state))
                if i is not None}
    stacks = [lax.dynamic_update_slice_in_dim(x, by_index[i].astype(x.dtype),
                                              l, 0)
              for x, i in zip(stacks, carried_index)]
    slices = slice_at(stacks, jnp.minimum(l + 1, size - 1))
    shared = [by_index[i] for i in shared_index]
    # Layer l's update takes the place of its gradient in the carried stacks:
    # the update tree reuses the gradient tree's memory (XLA writes in place),
    # as in the staged update, whose projected gradients die before QN exists.
    grads = [lax.dynamic_update_slice_in_dim(g, u.astype(g.dtype), l, 0)
             for g, u in zip(grads, split.parts(layer_updates)[0])]
    return (grads, stacks, slices, shared), None

  stacks = [whole[i] for i in carried_index]
  init = (stack_grads, stacks, slice_at(stacks, 0),
          [whole[i] for i in shared_index])
  (stack_updates, carried, _, shared), _ = lax.scan(
      body, init, jnp.arange(size))

  # The other leaves, once, with the stack zero-size.
  rest_updates, new_rest = update_fn(
      split.build(zero_size(stack_grads), rest_grads), plan.rest_state(whole),
      None, **extra_args)

  return (split.build(stack_updates, split.parts(rest_updates)[1]),
          plan.new_state(whole, carried, shared, new_rest))
