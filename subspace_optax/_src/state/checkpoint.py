"""Checking that a saved optimizer state fits an optimizer before restoring it.

Orbax restores a state into a target built by ``jax.eval_shape(tx.init,
params)``. When the checkpoint was written by another configuration (another
rank, side, dimension numbers, method or chain order) its errors name neither
the leaf nor the cause, and one of them suggests disabling the shape check,
which would silently truncate a basis. :func:`check_compatible` compares the
two trees first and names every leaf that differs.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np


def _key_name(entry) -> str:
  for attribute in ('name', 'key', 'idx'):
    if hasattr(entry, attribute):
      return str(getattr(entry, attribute))
  return str(entry)


def _has_shape(x) -> bool:
  return hasattr(x, 'shape') and hasattr(x, 'dtype')


def _flat(tree) -> dict[str, tuple[tuple[int, ...], str]]:
  """``{'0/basis/w': (shape, dtype name)}`` for every array-like leaf."""
  leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_has_shape)[0]
  return {
      '/'.join(_key_name(k) for k in path): (
          tuple(leaf.shape), np.dtype(leaf.dtype).name)
      for path, leaf in leaves if _has_shape(leaf)
  }


def check_compatible(abstract_state: Any, saved: Any) -> None:
  """Raise a ``ValueError`` naming every leaf where ``saved`` does not fit.

  Args:
    abstract_state: the state the optimizer expects, e.g.
      ``jax.eval_shape(tx.init, params)`` (what orbax restores into).
    saved: what the checkpoint holds: orbax metadata
      (``ocp.StandardCheckpointer().metadata(path)``, its ``item_metadata``
      or ``.tree``), a restored state, or any pytree whose leaves have
      ``shape`` and ``dtype``. Containers may differ in kind (orbax metadata
      turns NamedTuples into dicts); leaves are matched by key path.

  Example::

    abstract = jax.eval_shape(tx.init, params)
    so.check_compatible(abstract, checkpointer.metadata(path))
    state = checkpointer.restore(path, abstract)

  Returns:
    None; raises ``ValueError`` listing each leaf that does not fit.

  Examples:
    >>> import jax
    >>> import jax.numpy as jnp
    >>> import subspace_optax as so
    >>> tx = so.galore(1e-3, rank=2)
    >>> abstract = jax.eval_shape(tx.init, {'w': jnp.ones((8, 6))})
    >>> so.check_compatible(abstract, abstract)  # fits: returns None
    >>> other = jax.eval_shape(tx.init, {'w': jnp.ones((8, 5))})
    >>> so.check_compatible(abstract, other)
    Traceback (most recent call last):
    ...
    ValueError: ...
  """
  for attribute in ('item_metadata', 'tree'):
    if hasattr(saved, attribute) and not _has_shape(saved):
      saved = getattr(saved, attribute)
  expected, found = _flat(abstract_state), _flat(saved)
  problems = []
  for path in sorted(set(expected) | set(found)):
    if path not in found:
      problems.append(f'  {path}: missing from the checkpoint '
                      f'(this optimizer holds {expected[path]})')
    elif path not in expected:
      problems.append(f'  {path}: in the checkpoint {found[path]}, but not '
                      'in this optimizer\'s state')
    elif expected[path] != found[path]:
      problems.append(f'  {path}: checkpoint {found[path]}, this optimizer '
                      f'{expected[path]}')
  if problems:
    raise ValueError(
        'The checkpoint does not fit this optimizer state ((shape, dtype) per '
        'leaf):\n' + '\n'.join(problems) + '\nIt was saved with another '
        'configuration (rank, side, dimension_numbers, method or chain order) '
        'or other params. Restore it with the optimizer it was saved with, or '
        'start a fresh state with tx.init(params). Do not disable orbax\'s '
        'shape check: a truncated or padded basis is silently wrong.')
