"""Checks of :func:`~subspace_optax.low_rank`'s input, each a named error.

They run while tracing, on shapes only: a transform that needs ``params``
inside the pipeline, complex leaves, and gradients that do not fit the state
(another tree, rank or dimension numbers than at ``init``).
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from subspace_optax._src import utils
from subspace_optax._src.pipeline import layout as layout_lib
from subspace_optax._src.pipeline import separability


def abstract(tree):
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(utils.shape_of(x), jnp.result_type(x))
      if hasattr(x, 'dtype') else x, tree)


# What to do instead of each whole-tree optax wrapper
# (separability.whole_tree_wrapper) as a residual path.
_WHOLE_TREE = {
    'clip_by_global_norm': 'clip the whole update after low_rank, '
                           'optax.chain(low_rank(...), '
                           'optax.clip_by_global_norm(max_norm)), or per '
                           'matrix (optax.clip_by_block_rms)',
    'apply_if_finite': 'wrap the whole optimizer in optax.apply_if_finite',
    'MultiSteps': 'wrap the whole optimizer in optax.MultiSteps',
}


def check_residual(residual_tx, layouts: list) -> None:
  """A named error for a residual path that cannot run one matrix at a time.

  ``low_rank`` applies its residual transform to each matrix on its own (an
  oriented ``(k, l)`` matrix with its own state), so the known whole-tree
  optax transforms are refused rather than silently applied per matrix, and
  one that uses ``params`` is refused as in :func:`check_params_free`.
  """
  wrapper = separability.whole_tree_wrapper(residual_tx)
  if wrapper is not None:
    raise ValueError(
        f'low_rank: the residual transform contains {wrapper}, but the '
        'residual path runs on each matrix on its own (one (k, l) matrix '
        f'of G - QQᵀG at a time), not on the whole tree; '
        f'{_WHOLE_TREE[wrapper]}.')
  lay = next((lay for lay in layouts if lay is not None), None)
  if lay is None:
    return
  matrix = jax.ShapeDtypeStruct((lay.projected_dim, lay.other_dim), jnp.float32)
  coefficients = jax.ShapeDtypeStruct((lay.rank, lay.other_dim), jnp.float32)
  check_params_free(
      residual_tx, 'residual', matrix, jax.eval_shape(residual_tx.init, matrix),
      coefficients=coefficients, subspace_updates=coefficients,
      gradients=matrix)


def check_params_free(tx, role: str, updates, state, **extra_args) -> None:
  """Fail at init, clearly, if ``tx`` needs ``params`` (it gets None here).

  ``tx.update`` is traced abstractly with ``params=None``; if that fails but
  succeeds with params, the transform uses params. Any other failure (e.g. a
  missing extra argument) is left for the real update to report.
  """
  updates, state = abstract(updates), abstract(state)

  def fails(params) -> Optional[Exception]:
    try:
      jax.eval_shape(
          lambda u, s, p: tx.update(u, s, p, **extra_args), updates, state,
          params)
    except Exception as error:  # pylint: disable=broad-except
      return error
    return None

  error = fails(None)
  if error is None or fails(updates) is not None:
    return
  raise ValueError(
      f'low_rank: the {role} transform uses `params`, but inside low_rank it '
      'receives params=None: it works on the low-rank coefficients C = QᵀG '
      '(or the residual G - QQᵀG), which have no parameters of their shape. '
      'Transforms that use params, such as optax.add_decayed_weights, belong '
      'outside low_rank, later in the chain: optax.chain(low_rank(inner, ...), '
      'optax.add_decayed_weights(weight_decay), '
      f'optax.scale_by_learning_rate(learning_rate)). ({error})') from error


def owner_path(path, gradient_paths):
  """The gradient leaf path that ``path`` (in the inner state) ends with."""
  path = tuple(path)
  matches = [p for p in gradient_paths
             if 0 < len(p) <= len(path) and path[len(path) - len(p):] == p]
  return max(matches, key=len, default=None)


def check_state_fits(updates, layouts, basis_leaves, basis_shapes,
                      inner_state, expected_inner_state) -> None:
  """Each gradient leaf must fit the basis and inner state held for it.

  The basis fixes the projected dimension ``k``; the other dimension ``l``
  lives only in the inner state (coefficients are ``rank x l``), so the inner
  state is compared with ``expected_inner_state`` (abstract, from the
  gradients' shapes).
  """
  fix = ('The state was initialised for other params, rank or '
         'dimension_numbers; call init again with params shaped like the '
         'gradients, or restore a checkpoint saved with this configuration.')
  gradients = jax.tree_util.tree_flatten_with_path(updates)[0]
  for (path, g), lay, b in zip(gradients, layouts, basis_leaves):
    has_basis = not utils.is_masked(b)
    name = layout_lib.path_name(path)
    if lay is None and has_basis:
      raise ValueError(
          f'{name}: the gradient of shape {utils.shape_of(g)} is not projected, but '
          f'the state holds a basis for it. {fix}')
    if lay is None:
      continue
    if not has_basis:
      raise ValueError(
          f'{name}: the gradient of shape {utils.shape_of(g)} is projected, but the '
          f'state holds no basis for it. {fix}')
    expected = [lay.batch_shape + s for s in basis_shapes(
        lay.projected_dim, lay.other_dim, lay.rank)]
    actual = [utils.shape_of(a) for a in jax.tree.leaves(b)]
    if expected != actual:
      raise ValueError(
          f'{name}: the gradient of shape {utils.shape_of(g)} (rank {lay.rank}) '
          f'needs a basis of shape {expected}, but the state holds {actual}. '
          f'{fix}')
  expected = jax.tree_util.tree_flatten_with_path(expected_inner_state)[0]
  actual = jax.tree.leaves(inner_state)
  if len(expected) != len(actual):
    return  # Another structure: left for the inner optimizer to report.
  shapes = {tuple(path): utils.shape_of(g) for path, g in gradients}
  for (path, e), a in zip(expected, actual):
    if utils.shape_of(e) != utils.shape_of(a):
      owner = owner_path(path, shapes)
      leaf = ('' if owner is None else
              f'{layout_lib.path_name(owner)}: the gradient of shape '
              f'{shapes[owner]} needs ')
      raise ValueError(
          f'{leaf}inner optimizer state {layout_lib.path_name(path)} of shape '
          f'{utils.shape_of(e)}, but the state holds {utils.shape_of(a)}. {fix}')


def check_real(leaves, layouts) -> None:
  """Projected leaves must be real: bases and moments are real matrices."""
  for p, lay in zip(leaves, layouts):
    if lay is not None and jnp.issubdtype(p.dtype, jnp.complexfloating):
      raise ValueError(
          f'{lay.path}: low_rank cannot project the complex leaf of shape '
          f'{lay.shape} and dtype {p.dtype}; its bases and moments are real. '
          'Exclude the leaf from projection (None at its place in '
          '`dimension_numbers`; the inner optimizer then runs on it at full '
          'size), or keep its real and imaginary parts as two real params.')


def state_leaves(treedef, state) -> tuple[list, list]:
  """The flat basis and refresh states, with a named error on a mismatch."""
  try:
    return (treedef.flatten_up_to(state.basis),
            treedef.flatten_up_to(state.refresh))
  except (ValueError, TypeError) as error:
    raise ValueError(
        'The updates do not have the structure of the params the state was '
        'initialised with; call init again with params shaped like the '
        f'gradients. ({error})') from error


