"""Per-leaf report of an optimizer state: projected or not, rank, bytes.

``print(subspace_optax.summary(tx, params))`` shows, for every parameter leaf,
whether a low-rank transform projects it, the shape of its basis, its rank and
the optimizer-state bytes it holds against what ``optax.adamw`` would hold
(two moments in the parameter's dtype). Nothing is allocated: the state is
built with ``jax.eval_shape``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
import numpy as np
import optax

from subspace_optax._src import utils
from subspace_optax._src.pipeline import layout as layout_lib
from subspace_optax._src.pipeline import low_rank as low_rank_lib
from subspace_optax._src.state import sizes


@dataclasses.dataclass(frozen=True)
class LeafSummary:
  """One parameter leaf of a :class:`Summary`."""

  path: str
  shape: tuple[int, ...]
  dtype: str
  projected: bool
  basis_shapes: tuple[tuple[int, ...], ...]  # arrays of the basis state
  rank: Optional[int]  # None: not projected (or not readable from the state)
  state_bytes: int  # optimizer state held for this leaf
  adamw_bytes: int  # two moments in the param's dtype


@dataclasses.dataclass(frozen=True)
class Summary:
  """What :func:`summary` returns; ``str()`` renders a table."""

  leaves: tuple[LeafSummary, ...]
  other_bytes: int  # state not tied to one leaf (step counts, ...)

  @property
  def state_bytes(self) -> int:
    return sum(leaf.state_bytes for leaf in self.leaves) + self.other_bytes

  @property
  def adamw_bytes(self) -> int:
    return sum(leaf.adamw_bytes for leaf in self.leaves)

  def __str__(self) -> str:
    header = ('leaf', 'shape', 'projected', 'basis', 'rank', 'state B',
              'AdamW B', 'ratio')
    rows = [header]
    for leaf in self.leaves:
      rows.append((
          leaf.path, 'x'.join(map(str, leaf.shape)) or 'scalar',
          'yes' if leaf.projected else 'no',
          ' + '.join('x'.join(map(str, s)) or 'scalar'
                     for s in leaf.basis_shapes) or '-',
          '-' if leaf.rank is None else str(leaf.rank),
          f'{leaf.state_bytes:,}', f'{leaf.adamw_bytes:,}',
          _ratio(leaf.state_bytes, leaf.adamw_bytes)))
    rows.append(('(other)', '', '', '', '', f'{self.other_bytes:,}', '', ''))
    rows.append(('total', '', '', '', '', f'{self.state_bytes:,}',
                 f'{self.adamw_bytes:,}',
                 _ratio(self.state_bytes, self.adamw_bytes)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ['  '.join(cell.ljust(w) if i < 5 else cell.rjust(w)
                       for i, (cell, w) in enumerate(zip(row, widths)))
             for row in rows]
    lines.insert(1, '-' * len(lines[0]))
    return '\n'.join(lines)


def _ratio(state: int, adamw: int) -> str:
  return f'{state / adamw:.3f}' if adamw else '-'


def _is_subspace_state(x) -> bool:
  return isinstance(x, low_rank_lib.SubspaceState)


def _params_shaped(treedef):
  """Predicate: ``x`` is a tree with the structure of the params (leaves may
  be subtrees, e.g. a basis state or ``MaskedNode``)."""

  def matches(x) -> bool:
    if isinstance(x, (jax.ShapeDtypeStruct, jax.Array, np.ndarray)):
      return treedef.num_leaves == 1 and treedef.num_nodes == 1
    try:
      treedef.flatten_up_to(x)
    except (ValueError, TypeError):
      return False
    return True

  return matches


def _children(node) -> list[Any]:
  """The direct children of a pytree node (none for a leaf)."""
  children = jax.tree_util.tree_flatten(
      node, is_leaf=lambda x: x is not node)[0]
  return [] if children == [node] else children


def summary(tx: optax.GradientTransformation, params: Any) -> Summary:
  """Per-leaf optimizer-state report of ``tx`` on ``params``.

  Every subtree of the state shaped like ``params`` (moments, bases, refresh
  schedules, residual states) is attributed leaf by leaf; what remains (step
  counts, hyper-parameters) is ``other_bytes``. A leaf is *projected* when a
  :func:`~subspace_optax.low_rank` state inside ``tx`` holds a basis for it;
  its rank is read from the low-rank moments (shape ``(*batch, rank, l)``).

  Example::

    print(subspace_optax.summary(subspace_optax.galore(1e-3, rank=64), params))

  Args:
    tx: the optax transformation.
    params: the parameters (arrays or ``jax.ShapeDtypeStruct``).

  Returns:
    A :class:`Summary`: one row per leaf (``.leaves``), the totals
    ``.state_bytes`` and ``.adamw_bytes``; ``str()`` renders a table.

  Examples:
    >>> import jax.numpy as jnp
    >>> import subspace_optax as so
    >>> params = {'w': jnp.ones((64, 32))}
    >>> report = so.summary(so.galore(1e-3, rank=4), params)
    >>> report.leaves[0].projected, report.leaves[0].rank
    (True, 4)
  """
  params = utils.unbox(params)
  state = jax.eval_shape(tx.init, params)
  path_leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
  count = len(path_leaves)
  per_leaf = [0] * count
  basis_of: list[Any] = [None] * count
  ranks: list[Optional[int]] = [None] * count
  matches = _params_shaped(treedef)

  def attribute(node, read_ranks: bool) -> None:
    for i, sub in enumerate(treedef.flatten_up_to(node)):
      per_leaf[i] += sizes.state_bytes(sub)
      for a in jax.tree.leaves(sub) if read_ranks else ():
        shape = tuple(np.shape(a))
        if len(shape) >= 2 and shape != tuple(np.shape(path_leaves[i][1])):
          ranks[i] = ranks[i] or shape[-2]

  def walk(node) -> None:
    if _is_subspace_state(node):
      for i, b in enumerate(treedef.flatten_up_to(node.basis)):
        if not utils.is_masked(b):
          basis_of[i] = b
      attribute(node.basis, read_ranks=False)
      attribute(node.refresh, read_ranks=False)
      walk(node.inner_state)
      walk(node.residual_state)
    elif matches(node):
      attribute(node, read_ranks=True)
    else:
      for child in _children(node):
        walk(child)

  walk(state)
  leaves = []
  for i, (path, p) in enumerate(path_leaves):
    projected = basis_of[i] is not None
    leaves.append(LeafSummary(
        path=layout_lib.path_name(path), shape=tuple(np.shape(p)),
        dtype=str(np.dtype(p.dtype)) if hasattr(p, 'dtype') else '-',
        projected=projected,
        basis_shapes=tuple(tuple(np.shape(a)) for a in jax.tree.leaves(
            basis_of[i])) if projected else (),
        rank=ranks[i] if projected else None,
        state_bytes=per_leaf[i],
        adamw_bytes=2 * sizes.state_bytes(p)))
  total = sizes.state_bytes(state)
  return Summary(tuple(leaves), total - sum(per_leaf))
