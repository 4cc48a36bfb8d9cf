"""Updates restricted to a singular subspace of the pre-trained weights.

:func:`weight_subspace` is :func:`subspace_optax.low_rank` with the fixed
basis :func:`subspace_optax.bases.weight_singular`: a projection in weight
space, named as what it is. Its counterpart that *avoids* a weight subspace is
:func:`subspace_optax.continual.orthogonal_to` with
:func:`subspace_optax.continual.weight_subspace_basis`.
"""

from __future__ import annotations

from typing import Any

import optax

from subspace_optax._src import arguments
from subspace_optax._src import utils
from subspace_optax._src.bases import weight_singular as weight_singular_lib
from subspace_optax._src.finetune import reparameterize as reparameterize_lib
from subspace_optax._src.pipeline import layout as layout_lib
from subspace_optax._src.pipeline import low_rank as low_rank_lib


@arguments.declare_static_args('rank', 'dimension_numbers', 'basis_dtype',
                               'precision')
def weight_subspace(
    inner: optax.GradientTransformation,
    *,
    rank: int | float,
    end: str = 'top',
    side: str = 'reference',
    dimension_numbers: Any = None,
    scale: float = 1.0,
    basis_dtype: Any = None,
    precision: Any = None,
) -> optax.GradientTransformationExtraArgs:
  """Run ``inner`` on the gradient's part in a fixed singular subspace of W.

  Per matrix, with the pre-trained weight's oriented view ``W = UΣVᵀ``
  (``k x l``, ``k`` the side picked by ``side``) and ``Q = U_S`` its ``r``
  left singular vectors at ``end`` of the spectrum (``S = 1..r`` for
  ``'top'``, the principal subspace; the last ``r`` of the ``min(k, l)``
  for ``'bottom'``, the minor subspace):

  .. math::
    C = QᵀG,\\qquad U = scale \\cdot Q\\, inner(C),\\qquad U = QQᵀU.

  ``Q`` is computed once at init from the params' values (one SVD per matrix)
  and never refreshed, so every update of a matrix stays in the same
  ``r``-dimensional weight subspace; the inner state has the low-rank shape
  ``(r, l)``. Leaves that are not projected get ``inner`` at full size, as in
  :func:`subspace_optax.low_rank`. To keep updates *out* of the principal
  subspace instead, use :func:`subspace_optax.continual.orthogonal_to` with
  :func:`subspace_optax.continual.weight_subspace_basis`.

  Args:
    inner: any optax transform that does not use ``params`` (e.g.
      ``optax.scale_by_adam()``), followed by the learning rate
      (``optax.chain(optax.scale_by_adam(), optax.scale(-lr))``).
    rank: an int ``<= min(m, n)`` of every projected matrix, or a float
      fraction in (0, 1] of it.
    end: ``'top'`` (principal subspace) or ``'bottom'`` (minor subspace).
    side: which side of each matrix the basis spans (see
      :func:`subspace_optax.low_rank`).
    dimension_numbers: which leaves are matrices (see
      :func:`subspace_optax.low_rank`); stacks ``(L, m, n)`` with
      :func:`subspace_optax.last_two_axes` get one basis per matrix.
    scale: multiplies the update.
    basis_dtype: storage dtype of ``Q`` (see :func:`subspace_optax.low_rank`).
    precision: matmul precision of ``QᵀG`` and ``QN``.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is a
    :class:`subspace_optax.SubspaceState`. ``init`` raises a ``ValueError``
    naming the leaf for an int ``rank`` above ``min(m, n)`` or a weight with
    NaN/Inf entries, and a ``TypeError`` for ``jax.ShapeDtypeStruct`` params.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import subspace_optax as so
    >>> params = {'w': jnp.diag(jnp.array([1.0, 3.0, 2.0]))}
    >>> tx = so.weight_subspace(optax.identity(), rank=1, end='bottom')
    >>> updates, _ = tx.update({'w': jnp.ones((3, 3))}, tx.init(params))
    >>> updates['w'][0]  # only the row of the smallest σ = 1 moves
    Array([1., 1., 1.], dtype=float32)
  """
  reparameterize_lib.validate_rank(rank)
  tx = low_rank_lib.low_rank(
      inner, rank=rank, basis=weight_singular_lib.weight_singular(end),
      side=side, dimension_numbers=dimension_numbers, scale=scale,
      basis_dtype=basis_dtype, precision=precision)

  def init_fn(params):
    # low_rank clamps an int rank to min(m, n); here it is an error.
    for lay in layout_lib.flat_layouts(
        utils.unbox(params), dimension_numbers, side, rank):
      if lay is not None:
        reparameterize_lib.resolve_rank(rank, min(lay.rows, lay.columns),
                                        lay.path)
    return tx.init(params)

  return optax.GradientTransformationExtraArgs(init_fn, tx.update)
