"""The protected-subspace memory: its data structure and shapes.

Per matrix leaf (oriented ``(*batch, m, n)``, rows = the reduction or input
axes), a :class:`ProtectedSubspace` holds orthonormal columns ``U`` (left,
``m x c``) and/or ``V`` (right, ``n x c``) of static capacity plus fill counts;
unused columns are zero. Static shapes mean a jitted step never retraces when
the memory changes between tasks, and orbax saves it with the optimizer state.
Leaves that are not matrices hold ``optax.MaskedNode()``.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax

from subspace_optax._src import utils
from subspace_optax._src.pipeline import layout as layout_lib

MODES = ('two_sided', 'left', 'right', 'block')
# Largest |QᵀQ - I| (float32) accepted for a memory that is stored as given.
ORTHONORMALITY_TOLERANCE = 1e-4
Capacity = Union[int, float, tuple, Any]


class ProtectedSubspace(NamedTuple):
  """Protected directions of one (batch of) weight matrices.

  Attributes:
    left: ``(*batch, m, c_left)`` orthonormal columns on the input (reduction)
      side, unused columns zero; ``MaskedNode()`` when the side is not used.
    right: ``(*batch, n, c_right)`` orthonormal columns on the output side.
    left_count: ``(*batch,)`` int32, how many columns of ``left`` are filled.
    right_count: ``(*batch,)`` int32, how many columns of ``right`` are filled.
  """

  left: Any
  right: Any
  left_count: Any
  right_count: Any


class OrthogonalState(NamedTuple):
  """State of :func:`orthogonal_to`: a :class:`ProtectedSubspace` per matrix
  leaf (``MaskedNode()`` for leaves that are not matrices), and the state of
  the wrapped ``inner`` optimizer (``optax.EmptyState()`` without one)."""

  memory: Any
  inner: Any = optax.EmptyState()


def is_memory_leaf(x) -> bool:
  return isinstance(x, (ProtectedSubspace, optax.MaskedNode)) or x is None


def matrix_layouts(params, dimension_numbers=None) -> list:
  """Flat list (params leaf order) of row-oriented layouts or ``None``.

  The oriented view of every matrix is ``(*batch, m, n)`` with ``m`` the
  reduction (input) axes, so ``left`` bases act on rows and ``right`` bases on
  columns whatever the shape.
  """
  layouts = layout_lib.leaf_layouts(params, dimension_numbers, 'left', 1)
  # Flattened up to the params' structure, so a None params leaf (an empty
  # subtree, no leaf) gets no entry.
  return jax.tree.structure(params).flatten_up_to(layouts)


def mode_sides(mode: str) -> tuple[bool, bool]:
  if mode not in MODES:
    raise ValueError(f'`mode` must be one of {MODES}, got {mode!r}.')
  return mode in ('two_sided', 'left', 'block'), mode in (
      'two_sided', 'right', 'block')


def resolve_capacity(capacity: Any, dim: int, side: str, path: str) -> int:
  if isinstance(capacity, bool) or not isinstance(capacity, (int, float)):
    raise TypeError(
        f'`capacity` must be an int (columns) or a float fraction in (0, 1] of '
        f'the side\'s dimension, got {capacity!r}.')
  if isinstance(capacity, float):
    if not 0.0 < capacity <= 1.0:
      raise ValueError(f'`capacity`={capacity} as a fraction must lie in (0, 1].')
    return max(1, math.ceil(capacity * dim - 1e-9))
  if capacity <= 0:
    raise ValueError(f'`capacity` must be positive, got {capacity} ({path}, '
                     f'{side}).')
  return min(capacity, dim)


def split_capacity(capacity: Capacity) -> tuple[Any, Any]:
  if isinstance(capacity, tuple):
    if len(capacity) != 2:
      raise ValueError('`capacity` as a tuple must be (left, right).')
    return capacity
  return capacity, capacity


def empty_memory(
    params,
    *,
    mode: str = 'two_sided',
    capacity: Capacity = 1.0,
    dimension_numbers: Any = None,
):
  """An empty protected-subspace memory shaped for ``params``.

  Args:
    params: the parameters (arrays, ``ShapeDtypeStruct`` or nnx Variables).
    mode: which sides are held (see :func:`orthogonal_to`).
    capacity: columns per side: an int (clamped to the side's dimension), a
      float fraction in (0, 1] of the side's dimension (``m`` for left, ``n``
      for right), a pair ``(left, right)`` of those, or a callable
      ``(m, n) ->`` any of those (e.g. ``lambda m, n: int(0.8 * min(m, n))``).
    dimension_numbers: as in :func:`subspace_optax.low_rank`; leaves that are
      not matrices hold ``MaskedNode()``.

  Returns:
    A pytree with the structure of ``params`` whose matrix leaves are
    :class:`ProtectedSubspace` with zero columns and zero counts.

  Examples:
    >>> import jax.numpy as jnp
    >>> from subspace_optax import continual as cl
    >>> memory = cl.empty_memory({'w': jnp.ones((6, 4))}, mode='left',
    ...                          capacity=2)
    >>> memory['w'].left.shape, int(memory['w'].left_count)
    ((6, 2), 0)
  """
  use_left, use_right = mode_sides(mode)
  params = utils.unbox(params)
  treedef = jax.tree.structure(params)
  out = []
  for lay in matrix_layouts(params, dimension_numbers):
    if lay is None:
      out.append(optax.MaskedNode())
      continue
    left_capacity, right_capacity = split_capacity(
        capacity(lay.rows, lay.columns) if callable(capacity) else capacity)
    batch = lay.batch_shape
    fields = []
    for use, dim, cap, side in ((use_left, lay.rows, left_capacity, 'left'),
                                (use_right, lay.columns, right_capacity, 'right')):
      if not use:
        fields.append((optax.MaskedNode(), optax.MaskedNode()))
        continue
      columns = resolve_capacity(cap, dim, side, lay.path)
      fields.append((jnp.zeros(batch + (dim, columns), jnp.float32),
                     jnp.zeros(batch, jnp.int32)))
    (left, left_count), (right, right_count) = fields
    out.append(ProtectedSubspace(left, right, left_count, right_count))
  return treedef.unflatten(out)


def flat_memory(memory, treedef, what: str) -> list:
  try:
    return treedef.flatten_up_to(memory)
  except (ValueError, TypeError) as error:
    raise ValueError(
        f'The {what} does not have the structure of the params (a '
        'ProtectedSubspace or MaskedNode() per params leaf); build it with '
        f'empty_memory/sculpt_memory/gpm_memory from the same params. ({error})'
    ) from error


def check_side(array, batch, dim, path, side):
  shape = tuple(jnp.shape(array))
  if len(shape) != len(batch) + 2 or shape[:-1] != batch + (dim,):
    raise ValueError(
        f'{path}: the protected-subspace memory\'s {side} basis has shape '
        f'{shape}, which does not fit this leaf: expected {batch + (dim,)} + '
        '(capacity,) (batch axes, the side\'s dimension, columns).')


def check_memory(memory, params, dimension_numbers=None) -> list:
  """Validate ``memory`` against ``params``; returns its flat leaves.

  Raises a ``ValueError`` naming the leaf path when a memory leaf does not fit.
  """
  params = utils.unbox(params)
  treedef = jax.tree.structure(params)
  memory_leaves = flat_memory(memory, treedef, 'memory')
  for lay, mem in zip(matrix_layouts(params, dimension_numbers), memory_leaves):
    if lay is None:
      continue
    if not isinstance(mem, ProtectedSubspace):
      raise ValueError(
          f'{lay.path}: this leaf is a matrix but its memory is {mem!r}; '
          'expected a ProtectedSubspace (check dimension_numbers).')
    batch = lay.batch_shape
    for basis, count, dim, side in (
        (mem.left, mem.left_count, lay.rows, 'left'),
        (mem.right, mem.right_count, lay.columns, 'right')):
      if utils.is_masked(basis):
        continue
      check_side(basis, batch, dim, lay.path, side)
      if tuple(jnp.shape(count)) != batch:
        raise ValueError(
            f'{lay.path}: the {side} count has shape {jnp.shape(count)}, '
            f'expected the batch shape {batch}.')
  return memory_leaves


def check_mode(memory, params, mode, dimension_numbers=None):
  """Raise when ``memory`` lacks a side that ``mode`` projects with."""
  use_left, use_right = mode_sides(mode)
  treedef = jax.tree.structure(params)
  for lay, mem in zip(matrix_layouts(params, dimension_numbers), flat_memory(
      memory, treedef, 'memory')):
    if lay is None or not isinstance(mem, ProtectedSubspace):
      continue
    if (use_left and utils.is_masked(mem.left)) or (use_right and utils.is_masked(mem.right)):
      raise ValueError(
          f'{lay.path}: mode={mode!r} needs the '
          f'{"left" if use_left and utils.is_masked(mem.left) else "right"} side, which '
          'the memory does not hold; build it with that mode or give capacity=.')


def clear(memory):
  """The memory with every column zeroed and every count reset to 0."""
  return jax.tree.map(jnp.zeros_like, memory)


def protected_fraction(memory) -> dict:
  """Per leaf path and side, the fill count over the side's dimension (host).

  Args:
    memory: a memory (pytree of :class:`ProtectedSubspace`).

  Returns:
    A dict ``{'<path>.left' | '<path>.right': fraction}`` of floats in
    [0, 1] (the mean over stacked layers).

  Examples:
    >>> import jax.numpy as jnp
    >>> from subspace_optax import continual as cl
    >>> g = jnp.eye(4, 3)[None] * jnp.array([3.0, 1.0, 1.0])
    >>> memory = cl.gradient_memory({'w': g}, 0.5, mode='left')
    >>> cl.protected_fraction(memory)  # 1 of 4 input directions
    {"['w'].left": 0.25}
  """
  out = {}
  flat = jax.tree_util.tree_flatten_with_path(memory, is_leaf=is_memory_leaf)[0]
  for path, mem in flat:
    if not isinstance(mem, ProtectedSubspace):
      continue
    for side in ('left', 'right'):
      basis = getattr(mem, side)
      if utils.is_masked(basis):
        continue
      count = np.asarray(getattr(mem, side + '_count'))
      out[f'{layout_lib.path_name(path)}.{side}'] = float(
          np.mean(count) / basis.shape[-2])
  return out


# Raised when a value that a check needs on the host is traced (under jit,
# even operations on concrete arrays are staged).
TRACED_ERRORS = (jax.errors.ConcretizationTypeError,
                 jax.errors.TracerIntegerConversionError,
                 jax.errors.TracerArrayConversionError)


def _basis_errors(basis, count, orthonormal: bool) -> tuple[int, float]:
  """Host ``(non-finite entries, max |QᵀQ - diag(filled)|)`` of one basis.

  Computed in numpy on the host (once, at init or when a memory is set), so
  a sharded memory on any mesh is simply gathered; a traced one raises one of
  :data:`TRACED_ERRORS`.
  """
  basis = np.asarray(basis, np.float64)
  bad = int(np.sum(~np.isfinite(basis)))
  if bad or not orthonormal or basis.size == 0:
    return bad, 0.0
  gram = np.einsum('...kc,...kd->...cd', basis, basis)
  filled = np.arange(basis.shape[-1]) < np.asarray(count)[..., None]
  target = np.eye(basis.shape[-1]) * filled[..., None, :]
  return bad, float(np.max(np.abs(gram - target)))


def check_finite_orthonormal(memory, *, orthonormal: bool = True,
                             what: str = 'memory') -> None:
  """Raise unless every basis of ``memory`` is finite (and orthonormal).

  Orthonormal means ``QᵀQ = diag(1, ..., 1, 0, ..., 0)``: the first ``count``
  columns orthonormal, the others zero (every column is used by the
  projection), within :data:`ORTHONORMALITY_TOLERANCE` in float32. A basis
  that is not orthonormal lets part of the update into the protected subspace
  (scaled columns over- or under-subtract, duplicated ones subtract twice).
  Checked on concrete values only; skipped under tracing (``jax.jit``).
  """
  flat = jax.tree_util.tree_flatten_with_path(memory, is_leaf=is_memory_leaf)[0]
  for path, mem in flat:
    if not isinstance(mem, ProtectedSubspace):
      continue
    for side in ('left', 'right'):
      basis, count = getattr(mem, side), getattr(mem, side + '_count')
      if utils.is_masked(basis):
        continue
      try:
        bad, deviation = _basis_errors(basis, count, orthonormal)
      except TRACED_ERRORS:
        continue
      where = f'{layout_lib.path_name(path)}: the {side} basis of the {what}'
      if bad:
        raise ValueError(
            f'{where} holds {bad} non-finite (NaN/Inf) entries; it would make '
            'every later update NaN. Build it from finite weights, activations '
            'or gradients (the memory builders refuse non-finite input).')
      if not deviation <= ORTHONORMALITY_TOLERANCE:
        raise ValueError(
            f'{where} is not orthonormal: max |QᵀQ - I| = {deviation:.3g} '
            f'(tolerance {ORTHONORMALITY_TOLERANCE:g}; the first `count` '
            'columns must be orthonormal and the others zero), so part of '
            'each update would reach the protected subspace. Re-orthonormalise '
            'it with continual.add_directions(continual.clear(memory), '
            'memory), which also drops duplicated directions.')
