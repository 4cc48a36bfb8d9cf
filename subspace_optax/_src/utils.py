"""Helpers every package of the library may import."""

from __future__ import annotations

import functools
import math
import os
import sys
import warnings

import jax
import numpy as np
import optax


class RankClampedWarning(UserWarning):
  """A rank asked for exceeded what a matrix (or a memory) holds and was
  clamped; the message names each leaf and its wanted and kept rank."""


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


def is_masked(x) -> bool:
  """``optax.MaskedNode()``: the placeholder of a leaf a transform skips."""
  return isinstance(x, optax.MaskedNode)


def passes_through(x) -> bool:
  """Zero-size leaves skip the pipeline: the update is returned as it is."""
  return math.prod(shape_of(x)) == 0


def compiled(*static_argnames: str):
  """``jax.jit(fn, static_argnames=..., inline=True)``, as a decorator.

  For array helpers that users and the library call outside ``jax.jit`` too
  (encoders, decoders, initial bases): called eagerly, the helper is one
  compiled program per shape instead of one per operation (an 8-bit encoder
  is some forty operations, each compiled on first use at each shape);
  inside a trace it is inlined, so the enclosing program is the same as
  without the decorator.

  Args:
    *static_argnames: the arguments that are Python values (shapes, flags).

  Returns:
    A decorator.

  Examples:
    >>> import jax.numpy as jnp
    >>> from subspace_optax._src import utils
    >>> @utils.compiled('n')
    ... def tile(x, n):
    ...   return jnp.tile(x, n)
    >>> tile(jnp.ones(2), n=2).shape
    (4,)
  """
  return functools.partial(
      jax.jit, static_argnames=static_argnames, inline=True)


# Packages whose frames are skipped when a warning is attributed to its caller:
# the library itself and the frameworks a user's call goes through to reach it
# (``jax.jit``, ``optax.chain``, ``nnx.Optimizer``, chex's checks).
_INTERNAL_PACKAGES = ('subspace_optax', 'jax', 'jaxlib', 'optax', 'flax',
                      'chex')


def _internal_prefixes() -> tuple[str, ...]:
  """The source directories of the imported :data:`_INTERNAL_PACKAGES`."""
  prefixes = []
  for name in _INTERNAL_PACKAGES:
    module = sys.modules.get(name)
    path = getattr(module, '__file__', None)
    if path:
      prefixes.append(os.path.dirname(os.path.abspath(path)) + os.sep)
  return tuple(prefixes)


def caller_stacklevel() -> int:
  """The ``stacklevel`` that attributes a warning to the user's code.

  For a ``warnings.warn`` call made by the function that calls this one: the
  level of the first frame, from that function's caller up, whose file is not
  in ``subspace_optax``, ``jax``, ``optax``, ``flax`` or ``chex`` (so
  ``optax.chain(...).init``, ``jax.jit`` and ``nnx.Optimizer`` put the warning
  on the user's line that called them). Falls back to the outermost frame.

  Returns:
    An int >= 2 for ``warnings.warn(..., stacklevel=...)`` in the caller.

  Examples:
    >>> from subspace_optax._src import utils
    >>> def warns():  # a function outside the library: its caller's level
    ...   return utils.caller_stacklevel()
    >>> warns()
    2
  """
  prefixes = _internal_prefixes()
  frame = sys._getframe(2)  # pylint: disable=protected-access
  level = 2
  while frame.f_back is not None and os.path.abspath(
      frame.f_code.co_filename).startswith(prefixes):
    frame = frame.f_back
    level += 1
  return level


def warn_at_caller(message: str, category: type[Warning]) -> None:
  """``warnings.warn`` attributed to the first frame outside the library.

  The library's warnings are about the user's call (a rank, a leaf, an
  argument), so they name the user's file and line, not library code, however
  deep the call went (through ``optax.chain``, ``jax.jit`` or
  ``flax.nnx.Optimizer``). Python 3.12's ``skip_file_prefixes`` does this by
  file; this works on 3.11 too.

  Args:
    message: the warning's text.
    category: the warning's class, e.g. ``UserWarning``.

  Returns:
    None.

  Examples:
    >>> import warnings
    >>> from subspace_optax._src import utils
    >>> with warnings.catch_warnings(record=True) as caught:
    ...   warnings.simplefilter('always')
    ...   utils.warn_at_caller('hello', UserWarning)
    >>> caught[0].filename.startswith('<doctest')
    True
  """
  warnings.warn(message, category, stacklevel=caller_stacklevel())
