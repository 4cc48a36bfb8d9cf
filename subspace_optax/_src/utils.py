"""Helpers every package of the library may import."""

from __future__ import annotations

import math

import jax
import numpy as np



def is_variable(x) -> bool:
  return hasattr(x, 'get_value') and hasattr(x, 'get_metadata')


def unbox(tree):
  """Strip flax ``nnx.Variable`` boxes (duck-typed, no flax import).

  The low-rank state must not inherit a parameter's metadata (its sharding
  would be applied to a tensor of another shape).
  """
  return jax.tree.map(
      lambda x: x.get_value() if is_variable(x) else x, tree,
      is_leaf=is_variable,
  )


def shape_of(x) -> tuple[int, ...]:
  """Shape of an array, a ``jax.ShapeDtypeStruct`` or a Python scalar."""
  return tuple(x.shape) if hasattr(x, 'shape') else np.shape(x)


def passes_through(x) -> bool:
  """Zero-size leaves skip the pipeline: the update is returned as it is."""
  return math.prod(shape_of(x)) == 0


