"""Storage dtype and matmul precision of the subspace pipeline's bases.

:func:`with_precision` wraps a :class:`~subspace_optax.bases.BasisMethod` for
:func:`~subspace_optax.low_rank`'s ``basis_dtype`` and ``precision``:

* the float arrays of the basis state (the dense ``(k, r)`` ``Q``) are stored
  in ``basis_dtype``; integer states (seeds, indices, quantized codes) are
  untouched. The projections take operands of that dtype and accumulate in
  float32 (:func:`~subspace_optax.bases.dense_project`). A refresh and a
  transition compute in float32 from the stored basis, and the new basis is
  rounded on store; sign alignment compares float32 columns.
* ``C = QᵀG`` and ``QN`` run under ``jax.default_matmul_precision(precision)``.
  Matmuls that name their precision (the refreshes' Gram matrices,
  orthonormalisation and eigen-solves; transitions) keep ``HIGHEST``.

The cost of each default is documented on :func:`~subspace_optax.low_rank`.
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from subspace_optax._src.bases import base as bases_lib

PRECISIONS = ('default', 'high', 'highest')


def float_dtype(dtype: Any, name: str) -> Optional[np.dtype]:
  """``dtype`` as a floating numpy dtype, or None for None.

  Raises:
    ValueError: ``dtype`` is not a floating dtype (the message names ``name``).
  """
  if dtype is None:
    return None
  try:
    resolved = jnp.dtype(dtype)
  except TypeError:
    resolved = None
  if resolved is None or not jnp.issubdtype(resolved, jnp.floating):
    raise ValueError(
        f'`{name}` must be a floating dtype such as jnp.bfloat16 or '
        f'jnp.float32 (or None for float32), got {dtype!r}.')
  return resolved


def matmul_precision(precision: Any) -> Optional[jax.lax.Precision]:
  """``precision`` as a ``jax.lax.Precision``, or None (JAX's default).

  Raises:
    ValueError: ``precision`` is neither a ``jax.lax.Precision`` nor one of
      :data:`PRECISIONS`.
  """
  if precision is None or isinstance(precision, jax.lax.Precision):
    return precision
  if isinstance(precision, str) and precision in PRECISIONS:
    return jax.lax.Precision(precision)
  raise ValueError(
      '`precision` must be None (JAX\'s default), a jax.lax.Precision or one '
      f'of {PRECISIONS}, got {precision!r}.')


def _is_float(x) -> bool:
  return jnp.issubdtype(jnp.result_type(x), jnp.floating)


def _cast_floats(tree, dtype):
  return jax.tree.map(
      lambda x: x.astype(dtype) if _is_float(x) else x, tree)


def with_precision(
    method: bases_lib.BasisMethod,
    basis_dtype: Any = None,
    precision: Any = None,
) -> bases_lib.BasisMethod:
  """``method`` with its float basis stored in ``basis_dtype`` and its
  projections run under the matmul ``precision``.

  Args:
    method: a basis method.
    basis_dtype: floating dtype of the stored basis; None keeps the method's
      own (float32 for the built-in methods).
    precision: ``jax.lax.Precision`` or ``'default'``/``'high'``/``'highest'``
      for ``C = QᵀG`` and ``QN``; None keeps JAX's default (and any
      ``jax.default_matmul_precision`` the caller set).

  Returns:
    ``method`` itself when both are None, else the wrapped method.

  Raises:
    ValueError: ``basis_dtype`` is not floating or ``precision`` is unknown.
  """
  dtype = float_dtype(basis_dtype, 'basis_dtype')
  precision = matmul_precision(precision)
  if dtype is None and precision is None:
    return method

  def stored(state):
    return state if dtype is None else _cast_floats(state, dtype)

  def computed(state):
    return state if dtype is None else _cast_floats(state, jnp.float32)

  def under_precision(apply):
    if precision is None:
      return apply

    def run(x, state):
      with jax.default_matmul_precision(precision.name.lower()):
        return apply(x, state)

    return run

  def in_float32(refresh):
    if refresh is None:
      return None
    return lambda g, state, key, align: stored(
        refresh(g, computed(state), key, align))

  def as_float32(apply):
    return under_precision(
        lambda x, state: apply(x, state).astype(jnp.float32))

  transition = method.transition
  return method._replace(
      init=lambda k, l, r: stored(method.init(k, l, r)),
      refresh=in_float32(method.refresh),
      first_refresh=in_float32(method.first_refresh),
      project=as_float32(method.project),
      unproject=as_float32(method.unproject),
      transition=None if transition is None else (
          lambda old, new: transition(computed(old), computed(new))),
  )
