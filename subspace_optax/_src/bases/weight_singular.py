"""A fixed basis from the weights: the top or bottom singular vectors of each
pre-trained weight, computed once at init and never refreshed.

With it, :func:`subspace_optax.low_rank` restricts every update to a subspace
of the weight itself, ``U = Q Qᵀ U``: the principal (``'top'``) or minor
(``'bottom'``) singular subspace of ``W`` on the projected side.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from subspace_optax._src.bases import base as bases_lib
from subspace_optax._src.finetune import reparameterize as reparameterize_lib
from subspace_optax._src.pipeline import sharding

ENDS = ('top', 'bottom')


def singular_columns(w: jax.Array, rank: int, end: str, path: str) -> jax.Array:
  """The ``rank`` left singular vectors of ``w`` at ``end`` of its spectrum.

  Args:
    w: ``(*batch, k, l)`` (a stack when ``batch`` is not empty).
    rank: columns, ``<= min(k, l)``.
    end: ``'top'`` (largest singular values) or ``'bottom'`` (the smallest of
      the ``min(k, l)``).
    path: the leaf's name, for errors.

  Returns:
    ``(*batch, k, rank)`` float32, orthonormal columns.

  Raises:
    ValueError: ``w`` (concrete) holds NaN/Inf or ``rank`` is above
      ``min(k, l)``, naming ``path``.
  """
  reparameterize_lib.check_finite(w, path, 'the weight')
  # The SVD needs the whole matrix: gathered once, under an Explicit mesh.
  u, s, _ = reparameterize_lib.thin_svd(sharding.replicate_matrix(w), path)
  size = s.shape[-1]
  rank = reparameterize_lib.resolve_rank(rank, size, path)
  part = slice(0, rank) if end == 'top' else slice(size - rank, size)
  return u[..., part].astype(jnp.float32)


def weight_singular(end: str = 'top') -> bases_lib.BasisMethod:
  """The fixed singular subspace of each weight: ``Q = U_S`` of ``W = UΣVᵀ``.

  On the oriented ``(k, l)`` view of the pre-trained weight (``k`` the
  projected side, chosen by ``low_rank``'s ``side``), ``Q`` holds the ``r``
  left singular vectors with the largest (``end='top'``, the principal
  subspace) or smallest (``end='bottom'``, the minor subspace, of the
  ``min(k, l)``) singular values. ``Q`` is computed once by ``low_rank``'s
  init from the params' values and is never refreshed: its refresh returns the
  basis unchanged, whatever the refresh policy. The update
  ``U = scale · Q · inner(QᵀG)`` then lies in ``span(Q)``:
  ``U = QQᵀU``, the gradient's component in that weight subspace, stepped by
  any inner optimizer.

  Args:
    end: ``'top'`` or ``'bottom'``.

  Returns:
    A :class:`BasisMethod` with ``init_from_weights``, for ``basis=`` of
    :func:`subspace_optax.low_rank` (``init`` needs concrete params, or a
    trace of them; a ``jax.ShapeDtypeStruct`` raises a ``TypeError``). See
    :func:`subspace_optax.weight_subspace` for the preset that also rejects a
    rank above ``min(m, n)``.

  Raises:
    ValueError: ``end`` is not ``'top'`` or ``'bottom'``.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import subspace_optax as so
    >>> params = {'w': jnp.diag(jnp.array([3.0, 2.0, 1.0]))}
    >>> tx = so.low_rank(optax.identity(), rank=1,
    ...                  basis=so.bases.weight_singular('top'))
    >>> updates, _ = tx.update({'w': jnp.ones((3, 3))}, tx.init(params))
    >>> updates['w'][0]  # only the row of σ₁ = 3 moves
    Array([1., 1., 1.], dtype=float32)
  """
  if end not in ENDS:
    raise ValueError(f'`end` must be one of {ENDS}, got {end!r}.')

  def from_weights(w, rank, path):
    return singular_columns(w, rank, end, path)

  def refresh(g, old, key, align):
    del g, key, align  # fixed: never recomputed from a gradient
    return old

  return bases_lib.BasisMethod(
      f'weight_singular_{end}', bases_lib.dense_init, refresh,
      bases_lib.dense_project, bases_lib.dense_unproject,
      bases_lib.dense_transition, init_from_weights=from_weights)
