"""How the whole-tree optimizer state maps onto one-layer updates.

The state of :func:`~subspace_optax.per_layer_train_step` is the ordinary
``tx.init(params)``. :func:`plan` finds, from shapes alone
(``jax.eval_shape``), which state leaves carry the stack axis (their leading
axis grows with one more layer) and how the state of a one-layer update
(stack leaves with a leading axis of 1, other leaves zero-size) and of the
final update of the other leaves (stack leaves zero-size) are made of the
whole state's leaves: a slice of a per-layer leaf, a shared leaf as it is, or
a zero-size placeholder.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from subspace_optax._src import utils
from subspace_optax._src.pipeline import separability


def _zero_size(x) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct((0,) + tuple(x.shape[1:]), x.dtype)


class Plan(NamedTuple):
  """How the whole-tree state maps onto the one-layer and final updates."""

  treedef: Any  # of the whole state
  carries: list[bool]  # per whole-state leaf: has the stack axis (axis 0)
  layer_def: Any  # treedef of the one-layer state (MaskedNode as a leaf)
  layer_map: list[Any]  # per one-layer leaf: whole-state index, or None
  layer_shapes: list[Any]  # per one-layer leaf: its ShapeDtypeStruct/Masked
  rest_def: Any
  rest_map: list[Any]
  rest_shapes: list[Any]

  @property
  def carried_index(self) -> list[int]:
    """The whole-state leaves with the stack axis."""
    return [i for i, c in enumerate(self.carries) if c]

  def layer_state(self, whole: list, slices: list):
    """The state of a one-layer update: ``slices`` (one per
    :attr:`carried_index` leaf) and the shared leaves of ``whole``."""
    by_index = dict(zip(self.carried_index, slices))
    return self.layer_def.unflatten([
        placeholder(s) if i is None else by_index.get(i, whole[i])
        for s, i in zip(self.layer_shapes, self.layer_map)])

  @property
  def shared_index(self) -> list[int]:
    """The whole-state leaves a one-layer update reads and writes whole."""
    return [i for i in self.layer_map if i is not None and not self.carries[i]]

  def rest_state(self, whole: list):
    """The state of the final update of the other leaves."""
    return self.rest_def.unflatten([
        placeholder(s) if i is None else whole[i]
        for s, i in zip(self.rest_shapes, self.rest_map)])

  def rest_values(self, new_rest) -> dict[int, Any]:
    """The whole-state leaves the final update wrote, by index."""
    return {i: x for i, x in zip(self.rest_map,
                                 self.rest_def.flatten_up_to(new_rest))
            if i is not None and not self.carries[i]}

  def new_state(self, whole: list, carried: list, shared: list, new_rest):
    """The whole state after a step: the carried stacks, the one-layer
    updates' shared leaves, and the final update's leaves over them."""
    out = list(whole)
    for i, x in [*zip(self.carried_index, carried),
                 *zip(self.shared_index, shared),
                 *self.rest_values(new_rest).items()]:
      out[i] = x
    return self.treedef.unflatten(out)


def _abstract(tree):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(jnp.shape(x),
                                                     jnp.result_type(x)), tree)


class Split(NamedTuple):
  """The flat leaves of ``params``: which are under ``params[stack]``."""

  treedef: Any
  is_stack: list[bool]

  @classmethod
  def of(cls, params, stack: str) -> 'Split':
    paths, treedef = jax.tree_util.tree_flatten_with_path(params)
    first = lambda path: getattr(path[0], 'key', getattr(path[0], 'name', None))
    is_stack = [first(path) == stack for path, _ in paths]
    if sum(is_stack) != len(jax.tree.leaves(params[stack])):
      raise ValueError(f'per_layer_train_step: cannot find the leaves of '
                       f'params[{stack!r}] in the params tree.')
    return cls(treedef, is_stack)

  def build(self, stack_leaves, rest_leaves):
    """A params-shaped tree from the stack's and the others' leaves."""
    stack_leaves, rest_leaves = iter(stack_leaves), iter(rest_leaves)
    return self.treedef.unflatten(
        [next(stack_leaves) if s else next(rest_leaves) for s in self.is_stack])

  def parts(self, tree):
    flat = self.treedef.flatten_up_to(tree)
    return ([x for x, s in zip(flat, self.is_stack) if s],
            [x for x, s in zip(flat, self.is_stack) if not s])


def with_leaves(params, split: Split, stack_fn, rest_fn):
  """``params`` with ``stack_fn`` on the stack's leaves, ``rest_fn`` on the
  others."""
  stacked, rest = split.parts(params)
  return split.build(map(stack_fn, stacked), map(rest_fn, rest))


def plan(tx, params, stack: str | Split,
         similarity_given: bool = False) -> Plan:
  """The :class:`Plan` of ``tx`` on ``params`` (shapes only).

  Args:
    tx: the transform.
    params: its params (or their shapes).
    stack: the key of ``params`` (a dict) holding the stacked layers, or a
      :class:`Split` naming the stacked leaves.
    similarity_given: the caller gives each one-layer update the similarity
      of the whole stacked leaf's new bases
      (:class:`~subspace_optax._src.pipeline.layer_index.LayerIndex`), so a
      lazy refresh policy records what the whole-tree update records.

  Raises:
    NotLayerSeparableError: ``tx`` or its state cannot be split by layer.
  """
  params = _abstract(params)
  split = stack if isinstance(stack, Split) else Split.of(params, stack)
  sizes = {x.shape[0] for x in split.parts(params)[0]}
  if len(sizes) != 1:
    raise ValueError(f'per_layer_train_step: the leaves of params[{stack!r}] '
                     f'must share one leading (layer) axis; got sizes {sizes}.')
  size = sizes.pop()
  resized = lambda n: with_leaves(
      params, split, lambda x: jax.ShapeDtypeStruct((n,) + x.shape[1:],
                                                   x.dtype), lambda x: x)
  whole = jax.eval_shape(tx.init, params)
  separability.check_separable(tx, whole, similarity_given)
  leaves, treedef = jax.tree.flatten(whole)
  grown = jax.tree.leaves(jax.eval_shape(tx.init, resized(size + 1)))
  carries = []
  for a, b in zip(leaves, grown, strict=True):
    if a.shape == b.shape:
      carries.append(False)
    elif (a.shape[:1], b.shape[:1], a.shape[1:]) == (
        (size,), (size + 1,), b.shape[1:]):
      carries.append(True)
    else:
      raise separability.NotLayerSeparableError(
          f'per_layer_train_step: a state leaf of shape {a.shape} grows to '
          f'{b.shape} with one more layer; only a leading layer axis can be '
          'sliced per layer. Use the whole-tree step.')
  index_tree = treedef.unflatten(range(len(leaves)))

  def mapping(sub_params):
    try:
      sub = jax.eval_shape(tx.init, sub_params)
      jax.eval_shape(tx.update, sub_params, sub, sub_params)
    except ZeroDivisionError as error:
      raise separability.NotLayerSeparableError(
          'per_layer_train_step: the transform fails on the zero-size '
          'placeholders that stand for the leaves outside a one-layer update '
          f'({error!r}); use the whole-tree step.') from error
    shapes, sub_def = jax.tree.flatten(sub, is_leaf=utils.is_masked)
    try:
      where = sub_def.flatten_up_to(index_tree)
    except (ValueError, TypeError) as error:
      raise separability.NotLayerSeparableError(
          'per_layer_train_step: the state of a one-layer tree is not a '
          'part of the whole-tree state; use the whole-tree step. '
          f'({error})') from error
    paths = jax.tree_util.tree_flatten_with_path(sub, is_leaf=utils.is_masked)[0]
    unused = lambda shape: utils.is_masked(shape) or shape.size == 0
    for (path, shape), w in zip(paths, where):
      # An array here but a subtree in the whole state (a zero-size
      # placeholder's state is never read: it may differ in kind).
      if not (isinstance(w, int) or unused(shape)):
        raise separability.NotLayerSeparableError(
            'per_layer_train_step: the optimizer state at '
            f'{jax.tree_util.keystr(path)} is a {type(w).__name__} for '
            'the whole tree but a single array for one layer: the transform '
            'chooses the state by the leaf size (e.g. quantize_moments '
            'keeps leaves under min_size entries in float32, and a stacked '
            "leaf's size is L times one layer's). Make the choice the same "
            "for one layer (quantize_moments(min_size=...) at most one "
            "layer's size) or use the whole-tree step.")
    return sub_def, [None if unused(s) else w
                     for s, w in zip(shapes, where)], shapes

  layer_def, layer_map, layer_shapes = mapping(with_leaves(
      params, split, lambda x: jax.ShapeDtypeStruct((1,) + x.shape[1:],
                                                   x.dtype), _zero_size))
  rest_def, rest_map, rest_shapes = mapping(
      with_leaves(params, split, _zero_size, lambda x: x))
  for shapes, where in ((layer_shapes, layer_map), (rest_shapes, rest_map)):
    for s, i in zip(shapes, where):
      if i is None:
        continue
      expected = ((1,) + leaves[i].shape[1:] if carries[i]
                  else leaves[i].shape)
      if s.shape != expected:
        raise separability.NotLayerSeparableError(
            f'per_layer_train_step: a state leaf of shape {leaves[i].shape} '
            f'is {s.shape} in a one-layer update (expected {expected}); use '
            'the whole-tree step.')
  return Plan(treedef, carries, layer_def, layer_map, layer_shapes,
               rest_def, rest_map, rest_shapes)


def placeholder(shape):
  """Zeros of a zero-size ``ShapeDtypeStruct`` (a ``MaskedNode`` as is)."""
  return shape if utils.is_masked(shape) else jnp.zeros(shape.shape, shape.dtype)


