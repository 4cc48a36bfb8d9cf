"""Which optimizer-state fields are moments, and how to map over them.

THE table of moment fields: every transform that moves, resets or stores
moments finds them here, by the field name of an optax state NamedTuple (the
subspace pipeline's ``on_refresh='reset'``/``'transport'``,
:func:`~subspace_optax.reset_moments`, :func:`~subspace_optax.quantize_moments`).
A state whose moment field is named otherwise would silently escape all of
them: every state of the library and of the optax optimizers it wraps uses
these names (``tests/momentum_reset_test.py`` checks the presets).

A moment leaf may be stored encoded (e.g. 8-bit codes and scales); its type is
registered with :func:`register_encoding`, so :func:`map_moments` can decode,
move and re-encode it.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

# Field names of first (linear in the gradient) and second (quadratic) moments.
FIRST_MOMENTS = ('mu', 'trace', 'momentum')
SECOND_MOMENTS = ('nu',)
MOMENTS = FIRST_MOMENTS + SECOND_MOMENTS

# Encoded moment leaf type -> (decode(leaf), encode_like(leaf, value)).
_ENCODINGS: dict[type, tuple[Callable, Callable]] = {}


def register_encoding(
    leaf_type: type, decode: Callable[[Any], jax.Array],
    encode_like: Callable[[Any, jax.Array], Any],
) -> None:
  """Register a stored form of a moment leaf (``encode_like(old, value)``
  encodes ``value`` in the format of ``old``)."""
  _ENCODINGS[leaf_type] = (decode, encode_like)


def is_encoded(x) -> bool:
  return type(x) in _ENCODINGS


def decode(x) -> jax.Array:
  """The float moment an encoded leaf stands for (other leaves unchanged)."""
  return _ENCODINGS[type(x)][0](x) if is_encoded(x) else x


def encode_like(old, value: jax.Array):
  """``value`` stored as ``old`` is (unchanged when ``old`` is a plain array)."""
  return _ENCODINGS[type(old)][1](old, value) if is_encoded(old) else value


def field_names(node) -> tuple[str, ...]:
  """The fields of a NamedTuple, () for anything else."""
  return getattr(node, '_fields', ()) if isinstance(node, tuple) else ()


def map_moment_fields(
    state: Any, fn: Callable[[str, Any], Any], fields=MOMENTS
) -> Any:
  """Replace each field ``name`` in ``fields`` of every NamedTuple inside
  ``state`` by ``fn(name, subtree)``; everything else is left as it is."""
  fields = tuple(fields)

  def holds_moments(node) -> bool:
    return any(f in fields for f in field_names(node))

  def visit(node):
    if not holds_moments(node):
      return node
    return node._replace(**{
        name: fn(name, getattr(node, name))
        for name in field_names(node) if name in fields})

  return jax.tree.map(visit, state, is_leaf=holds_moments)


def map_moments(inner_state, treedef, shapes, fn):
  """Apply ``fn(is_second_moment, flat_leaves) -> flat_leaves`` to every
  moment field of ``inner_state`` shaped like the coefficients tree.

  A moment field (named in :data:`FIRST_MOMENTS` or :data:`SECOND_MOMENTS`)
  is moved when its subtree has structure ``treedef`` and leaf shapes
  ``shapes``; encoded leaves are decoded for ``fn`` and re-encoded after.
  """

  def move(name, subtree):
    try:
      leaves = treedef.flatten_up_to(subtree) if jax.tree.structure(
          subtree, is_leaf=is_encoded) == treedef else None
    except (ValueError, TypeError):
      leaves = None
    if leaves is None:
      return subtree
    values = [decode(v) for v in leaves]
    if [jnp.shape(v) for v in values] != shapes:
      return subtree
    moved = fn(name in SECOND_MOMENTS, values)
    return treedef.unflatten(
        [encode_like(old, new) for old, new in zip(leaves, moved)])

  return map_moment_fields(inner_state, move)
