"""Which transforms can be applied one layer at a time, and named errors.

:func:`~subspace_optax.per_layer_train_step` updates each layer of a scanned
stack before the gradients of the layers below it exist. A transform that
needs the whole gradient tree first cannot be run so: global-norm clipping,
``apply_if_finite``, ``MultiSteps``, and a lazy refresh policy (its period
grows from the basis similarity averaged over all layers of a stacked leaf).
:func:`check_separable` finds them (optax wrappers by the qualified names of
the functions the transform closes over, the rest by their state) and raises
:class:`NotLayerSeparableError` saying what to use instead.
"""

from __future__ import annotations

import types
from typing import Any, Optional

import jax
import optax

from subspace_optax._src.refresh import lazy as lazy_lib


class NotLayerSeparableError(ValueError):
  """The transform needs the whole gradient tree before any layer update."""


# Optax wrappers found in the transform (by the qualified name of a function
# it closes over) and what to use instead.
_NOT_SEPARABLE = {
    'clip_by_global_norm': (
        'clip_by_global_norm needs the global norm of every gradient before '
        'the first layer is updated. Leave it out of the transform and pass '
        'per_layer_train_step(..., clip_norm=max_norm), which computes the '
        'norm in a first backward pass (exact), or clip per leaf '
        '(optax.clip_by_block_rms).'),
    'apply_if_finite': (
        'apply_if_finite skips the step if any gradient is non-finite, which '
        'is known only after the last layer has been updated. Use the '
        'whole-tree step (low_rank never refreshes a basis from a '
        'non-finite gradient).'),
    'MultiSteps': (
        'MultiSteps accumulates whole gradient trees over calls. Use the '
        'whole-tree step with optax.MultiSteps (or pass a larger batch).'),
}


def _closure_names(obj: Any, depth: int = 0, seen=None) -> set[str]:
  """Qualified names of the functions reachable from ``obj``'s closures."""
  seen = set() if seen is None else seen
  if depth > 12 or id(obj) in seen:
    return set()
  seen.add(id(obj))
  names = set()
  children: list[Any] = []
  if isinstance(obj, (types.FunctionType, types.MethodType)):
    names.add(getattr(obj, '__qualname__', ''))
    if isinstance(obj, types.MethodType):
      names.add(type(obj.__self__).__name__)
      children.append(obj.__func__)
    children += [c.cell_contents for c in (obj.__closure__ or ())
                 if _has_contents(c)]
  elif hasattr(obj, 'func') and hasattr(obj, 'keywords'):  # partial
    children += [obj.func, *obj.args, *obj.keywords.values()]
  elif isinstance(obj, (tuple, list)):
    children += list(obj)
  elif isinstance(obj, dict):
    children += list(obj.values())
  for child in children:
    names |= _closure_names(child, depth + 1, seen)
  return names


def _has_contents(cell) -> bool:
  try:
    cell.cell_contents  # pylint: disable=pointless-statement
    return True
  except ValueError:  # an empty cell
    return False


def whole_tree_wrapper(tx: optax.GradientTransformation) -> Optional[str]:
  """The first optax wrapper of ``_NOT_SEPARABLE`` that ``tx`` closes over
  (it needs the whole gradient tree at once), or None."""
  names = _closure_names(tx.update)
  return next((wrapper for wrapper in _NOT_SEPARABLE if any(
      n == wrapper or n.startswith(wrapper + '.') for n in names)), None)


def check_separable(tx: optax.GradientTransformation, state: Any,
                    similarity_given: bool = False) -> None:
  """Raises :class:`NotLayerSeparableError` for the known non-separable parts.

  Args:
    tx: the transform.
    state: its state (or its ``jax.eval_shape``).
    similarity_given: each one-layer update is given the whole stacked
      leaf's basis similarity (the layer loop), which a lazy refresh policy
      needs.
  """
  wrapper = whole_tree_wrapper(tx)
  if wrapper is not None:
    raise NotLayerSeparableError(
        f'per_layer_train_step: {_NOT_SEPARABLE[wrapper]}')
  nodes = jax.tree.leaves(
      state, is_leaf=lambda x: isinstance(
          x, (lazy_lib.LazyState, optax.ApplyIfFiniteState,
              optax.MultiStepsState)))
  for node in nodes:
    if isinstance(node, lazy_lib.LazyState) and not similarity_given:
      raise NotLayerSeparableError(
          'per_layer_train_step: a lazy refresh policy (q_galore\'s default) '
          'grows a stacked leaf\'s period from the basis similarity averaged '
          'over all its layers, which is known only after the last layer. '
          'Pass refresh=<int> (a fixed period) or use the whole-tree step.')
    if isinstance(node, optax.ApplyIfFiniteState):
      raise NotLayerSeparableError(
          f'per_layer_train_step: {_NOT_SEPARABLE["apply_if_finite"]}')
    if isinstance(node, optax.MultiStepsState):
      raise NotLayerSeparableError(
          f'per_layer_train_step: {_NOT_SEPARABLE["MultiSteps"]}')


