"""Input checks and tree helpers shared by the memory builders.

Non-finite input (a NaN or Inf weight, activation or gradient) is refused with
a ``ValueError`` naming the leaf, before any decomposition runs (LAPACK's SVD
can hang on a matrix mixing Inf with finite entries). Under ``jax.jit``, where
a builder cannot raise, the non-finite entries are replaced by zeros before the
decomposition (so it never hangs) and that leaf's memory comes out filled with
NaN, which :func:`~subspace_optax.continual.set_memory` and
:func:`~subspace_optax.continual.orthogonal_to` refuse as soon as they see
concrete values, instead of a memory that silently protects nothing.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from subspace_optax._src.continual import protected as protected_lib
from subspace_optax._src.pipeline import layout as layout_lib

_HIGHEST = jax.lax.Precision.HIGHEST


def prefix_leaves(tree, treedef, what):
  """Leaves of ``tree`` (structure of params, or a scalar for all leaves)."""
  if tree is None or isinstance(tree, (int, float)):
    return [tree] * treedef.num_leaves
  try:
    return treedef.flatten_up_to(tree)
  except (ValueError, TypeError) as error:
    raise ValueError(
        f'`{what}` must be a scalar or a pytree with the structure of the '
        f'params (None at leaves without one). ({error})') from error


def check_finite(x, path: str, what: str, fix: str) -> None:
  """Raise when a concrete ``x`` has NaN or Inf entries (no-op when traced)."""
  try:
    nan, inf = int(jnp.sum(jnp.isnan(x))), int(jnp.sum(jnp.isinf(x)))
  except protected_lib.TRACED_ERRORS:
    return  # under jit: the memory of this leaf comes out NaN (see above)
  if nan or inf:
    raise ValueError(
        f'{path}: the {what} hold {nan} NaN and {inf} Inf entries (of '
        f'{jnp.size(x)}); a memory built from them would protect nothing (or '
        f'make every later update NaN). {fix}')


def zero_non_finite(x):
  """``(x with NaN/Inf replaced by 0, whether x was finite)``.

  The decompositions only ever see the zeroed matrix, so they cannot hang.
  """
  finite = jnp.isfinite(x)
  return jnp.where(finite, x, 0.0), jnp.all(finite)


def poison(basis, finite):
  """``basis``, or NaN everywhere when its input was not finite."""
  return jnp.where(finite, basis, jnp.nan)


def is_memory_node(x) -> bool:
  """A memory's leaf; a None params leaf is an empty subtree, as in params."""
  return isinstance(x, (protected_lib.ProtectedSubspace, optax.MaskedNode))


def paths(tree, is_leaf=None) -> list:
  return [layout_lib.path_name(p) for p, _ in
          jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)[0]]


# ----------------------------------------------------------------------------
# Sculpting Subspaces.


# ----------------------------------------------------------------------------
# Energy-threshold memories (GPM, gradients).


