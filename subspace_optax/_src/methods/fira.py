"""Fira: GaLore plus a norm-scaled full-rank residual and a growth limiter."""

from __future__ import annotations

from typing import Any, Optional

import optax

from subspace_optax._src import arguments
from subspace_optax._src.bases import base as bases_lib
from subspace_optax._src.pipeline import low_rank as low_rank_lib
from subspace_optax._src.pipeline import residual as residual_lib
from subspace_optax._src.refresh import every as refresh_lib
from subspace_optax._src.transforms import adam

# Fira's residual stages; the public namespace imports them from here.
fira_residual = residual_lib.fira_residual
scale_residual_by_subspace = residual_lib.scale_residual_by_subspace
subspace_norm_ratio = residual_lib.subspace_norm_ratio


@arguments.declare_static_args(
    'rank', 'refresh', 'mask', 'dimension_numbers', 'mu_dtype', 'basis_dtype',
    'precision')
def fira(
    learning_rate: optax.ScalarOrSchedule,
    rank: int | float = 128,
    *,
    refresh: int | refresh_lib.RefreshPolicy = 200,
    stagger: bool = True,
    basis: str | bases_lib.BasisMethod = 'svd',
    side: str = 'reference',
    on_refresh: str = 'keep',
    align_signs: bool = True,
    scale: float = 0.25,
    limiter: Optional[float] = 1.01,
    reference_residual: bool = False,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    weight_decay: float = 0.0,
    mask: Optional[Any] = None,
    dimension_numbers: Any = None,
    seed: int = 0,
    mu_dtype: Optional[Any] = None,
    basis_dtype: Optional[Any] = None,
    precision: Optional[Any] = None,
) -> optax.GradientTransformationExtraArgs:
  """Fira: GaLore's Adam in a subspace plus a norm-scaled full-rank residual.

  Chen et al., `Fira: Can We Achieve Full-rank Training of LLMs Under Low-rank
  Constraint? <https://arxiv.org/abs/2410.01623>`_, 2024. Per matrix, with
  ``Q`` the top-``r`` singular vectors refreshed every ``T`` steps:

  .. math::
    C = QᵀG,\\quad N = \\frac{m}{\\sqrt{v} + ε},\\quad
    S = limit\\big(φ ⊙ (G - QQᵀG)\\big),\\quad
    W \\leftarrow W - η\\,\\frac{\\sqrt{1-β_2^t}}{1-β_1^t}\\,(α\\, Q N + S)
    - ηλW,

  with ``φ`` from :func:`fira_residual`. As in the reference, ``φ`` comes from
  the uncorrected Adam ratio and the bias correction multiplies both terms
  (:func:`~subspace_optax.transforms.scale_by_adam_moments` inside the
  pipeline, :func:`~subspace_optax.transforms.scale_by_bias_correction` after
  it), so the limiter sees the reference's ``S``.

  Defaults follow the reference recipes (rank 128, ``T = 200``, ``α = 0.25``,
  ``γ = 1.01``, ``ε = 1e-6``; 1B/7B recipes use ``α = 0.0625``) with the basis
  on the smaller side (``side='reference'``), which makes ``φ`` a factor per
  channel of the larger dimension as in Fira; ``side='compact'`` would give
  factors over the smaller dimension, a different method. The residual follows
  the paper; ``reference_residual=True`` reproduces the code's
  ``G - α QQᵀG``. Weight decay is decoupled and applied to the pre-step weight
  (optax order; the reference decays the post-step weight, a difference of
  ``O(η²λ)``).

  Args:
    learning_rate: a float or an optax schedule.
    rank: subspace rank (int, clamped per matrix) or a fraction of ``min(m, n)``.
    refresh: updates between basis refreshes ``T``, or a
      :mod:`subspace_optax.refresh` policy.
    stagger: spread the refreshes of different leaves over the period (int
      ``refresh`` only).
    basis: ``'svd'`` (reference) or any basis of
      :func:`~subspace_optax.low_rank`.
    side: ``'reference'`` (channels of the larger dimension) or another side
      of :func:`~subspace_optax.low_rank`.
    on_refresh: see :func:`~subspace_optax.low_rank`.
    align_signs: see :func:`~subspace_optax.low_rank`.
    scale: ``α``, multiplies the unprojected update.
    limiter: ``γ`` of the norm-growth limiter, None to disable it.
    reference_residual: see :func:`fira_residual`.
    b1, b2, eps: Adam's hyper-parameters (PyTorch ``ε`` placement).
    weight_decay: decoupled weight decay ``λ``.
    mask: optax mask for the weight decay.
    dimension_numbers: which leaves to project.
    seed: seed of random bases.
    mu_dtype: dtype in which Adam's first moment is stored (as in
      ``optax.adamw``); computed in float32. None: float32.
    basis_dtype, precision: storage dtype of the bases and matmul precision
      of the projections; see :func:`~subspace_optax.low_rank`.

  State size: :func:`subspace_optax.state_sizes.fira_bytes`.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; its ``update`` needs
    ``params`` when ``weight_decay`` is used.

  Examples:
    >>> import jax.numpy as jnp
    >>> import subspace_optax as so
    >>> params = {'w': jnp.ones((8, 6))}
    >>> tx = so.fira(learning_rate=1e-3, rank=2, refresh=100)
    >>> state = tx.init(params)
    >>> updates, state = tx.update(params, state, params)
    >>> so.state_bytes(state) == so.state_sizes.fira_bytes(params, rank=2)
    True
  """
  return optax.chain(
      low_rank_lib.low_rank(
          adam.scale_by_adam_moments(b1, b2, eps, mu_dtype=mu_dtype),
          rank=rank,
          refresh=arguments.refresh_policy(refresh, stagger), basis=basis,
          side=side, on_refresh=on_refresh, align_signs=align_signs,
          residual=fira_residual(limiter, reference_residual, scale),
          scale=scale, dimension_numbers=dimension_numbers, seed=seed,
          basis_dtype=basis_dtype, precision=precision),
      adam.scale_by_bias_correction(b1, b2),
      optax.add_decayed_weights(weight_decay, mask),
      optax.scale_by_learning_rate(learning_rate),
  )
