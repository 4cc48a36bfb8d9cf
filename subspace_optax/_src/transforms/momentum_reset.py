"""Momentum reset on a fixed schedule, around any optax optimizer."""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import optax

from subspace_optax._src.transforms import moments as moments_lib


class ResetMomentsState(NamedTuple):
  count: jax.Array  # int32 scalar: updates so far
  inner_state: optax.OptState


def reset_moments(
    state: Any,
    fields: Sequence[str] = moments_lib.FIRST_MOMENTS,
    reset_count: bool = False,
    where: Any = True,
) -> Any:
  """Zero the moment fields of every optax state NamedTuple inside ``state``.

  A NamedTuple with a field named in ``fields`` (optax's ``mu``/``nu`` of
  Adam and Lion, ``trace`` of ``optax.trace``; the table is
  ``subspace_optax._src.moments``) gets those fields zeroed, and with
  ``reset_count`` its ``count`` too (bias correction restarts). Other
  leaves, including counts of other states (the subspace pipeline's step count),
  are untouched. ``where`` (a boolean scalar) makes the reset conditional
  without leaving ``jit``. Encoded moments (8-bit codes and scales) are
  zeroed as stored: every stored array zero stands for a zero moment.

  Args:
    state: any optax state (or a pytree holding states).
    fields: names of the moment fields to zero.
    reset_count: also zero the ``count`` of the states that hold such a field.
    where: a boolean scalar (may be traced): reset only where True.

  Returns:
    ``state`` with the moments (and counts) zeroed, same structure.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import subspace_optax as so
    >>> tx = optax.adam(1e-3)
    >>> params = jnp.ones(3)
    >>> _, state = tx.update(params, tx.init(params))
    >>> state = so.reset_moments(state)
    >>> state[0].mu
    Array([0., 0., 0.], dtype=float32)
  """
  fields = tuple(fields)
  zero = lambda x: jnp.where(where, jnp.zeros_like(x), x)
  names = fields + (('count',) if reset_count else ())

  def reset(name, subtree):
    return jax.tree.map(zero, subtree)

  def holds_moments(node) -> bool:
    return any(f in fields for f in moments_lib.field_names(node))

  def visit(node):
    if not holds_moments(node):
      return node
    return moments_lib.map_moment_fields(node, reset, names)

  return jax.tree.map(visit, state, is_leaf=holds_moments)


