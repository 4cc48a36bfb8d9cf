"""Which optimizer-state fields are moments, and how to map over them.

One table, used by every transform that moves moments: the subspace pipeline
(``on_refresh='reset'``/``'transport'``), :func:`reset_moments` and the Adam
cores of the presets.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Field names of first (linear in the gradient) and second (quadratic) moments.
FIRST_MOMENTS = ('mu', 'trace', 'momentum')
SECOND_MOMENTS = ('nu',)


def map_moments(inner_state, treedef, shapes, fn):
  """Apply ``fn(is_second_moment, flat_leaves) -> flat_leaves`` to every
  subtree of ``inner_state`` shaped like the coefficients tree.

  Second moments are recognised by a field name in :data:`SECOND_MOMENTS`.
  """

  def matches(x) -> bool:
    try:
      if jax.tree.structure(x) != treedef:
        return False
    except Exception:  # pylint: disable=broad-except
      return False
    return [jnp.shape(v) for v in treedef.flatten_up_to(x)] == shapes

  def visit(path, sub):
    if not matches(sub):
      return sub
    second = any(getattr(k, 'name', None) in SECOND_MOMENTS for k in path)
    return treedef.unflatten(fn(second, treedef.flatten_up_to(sub)))

  return jax.tree_util.tree_map_with_path(visit, inner_state, is_leaf=matches)
