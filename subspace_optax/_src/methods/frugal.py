"""FRUGAL: a state-full optimizer in a subspace, a state-free one outside it."""

from __future__ import annotations

from typing import Any, Optional

import optax

from subspace_optax._src import arguments
from subspace_optax._src.bases import base as bases_lib
from subspace_optax._src.bases import index
from subspace_optax._src.bases import registry
from subspace_optax._src.pipeline import low_rank as low_rank_lib
from subspace_optax._src.pipeline import residual as residual_lib
from subspace_optax._src.refresh import every as refresh_lib
from subspace_optax._src.transforms import adam

# FRUGAL's reference names; every name of the basis registry is accepted too.
BASES = ('svd', 'random', 'columns', 'blocks')


def _basis_method(basis, rank) -> bases_lib.BasisMethod:
  if isinstance(basis, str) and basis == 'blocks':
    return index.blocks(rank)  # ``rank`` is the density
  return registry.resolve(basis)


@arguments.declare_static_args(
    'rank', 'refresh', 'mask', 'dimension_numbers', 'mu_dtype', 'basis_dtype',
    'precision')
def frugal(
    learning_rate: optax.ScalarOrSchedule,
    rank: int | float = 0.25,
    *,
    refresh: int | refresh_lib.RefreshPolicy = 200,
    stagger: bool = True,
    basis: str | bases_lib.BasisMethod = 'svd',
    side: str = 'reference',
    on_refresh: str = 'reset',
    align_signs: bool = True,
    scale: float = 1.0,
    residual: str | optax.GradientTransformation | None = 'sign',
    residual_scale: float = 1.0,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    mask: Optional[Any] = None,
    dimension_numbers: Any = None,
    seed: int = 0,
    mu_dtype: Optional[Any] = None,
    basis_dtype: Optional[Any] = None,
    precision: Optional[Any] = None,
) -> optax.GradientTransformationExtraArgs:
  """FRUGAL: Adam in a subspace, signSGD (or SGD) on the rest of the gradient.

  Zmushko, Beznosikov, Takáč & Horváth, `FRUGAL: Memory-Efficient Optimization
  by Reducing State Overhead for Scalable Training
  <https://arxiv.org/abs/2411.07837>`_, ICML 2025, Algorithm 1. Per matrix,
  with a basis ``Q`` refreshed every ``T`` updates:

  .. math::
    C = QᵀG,\\quad N = Adam(C),\\quad
    U = s\\,\\big(Q N + s_r\\, sign(G - QQᵀG)\\big),\\quad
    W \\leftarrow W - η\\,(U + λ W).

  The update is full rank: the state-free residual moves every coordinate, the
  state-full Adam only the subspace. Leaves that are not projected (see
  ``dimension_numbers``; the reference projects only the attention and MLP
  matrices) get full Adam, as in the reference.

  Bases (``basis``): ``'svd'`` (top singular vectors), ``'random'`` (random
  orthonormal, QR of a Gaussian), ``'columns'`` (a random subset of coordinates
  of the projected axis; gather/scatter, state ``rank`` int32 indices),
  ``'blocks'`` (whole matrices active or not, BAdam-like; ``rank`` is then the
  probability that a matrix is active and the moments are full size, see
  :func:`subspace_optax.bases.blocks`), or any basis method.

  Reference behaviour (philip-zmushko/FRUGAL) by default: ``on_refresh='reset'``
  zeroes the moments of a refreshed leaf *and* restarts its bias correction
  (:func:`subspace_optax.transforms.scale_by_resettable_adam`); Adam's ``ε`` is
  added after the bias correction; the basis sits on the smaller side
  (``side='reference'``), so a float ``rank = ρ`` keeps Adam state for the
  fraction ``ρ`` of each matrix. The paper's Algorithm 1 instead carries the
  state into the new basis: ``on_refresh='transport'`` (svd, random and columns
  bases). Refreshes are staggered across leaves (``stagger=False``: all leaves
  together, as the reference). Weight decay is decoupled and applied to the
  pre-step weight, as in the reference.

  Args:
    learning_rate: a float or an optax schedule.
    rank: density ``ρ`` in (0, 1] (a fraction of ``min(m, n)``) or an int rank;
      for ``basis='blocks'`` the probability in [0, 1] that a matrix is active.
    refresh: updates between basis refreshes ``T``, or a
      :mod:`subspace_optax.refresh` policy.
    stagger: spread the refreshes of different leaves over the period (int
      ``refresh`` only).
    basis: ``'svd'``, ``'random'``, ``'columns'``, ``'blocks'``, any other
      name of the basis registry (as :func:`~subspace_optax.galore`), or a
      :class:`~subspace_optax.bases.BasisMethod`.
    side: ``'reference'`` (basis on the smaller side) or ``'compact'``.
    on_refresh: ``'reset'`` (reference), ``'transport'`` (paper), ``'keep'``.
    align_signs: see :func:`~subspace_optax.low_rank`.
    scale: ``s``, multiplies the whole update of projected leaves
      (``proj_params_lr_scale``).
    residual: ``'sign'`` (signSGD), ``'sgd'`` (the raw residual), None (no
      residual: GaLore with FRUGAL's defaults), or an optax transform.
    residual_scale: ``s_r``, the residual's step relative to Adam's
      (``inactive_lr_scale``: 1.0 for pre-training, 0.1 for fine-tuning).
    b1, b2, eps: Adam's hyper-parameters.
    weight_decay: decoupled weight decay ``λ``.
    mask: optax mask for the weight decay.
    dimension_numbers: which leaves to project; see
      :func:`~subspace_optax.low_rank`.
    seed: seed of the random bases.
    mu_dtype: dtype in which Adam's first moment is stored (as in
      ``optax.adamw``); computed in float32. None: float32.
    basis_dtype, precision: storage dtype of the bases and matmul precision
      of the projections; see :func:`~subspace_optax.low_rank`.

  State size: :func:`subspace_optax.state_sizes.frugal_bytes`.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; its ``update`` needs
    ``params`` when ``weight_decay`` is used.

  Examples:
    >>> import jax.numpy as jnp
    >>> import subspace_optax as so
    >>> params = {'w': jnp.ones((8, 6))}
    >>> tx = so.frugal(learning_rate=1e-3, rank=0.5, refresh=100)
    >>> state = tx.init(params)
    >>> updates, state = tx.update(params, state, params)
    >>> updates['w'].shape  # full rank: the sign residual moves every entry
    (8, 6)
    >>> so.state_bytes(state) == so.state_sizes.frugal_bytes(params, rank=0.5)
    True
  """
  if isinstance(basis, str) and basis == 'blocks' and not (
      isinstance(rank, (int, float)) and 0 <= rank <= 1):
    raise ValueError(
        "With basis='blocks', `rank` is the probability in [0, 1] that a "
        f'matrix is active (FRUGAL\'s density), got {rank!r}.')
  method = _basis_method(basis, rank)
  whole = method.name == 'blocks'  # the coefficients are the whole matrix
  pipeline_rank = 1.0 if whole else rank
  pipeline_side = 'reference' if whole else side
  return optax.chain(
      low_rank_lib.low_rank(
          adam.scale_by_resettable_adam(b1, b2, eps, mu_dtype=mu_dtype),
          rank=pipeline_rank,
          refresh=arguments.refresh_policy(refresh, stagger), basis=method,
          side=pipeline_side, on_refresh=on_refresh, align_signs=align_signs,
          residual=residual_lib.frugal_residual(
              residual, scale * residual_scale), scale=scale,
          dimension_numbers=dimension_numbers, seed=seed,
          basis_dtype=basis_dtype, precision=precision),
      optax.add_decayed_weights(weight_decay, mask),
      optax.scale_by_learning_rate(learning_rate),
  )
