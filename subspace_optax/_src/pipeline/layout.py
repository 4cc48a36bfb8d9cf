"""How a parameter leaf is seen as a (batch of) matrices.

A leaf of any rank is read as a stack of matrices through
:class:`DimensionNumbers`: the ``reduction_axis`` axes form the rows (the input
side, ``m``), the ``output_axis`` axes form the columns (``n``) and every other
axis is a batch axis (for example the layer axis of ``nnx.scan`` stacks), over
which each matrix gets its own basis.

The *oriented* view puts the projected axis first: a leaf becomes an array of
shape ``(*batch, k, l)`` where ``k`` is the projected dimension (the basis is
``k x rank``) and ``l`` the other one (the coefficients are ``rank x l``).
Every basis method works on that view only, so it never needs to know the side.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

from subspace_optax._src import utils

Axes = Union[int, tuple[int, ...]]


class DimensionNumbers(NamedTuple):
  """Which axes of a leaf are the rows and columns of its matrix view.

  Attributes:
    reduction_axis: axis or axes contracted with the layer input (rows, ``m``).
    output_axis: axis or axes of the layer output (columns, ``n``).

  Axes listed in neither are batch axes: each index along them is a separate
  matrix with its own basis (stacked layers from ``nnx.scan``/``nnx.vmap``).
  """

  reduction_axis: Axes = -2
  output_axis: Axes = -1


SIDES = ('compact', 'reference', 'left', 'right')


@dataclasses.dataclass(frozen=True)
class MatrixLayout:
  """Static description of one projected leaf (Python values only)."""

  path: str  # human-readable leaf path, for error messages
  shape: tuple[int, ...]  # the leaf's shape
  batch_axes: tuple[int, ...]
  reduction_axes: tuple[int, ...]
  output_axes: tuple[int, ...]
  rows: int  # m: product of the reduction axes
  columns: int  # n: product of the output axes
  project_rows: bool  # True: basis spans the rows (P^T G); False: G Q
  rank: int

  @property
  def batch_shape(self) -> tuple[int, ...]:
    return tuple(self.shape[a] for a in self.batch_axes)

  @property
  def projected_dim(self) -> int:
    """``k``: the dimension the basis spans."""
    return self.rows if self.project_rows else self.columns

  @property
  def other_dim(self) -> int:
    """``l``: the dimension the coefficients keep."""
    return self.columns if self.project_rows else self.rows

  @property
  def basis_shape(self) -> tuple[int, ...]:
    return self.batch_shape + (self.projected_dim, self.rank)

  @property
  def coefficient_shape(self) -> tuple[int, ...]:
    return self.batch_shape + (self.rank, self.other_dim)

  @property
  def num_matrices(self) -> int:
    return math.prod(self.batch_shape)


def _normalize_axes(axes: Axes, ndim: int, what: str, path: str) -> tuple[int, ...]:
  axes = (axes,) if isinstance(axes, int) else tuple(axes)
  if not axes:
    raise ValueError(f'{path}: `{what}` is empty; give at least one axis.')
  out = []
  for a in axes:
    if not isinstance(a, int) or isinstance(a, bool):
      raise TypeError(f'{path}: `{what}` must hold ints, got {a!r}.')
    if not -ndim <= a < ndim:
      raise ValueError(
          f'{path}: `{what}`={a} does not fit a leaf of rank {ndim}; '
          'give axes in [-ndim, ndim) or exclude this leaf (None).'
      )
    out.append(a % ndim)
  return tuple(out)


def _as_number(rank: Any) -> Any:
  """NumPy scalars become Python numbers; anything else is returned as is."""
  if isinstance(rank, np.integer):
    return int(rank)
  if isinstance(rank, np.floating):
    return float(rank)
  return rank


_RANK_FIX = (
    'give a positive int (clamped to min(m, n) of each matrix) or a float in '
    '(0, 1] (a fraction of min(m, n))'
)


def resolve_rank(rank: int | float, rows: int, columns: int, path: str) -> int:
  """Rank for one matrix: ints are clamped to ``min(m, n)``, floats are fractions."""
  smaller = min(rows, columns)
  rank = _as_number(rank)
  if isinstance(rank, bool) or not isinstance(rank, (int, float)):
    raise TypeError(
        f'`rank` must be a Python int or float, got {type(rank).__name__} '
        f'(at {path}); {_RANK_FIX}.'
    )
  if isinstance(rank, float):
    if not 0.0 < rank <= 1.0:
      raise ValueError(
          f'`rank`={rank} (at {path}) is a float outside (0, 1]; {_RANK_FIX}.')
    return max(1, round(rank * smaller))
  if rank <= 0:
    raise ValueError(f'`rank`={rank} (at {path}) is not positive; {_RANK_FIX}.')
  return min(rank, smaller)


def validate_rank(rank: Any) -> None:
  """Construction-time check of a rank argument (no shapes known yet)."""
  rank = _as_number(rank)
  if isinstance(rank, bool) or not isinstance(rank, (int, float)):
    raise TypeError(
        f'`rank` must be a Python int (or a float fraction in (0, 1]), got '
        f'{type(rank).__name__}: it fixes the shapes of the state, so it cannot '
        'be a traced or array value. With optax.inject_hyperparams, list it in '
        "static_args=('rank', ...)."
    )
  resolve_rank(rank, 1 << 30, 1 << 30, 'construction')


def make_layout(
    path: str,
    shape: tuple[int, ...],
    numbers: DimensionNumbers,
    side: str,
    rank: int | float,
) -> MatrixLayout:
  ndim = len(shape)
  if ndim < 2:
    raise ValueError(
        f'{path}: a leaf of shape {shape} has no matrix view; give None as its '
        'dimension numbers so it is not projected.'
    )
  reduction = _normalize_axes(numbers.reduction_axis, ndim, 'reduction_axis', path)
  output = _normalize_axes(numbers.output_axis, ndim, 'output_axis', path)
  if set(reduction) & set(output) or len(set(reduction)) < len(reduction) or len(
      set(output)) < len(output):
    raise ValueError(
        f'{path}: reduction axes {reduction} and output axes {output} must be '
        'distinct.'
    )
  batch = tuple(a for a in range(ndim) if a not in reduction + output)
  rows = math.prod(shape[a] for a in reduction)
  columns = math.prod(shape[a] for a in output)
  if side == 'compact':
    project_rows = rows >= columns
  elif side == 'reference':
    # galore-torch's proj_type='std' on the PyTorch weight (out, in) = our
    # (in, out) transposed: the basis lies on the smaller side, and on a
    # square matrix on the input side (our rows).
    project_rows = rows <= columns
  elif side == 'left':
    project_rows = True
  elif side == 'right':
    project_rows = False
  else:
    raise ValueError(f'`side` must be one of {SIDES}, got {side!r}.')
  return MatrixLayout(
      path=path, shape=tuple(shape), batch_axes=batch, reduction_axes=reduction,
      output_axes=output, rows=rows, columns=columns, project_rows=project_rows,
      rank=resolve_rank(rank, rows, columns, path),
  )


def matrix_view(x: jax.Array, layout: MatrixLayout) -> jax.Array:
  """Leaf -> oriented ``(*batch, k, l)`` view (projected axis first)."""
  first, second = (
      (layout.reduction_axes, layout.output_axes) if layout.project_rows
      else (layout.output_axes, layout.reduction_axes)
  )
  order = layout.batch_axes + first + second
  if order != tuple(range(x.ndim)):
    x = jnp.transpose(x, order)
  target = layout.batch_shape + (layout.projected_dim, layout.other_dim)
  if x.shape != target:
    x = x.reshape(target)
  return x


def leaf_from_matrix(m: jax.Array, layout: MatrixLayout) -> jax.Array:
  """Inverse of :func:`matrix_view`."""
  first, second = (
      (layout.reduction_axes, layout.output_axes) if layout.project_rows
      else (layout.output_axes, layout.reduction_axes)
  )
  order = layout.batch_axes + first + second
  permuted_shape = tuple(layout.shape[a] for a in order)
  if m.shape != permuted_shape:
    m = m.reshape(permuted_shape)
  if order != tuple(range(m.ndim)):
    m = jnp.transpose(m, tuple(order.index(a) for a in range(m.ndim)))
  return m


def batched(fn: Callable[..., Any], num_batch_axes: int) -> Callable[..., Any]:
  """``fn`` vmapped over ``num_batch_axes`` leading axes of every argument."""
  for _ in range(num_batch_axes):
    fn = jax.vmap(fn)
  return fn


def path_name(path) -> str:
  return jax.tree_util.keystr(path) or '<root>'


def _is_numbers_leaf(x) -> bool:
  return x is None or isinstance(x, DimensionNumbers)


def _check_not_a_step_count(params, name: str) -> None:
  """``optax.inject_hyperparams`` calls callable arguments with the step count."""
  if (isinstance(params, jax.Array) and params.ndim == 0
      and jnp.issubdtype(params.dtype, jnp.integer)):
    raise TypeError(
        f'`{name}` was called with a step count instead of params: '
        'optax.inject_hyperparams treats every callable argument as a schedule. '
        "List it in static_args=('dimension_numbers', ...)."
    )


def last_two_axes(params) -> Any:
  """Dimension numbers for every leaf of rank >= 2 over its last two axes.

  Leading axes are batch axes, so layers stacked by ``nnx.scan`` of shape
  ``(L, m, n)`` get one basis per layer. Leaves of rank < 2 are not projected.

  Args:
    params: the parameters (arrays or ``jax.ShapeDtypeStruct``).

  Returns:
    A pytree like ``params`` of :class:`DimensionNumbers` (rank >= 2) or
    None (not projected), for ``dimension_numbers=``.

  Examples:
    >>> import jax.numpy as jnp
    >>> import subspace_optax as so
    >>> so.last_two_axes({'stack': jnp.ones((4, 8, 6)), 'b': jnp.ones(6)})
    {'b': None, 'stack': DimensionNumbers(reduction_axis=-2, output_axis=-1)}
  """
  _check_not_a_step_count(params, 'last_two_axes')
  return jax.tree.map(
      lambda p: DimensionNumbers(-2, -1) if len(utils.shape_of(p)) >= 2 else None,
      params
  )


def conv_kernels(params) -> Any:
  """Dimension numbers for convolution kernels: one ``(H·W·I, O)`` basis each.

  flax ``nnx.Conv`` kernels are ``(*window, in_features, out_features)``
  (HWIO for 2-D convolutions). Every axis but the last is contracted with the
  input patch, so a kernel is read as one matrix with ``prod(window)·I`` rows
  and ``O`` columns (the im2col view). Dense ``(m, n)`` kernels get the usual
  ``(m, n)`` view; leaves of rank < 2 are not projected. Do not use it for
  stacked ``(L, m, n)`` layers (use :func:`last_two_axes`): their layer axis
  would be merged into the rows.

  Args:
    params: the parameters (arrays or ``jax.ShapeDtypeStruct``).

  Returns:
    A pytree like ``params`` of :class:`DimensionNumbers` (rank >= 2) or
    None (not projected), for ``dimension_numbers=``.

  Examples:
    >>> import jax.numpy as jnp
    >>> import subspace_optax as so
    >>> dims = so.conv_kernels({'conv': jnp.ones((3, 3, 4, 8))})
    >>> dims['conv'].reduction_axis  # H, W and I are contracted: 36 x 8
    (0, 1, 2)
  """
  _check_not_a_step_count(params, 'conv_kernels')
  return jax.tree.map(
      lambda p: DimensionNumbers(tuple(range(np.ndim(p) - 1)), -1)
      if np.ndim(p) >= 2 else None, params)


def default_dimension_numbers(params) -> Any:
  """Every 2-D leaf is a matrix; leaves of any other rank are not projected."""
  return jax.tree.map(
      lambda p: DimensionNumbers(0, 1) if len(utils.shape_of(p)) == 2 else None, params
  )


def leaf_layouts(params, dimension_numbers, side: str, rank: int | float):
  """Pytree (structure of ``params``) of :class:`MatrixLayout` or ``None``.

  ``None`` marks a leaf that is not projected: excluded by
  ``dimension_numbers``, or of size zero (nothing to project).
  """
  if dimension_numbers is None:
    numbers = default_dimension_numbers(params)
  elif isinstance(dimension_numbers, DimensionNumbers):
    numbers = jax.tree.map(
        lambda p: dimension_numbers if len(utils.shape_of(p)) >= 2 else None, params
    )
  elif callable(dimension_numbers):
    numbers = dimension_numbers(params)
  elif isinstance(dimension_numbers, (str, bytes, int, float, jax.Array)):
    raise TypeError(
        f'`dimension_numbers`={dimension_numbers!r} is not valid; give None, a '
        'DimensionNumbers, a pytree of them (None: leaf not projected) or a '
        'callable params -> such a pytree.'
    )
  else:
    numbers = dimension_numbers

  def check_leaf(path, n):
    if not _is_numbers_leaf(n):
      raise TypeError(
          f'`dimension_numbers` at {path_name(path)} is {n!r}; each leaf must be '
          'a subspace_optax.DimensionNumbers(reduction_axis=..., '
          'output_axis=...) or None (leaf not projected).'
      )

  jax.tree_util.tree_map_with_path(check_leaf, numbers, is_leaf=_is_numbers_leaf)
  # A zero-size leaf has nothing to project: it is left out (None).
  try:
    return jax.tree_util.tree_map_with_path(
        lambda path, n, p: None if n is None or 0 in utils.shape_of(p) else make_layout(
            path_name(path), utils.shape_of(p), n, side, rank),
        numbers, params, is_leaf=_is_numbers_leaf,
    )
  except ValueError as error:
    if 'tree' in str(error).lower() and 'structure' in str(error).lower() or (
        'Custom node type mismatch' in str(error)):
      raise ValueError(
          '`dimension_numbers` must be a pytree with the structure of the params '
          '(DimensionNumbers or None at each leaf), a single DimensionNumbers, '
          f'or a callable params -> such a tree. Got a mismatch: {error}'
      ) from error
    raise


def is_layout_leaf(x) -> bool:
  """Leaf predicate for trees of :class:`MatrixLayout` (None: not projected)."""
  return x is None or isinstance(x, MatrixLayout)


def flat_layouts(params, dimension_numbers, side: str,
                 rank: int | float) -> list[Optional[MatrixLayout]]:
  """:func:`leaf_layouts` as a flat list, in the order of ``jax.tree.leaves``.

  The one way to ask "which leaves of this tree are matrices, and how". The
  list is flattened up to the structure of ``params``, so ``None`` subtrees of
  ``params`` (which have no leaves) do not shift it.
  """
  return jax.tree.structure(params).flatten_up_to(
      leaf_layouts(params, dimension_numbers, side, rank))
