"""Sharding-aware helpers so the transforms work on Explicit and Auto meshes.

Under an Explicit mesh (``jax.make_mesh``'s default axis type) every
contraction over a sharded dimension needs an ``out_sharding``; these helpers
derive it from the operands, so the same code runs unsharded, on Auto meshes
(where ``out_sharding`` is left to the compiler) and on Explicit meshes.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec


def explicit_spec(x) -> Optional[tuple]:
  """The partition spec of ``x`` padded to its rank under an Explicit mesh.

  Returns None when ``x`` is not sharded over an Explicit mesh axis (plain
  arrays, Auto meshes, no mesh), where no ``out_sharding`` is needed.
  """
  try:
    sharding = jax.typeof(x).sharding
    mesh = sharding.mesh
    if not mesh.axis_names or not any(
        t == jax.sharding.AxisType.Explicit for t in mesh.axis_types
    ):
      return None
  except (AttributeError, TypeError):
    return None
  spec = tuple(sharding.spec)
  return spec + (None,) * (jnp.ndim(x) - len(spec))


def _axis_set(axis) -> set:
  if axis is None:
    return set()
  return set(axis) if isinstance(axis, tuple) else {axis}


def einsum(subscripts: str, *operands, precision=None) -> jax.Array:
  """``jnp.einsum`` whose output dims keep the mesh axis of the same input letter.

  Contracted sharded dims are summed across devices (an all-reduce of the
  output), never gathered.
  """
  specs = [explicit_spec(o) for o in operands]
  if all(s is None for s in specs):
    return jnp.einsum(subscripts, *operands, precision=precision)
  inputs, output = subscripts.replace(' ', '').split('->')
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
  return jnp.einsum(
      subscripts, *operands, precision=precision,
      out_sharding=PartitionSpec(*out_spec),
  )


def reshard_like(x: jax.Array, like: jax.Array) -> jax.Array:
  """Give ``x`` the Explicit sharding of ``like`` (no-op elsewhere)."""
  spec = explicit_spec(like)
  if spec is None or explicit_spec(x) == spec:
    return x
  return jax.sharding.reshard(x, PartitionSpec(*spec))


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
  return jnp.zeros(shape, dtype, out_sharding=PartitionSpec(*spec))
