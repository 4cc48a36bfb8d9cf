"""Sharding-aware helpers so the transforms work on Explicit and Auto meshes.

Under an Explicit mesh (``jax.make_mesh``'s default axis type) every
contraction over a sharded dimension needs an ``out_sharding``; these helpers
derive it from the operands, so the same code runs unsharded, on Auto meshes
(where ``out_sharding`` is left to the compiler) and on Explicit meshes.

The low-rank state is sharded by rule from each parameter's sharding: for an
oriented matrix view ``(*batch, k, l)`` with specs ``(*s_batch, s_k, s_l)`` the
basis ``(*batch, k, r)`` gets ``(*s_batch, s_k, None)`` and the coefficient
moments ``(*batch, r, l)`` get ``(*s_batch, None, s_l)``: no array is ever
sharded along the rank, so any rank works on any mesh.
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec
import optax

from subspace_optax._src import utils

# (mesh, spec padded to the array's rank): where an array lives, when known.
Placement = tuple[Any, tuple]


def _has_explicit_axis(mesh) -> bool:
  return bool(mesh.axis_names) and any(
      t == jax.sharding.AxisType.Explicit for t in mesh.axis_types)


def _pad(spec, ndim: int) -> tuple:
  spec = tuple(spec)
  return spec + (None,) * (ndim - len(spec))


def explicit_spec(x) -> Optional[tuple]:
  """The partition spec of ``x`` padded to its rank under an Explicit mesh.

  Returns None when ``x`` is not sharded over an Explicit mesh axis (plain
  arrays, Auto meshes, no mesh), where no ``out_sharding`` is needed.
  """
  try:
    sharding = jax.typeof(x).sharding
    if not _has_explicit_axis(sharding.mesh):
      return None
  except (AttributeError, TypeError):
    return None
  return _pad(sharding.spec, jnp.ndim(x))


def _explicit_named(x, spec) -> NamedSharding:
  """``spec`` on the (abstract) Explicit mesh of ``x``'s type."""
  return NamedSharding(jax.typeof(x).sharding.mesh, PartitionSpec(*spec))


def placement(x) -> Optional[Placement]:
  """Mesh and padded spec of ``x``, from wherever they are known.

  A concrete ``jax.Array`` or a ``ShapeDtypeStruct`` with a ``NamedSharding``
  gives its concrete mesh (Explicit or Auto); a traced value gives its
  Explicit sharding type. None when neither is known (unsharded values, and
  Auto-mesh values inside ``jit``, whose sharding the compiler chooses: use
  :func:`state_shardings` there).
  """
  if not isinstance(x, jax.core.Tracer):
    sharding = getattr(x, 'sharding', None)
    if isinstance(sharding, NamedSharding) and sharding.mesh.axis_names:
      return sharding.mesh, _pad(sharding.spec, len(x.shape))
  spec = explicit_spec(x)
  if spec is None:
    return None
  return jax.typeof(x).sharding.mesh, spec


def place(x: jax.Array, where: Optional[Placement], spec: tuple) -> jax.Array:
  """``x`` sharded as ``spec`` on the mesh of ``where`` (no-op if None).

  Under an Explicit mesh this is a ``reshard`` (a sharding type); for an
  eagerly built state on an Auto mesh it is a ``device_put``; inside ``jit``
  on an Auto mesh the compiler decides (``where`` is None there).
  """
  if where is None:
    return x
  mesh, _ = where
  if not any(s is not None for s in spec) and not _has_explicit_axis(mesh):
    spec = ()
  sharding = NamedSharding(mesh, PartitionSpec(*spec))
  if _has_explicit_axis(mesh):
    return jax.sharding.reshard(x, sharding)
  if isinstance(x, jax.core.Tracer):
    return x
  return jax.device_put(x, sharding)


def _axis_set(axis) -> set:
  if axis is None:
    return set()
  return set(axis) if isinstance(axis, tuple) else {axis}


def _expand_ellipsis(subscripts: str, operands) -> str:
  """``'...rs,...sl->...rl'`` with the ellipsis spelled out in free letters."""
  subscripts = subscripts.replace(' ', '')
  if '...' not in subscripts:
    return subscripts
  inputs, output = subscripts.split('->')
  free = [c for c in 'ABCDEFGHIJKLMNOPQRSTUVWXYZ' if c not in subscripts]
  terms, widest = [], 0
  for letters, operand in zip(inputs.split(','), operands):
    width = jnp.ndim(operand) - (len(letters) - 3) if '...' in letters else 0
    widest = max(widest, width)
    terms.append((letters, width))
  expanded = [
      letters.replace('...', ''.join(free[widest - width:widest]))
      for letters, width in terms]
  return ','.join(expanded) + '->' + output.replace('...', ''.join(free[:widest]))


def einsum(subscripts: str, *operands, precision=None,
           preferred_element_type=None) -> jax.Array:
  """``jnp.einsum`` whose output dims keep the mesh axis of the same input letter.

  Contracted sharded dims are summed across devices (an all-reduce of the
  output), never gathered.
  """
  specs = [explicit_spec(o) for o in operands]
  if all(s is None for s in specs):
    return jnp.einsum(subscripts, *operands, precision=precision,
                      preferred_element_type=preferred_element_type)
  inputs, output = _expand_ellipsis(subscripts, operands).split('->')
  axis_of = {}
  for letters, spec in zip(inputs.split(','), specs):
    for letter, axis in zip(letters, spec or ()):
      if axis is not None and letter not in axis_of:
        axis_of[letter] = axis
  used, out_spec = set(), []
  for letter in output:
    axis = axis_of.get(letter)
    axes = _axis_set(axis)
    if axis is not None and not axes & used:
      out_spec.append(axis)
      used |= axes
    else:
      out_spec.append(None)
  like = next(o for o, s in zip(operands, specs) if s is not None)
  return jnp.einsum(
      subscripts, *operands, precision=precision,
      preferred_element_type=preferred_element_type,
      out_sharding=_explicit_named(like, out_spec),
  )


def reshard_like(x: jax.Array, like: jax.Array) -> jax.Array:
  """Give ``x`` the Explicit sharding of ``like`` (no-op elsewhere)."""
  spec = explicit_spec(like)
  if spec is None or explicit_spec(x) == spec:
    return x
  return jax.sharding.reshard(x, _explicit_named(like, spec))


def replicate_matrix(x: jax.Array) -> jax.Array:
  """Gather the last two (matrix) axes of ``x`` under an Explicit mesh.

  Dense factorisations (``svd``, ``qr``) need the whole matrix on every device;
  this makes that all-gather explicit. A no-op on unsharded and Auto arrays
  (on an Auto mesh the compiler inserts the same gather).
  """
  spec = explicit_spec(x)
  if spec is None or (spec[-2:] == (None, None)):
    return x
  return jax.sharding.reshard(x, _explicit_named(x, spec[:-2] + (None, None)))


def zeros(shape, dtype, like=None, spec=None) -> jax.Array:
  """Zeros that carry an Explicit sharding when ``like`` has one.

  Args:
    shape: output shape.
    dtype: output dtype.
    like: an array whose Explicit mesh the output lives on.
    spec: the output's partition spec (tuple), used only under an Explicit mesh.
  """
  if like is None or explicit_spec(like) is None or spec is None:
    return jnp.zeros(shape, dtype)
  return jnp.zeros(shape, dtype, out_sharding=_explicit_named(like, spec))


# ------------------------------------------------ low-rank state shardings


def view_spec(spec: tuple, layout) -> tuple:
  """Spec of the oriented ``(*batch, k, l)`` view of a leaf with ``spec``.

  A dimension merged from several axes keeps the mesh axis of its leading axis
  when no other merged axis is sharded; otherwise it is replicated.
  """
  first, second = (
      (layout.reduction_axes, layout.output_axes) if layout.project_rows
      else (layout.output_axes, layout.reduction_axes))

  def merged(axes):
    sharded = [a for a in axes if spec[a] is not None]
    return spec[axes[0]] if sharded == [axes[0]] else None

  return tuple(spec[a] for a in layout.batch_axes) + (
      merged(first), merged(second))


def basis_leaf_spec(leaf_shape, layout, spec: tuple) -> tuple:
  """Spec of one basis-state array: batch specs, then ``s_k`` on a ``k`` axis."""
  view = view_spec(spec, layout)
  nb = len(layout.batch_shape)
  out = list(view[:nb]) + [None] * (len(leaf_shape) - nb)
  if len(leaf_shape) == nb + 2 and leaf_shape[nb] == layout.projected_dim:
    out[nb] = view[nb]
  return tuple(out)


def coefficient_spec(layout, spec: tuple) -> tuple:
  """Spec of the ``(*batch, r, l)`` coefficients (and the inner moments)."""
  view = view_spec(spec, layout)
  return view[:-2] + (None, view[-1])


def _explicit_twin(mesh):
  """The same devices and axis names with every axis Explicit."""
  if all(t == jax.sharding.AxisType.Explicit for t in mesh.axis_types):
    return mesh
  return jax.sharding.Mesh(
      mesh.devices, mesh.axis_names,
      axis_types=(jax.sharding.AxisType.Explicit,) * len(mesh.axis_names))


def state_shardings(
    tx: optax.GradientTransformation, params: Any, param_shardings: Any
) -> Any:
  """Shardings of ``tx.init(params)`` for ``jax.jit(tx.init, out_shardings=...)``.

  On an Auto mesh ``jax.jit(tx.init)(params)`` replicates the whole state
  (the compiler sees only zeros), and optax's usual recipe gives every state
  leaf its parameter's spec, which is wrong for low-rank leaves (a ``(r, n)``
  moment cannot take the spec of an ``(m, n)`` parameter when ``r`` is not
  divisible by the mesh). This evaluates ``tx.init`` abstractly with the
  parameters typed on an Explicit twin of their mesh, so every leaf gets the
  sharding that ``tx`` itself derives (parameter-shaped moments keep the
  parameter's spec; bases ``(k@s_k, r)``; coefficients ``(r, l@s_l)``; scalars
  replicated), and returns those shardings on the original mesh.

  Example::

    shardings = subspace_optax.state_shardings(tx, params, param_shardings)
    opt_state = jax.jit(tx.init, out_shardings=shardings)(params)

  Args:
    tx: any optax transformation whose ``init`` is traceable.
    params: the parameters (arrays or ``jax.ShapeDtypeStruct``; only shapes
      and dtypes are used).
    param_shardings: a pytree like ``params`` of ``NamedSharding``.

  Returns:
    A pytree like ``tx.init(params)`` of ``NamedSharding`` on the mesh of
    ``param_shardings``.

  Examples:
    >>> import jax
    >>> import jax.numpy as jnp
    >>> from jax.sharding import NamedSharding, PartitionSpec
    >>> import subspace_optax as so
    >>> mesh = jax.make_mesh((1,), ('data',))
    >>> params = {'w': jnp.ones((8, 6))}
    >>> shardings = {'w': NamedSharding(mesh, PartitionSpec('data', None))}
    >>> tx = so.galore(1e-3, rank=2)
    >>> out = so.state_shardings(tx, params, shardings)
    >>> state = jax.jit(tx.init, out_shardings=out)(params)
  """
  params, param_shardings = utils.unbox(params), utils.unbox(param_shardings)
  leaves, treedef = jax.tree.flatten(params)
  shardings = treedef.flatten_up_to(param_shardings)
  meshes = {s.mesh for s in shardings if isinstance(s, NamedSharding)}
  if len(meshes) != 1:
    raise ValueError(
        '`param_shardings` must hold NamedShardings on one mesh; got '
        f'{len(meshes)} meshes.')
  (mesh,) = meshes
  twin = _explicit_twin(mesh)

  def typed(p, s):
    spec = s.spec if isinstance(s, NamedSharding) else PartitionSpec()
    return jax.ShapeDtypeStruct(
        jnp.shape(p), jnp.result_type(p), sharding=NamedSharding(twin, spec))

  typed_params = treedef.unflatten([typed(p, s) for p, s in zip(leaves, shardings)])
  with jax.set_mesh(twin):
    abstract = jax.eval_shape(tx.init, typed_params)

  def on_mesh(x):
    spec = getattr(getattr(x, 'sharding', None), 'spec', PartitionSpec())
    return NamedSharding(mesh, PartitionSpec(*spec))

  return jax.tree.map(on_mesh, abstract)
