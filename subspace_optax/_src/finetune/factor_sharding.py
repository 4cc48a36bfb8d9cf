"""Shardings of reparameterised factors, by rule from the weight's sharding.

A weight ``(*batch, m, n)`` sharded as ``(*s_batch, s_m, s_n)`` is factored
into arrays with the same leading batch axes (``U_r (m, r)``, ``s (r,)``,
``up (r, n)``...). Each factor keeps the batch specs. Of the other axes of a
factor *matrix*, one of length ``m`` takes ``s_m`` and one of length ``n``
takes ``s_n`` (the first such axis, each mesh axis used once); every other
axis (a rank) and every factor vector (``s``: a length ``min(m, n)`` would
be ambiguous, and vectors are small) is replicated, so any rank works on
any mesh, as for the low-rank bases (``pipeline/sharding.py``).

The SVD at init needs the whole matrix: under an Explicit mesh the weight is
gathered once (its batch axes stay sharded); the compiler inserts the same
gather on an Auto mesh.
"""

from __future__ import annotations

from typing import Any, Optional

import jax

from subspace_optax._src.pipeline import sharding


def _axes(axis) -> set:
  if axis is None:
    return set()
  return set(axis) if isinstance(axis, tuple) else {axis}


def factor_spec(shape: tuple[int, ...], weight_shape: tuple[int, ...],
                weight_spec: tuple) -> tuple:
  """The spec of a factor array of ``shape`` for a weight with ``weight_spec``.

  Args:
    shape: the factor's shape, leading axes the weight's batch axes.
    weight_shape: ``(*batch, m, n)``.
    weight_spec: the weight's partition spec padded to its rank.

  Returns:
    A spec tuple of ``len(shape)`` entries.

  Examples:
    >>> from subspace_optax._src.finetune import factor_sharding
    >>> factor_sharding.factor_spec((16, 2), (16, 8), ('fsdp', None))
    ('fsdp', None)
    >>> factor_sharding.factor_spec((2, 8), (16, 8), (None, 'fsdp'))
    (None, 'fsdp')
    >>> factor_sharding.factor_spec((8,), (16, 8), (None, 'fsdp'))
    (None,)
  """
  nb = len(weight_shape) - 2
  m, n = weight_shape[-2:]
  s_m, s_n = weight_spec[-2:]
  out = list(weight_spec[:nb]) + [None] * (len(shape) - nb)
  if len(shape) - nb < 2:
    return tuple(out)  # vectors (singular values, scales) are replicated
  used = set().union(*(_axes(a) for a in weight_spec[:nb]))
  for size, axis in ((m, s_m), (n, s_n)):
    if axis is None or _axes(axis) & used:
      continue
    for j in range(nb, len(shape)):
      if shape[j] == size and out[j] is None:
        out[j] = axis
        used |= _axes(axis)
        break
  return tuple(out)


def gathered(w: jax.Array) -> jax.Array:
  """``w`` with its matrix axes gathered under an Explicit mesh (for SVDs)."""
  return sharding.replicate_matrix(w)


def place_factors(tree: Any, where: Optional[sharding.Placement],
                  weight_shape: tuple[int, ...]) -> Any:
  """Every array of ``tree`` sharded by :func:`factor_spec` (or as it is)."""
  if where is None:
    return tree
  spec = where[1]
  return jax.tree.map(
      lambda a: sharding.place(
          a, where, factor_spec(a.shape, weight_shape, spec)), tree)


def like(tree: Any, reference: Any) -> Any:
  """``tree`` with the Explicit shardings of ``reference`` (no-op elsewhere)."""
  return jax.tree.map(sharding.reshard_like, tree, reference)
