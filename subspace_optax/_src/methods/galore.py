"""Named methods, each a few lines composed from the pipeline stages."""

from __future__ import annotations

from typing import Any, Optional

import optax

from subspace_optax._src import arguments
from subspace_optax._src.bases import base as bases_lib
from subspace_optax._src.pipeline import accumulation
from subspace_optax._src.pipeline import low_rank as low_rank_lib
from subspace_optax._src.pipeline import precision as precision_lib
from subspace_optax._src.refresh import every as refresh_lib
from subspace_optax._src.transforms import adam


@arguments.declare_static_args(
    'rank', 'refresh', 'mask', 'dimension_numbers', 'mu_dtype', 'basis_dtype',
    'precision', 'accumulate_steps')
def galore(
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
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    eps_before_bias_correction: bool = True,
    weight_decay: float = 0.0,
    mask: Optional[Any] = None,
    dimension_numbers: Any = None,
    seed: int = 0,
    mu_dtype: Optional[Any] = None,
    basis_dtype: Optional[Any] = None,
    precision: Optional[Any] = None,
    accumulate_steps: int = 1,
) -> optax.GradientTransformationExtraArgs:
  """GaLore: Adam in the top-``rank`` singular subspace of each gradient.

  Zhao et al., `GaLore: Memory-Efficient LLM Training by Gradient Low-Rank
  Projection <https://arxiv.org/abs/2403.03507>`_, ICML 2024. Per matrix, with
  ``Q`` the top-``r`` singular vectors of ``G`` refreshed every ``T`` steps:

  .. math::
    C = QᵀG,\\quad N = Adam(C),\\quad
    W \\leftarrow W - η\\,(α\\, Q N + λ W).

  Defaults follow the reference recipes (rank 128, ``T = 200``, ``α = 0.25``,
  the PyTorch Adam formula with ``ε = 1e-6``, the basis on the reference's side,
  ``proj_type='std'``). Improvements over the reference, each switchable:
  refreshes are staggered across leaves, and SVD signs are aligned with the
  old basis. ``side='compact'`` (the basis on the larger side, as
  ``optax.contrib.galore``) keeps a smaller state at a given rank but trained
  worse per byte of state (see :func:`low_rank`).
  Weight decay is decoupled and applied to the pre-step weight (optax order).

  Args:
    learning_rate: a float or an optax schedule.
    rank: subspace rank (int, clamped per matrix) or a fraction of ``min(m, n)``.
    refresh: updates between basis refreshes ``T`` (``update_proj_gap``), or a
      :mod:`subspace_optax.refresh` policy.
    stagger: spread the refreshes of different leaves over the period (int
      ``refresh`` only).
    basis: ``'svd'`` (default: the paper's and the reference code's exact SVD)
      or ``'randomized'`` (much cheaper refresh; on an H100 the slowest
      refresh step of LLaMA-130M, one weight stacked over 12 layers, took
      69 ms with it and 1.1 s with JAX's GPU SVD), any other built-in name
      (the same names as :func:`~subspace_optax.frugal` and
      :func:`~subspace_optax.low_rank`: ``'random'`` is a random orthonormal
      basis, ``'columns'`` random coordinates), or any
      :mod:`subspace_optax.bases` method.
    side: see :func:`low_rank`.
    on_refresh: see :func:`low_rank`.
    align_signs: see :func:`low_rank`.
    scale: ``α``, multiplies the unprojected update (``galore_scale``).
    b1, b2, eps: Adam's hyper-parameters.
    eps_before_bias_correction: True uses the PyTorch formula
      (:func:`subspace_optax.transforms.scale_by_torch_adam`), False uses
      ``optax.scale_by_adam``.
    weight_decay: decoupled weight decay ``λ``.
    mask: optax mask for the weight decay (a pytree of bools or a callable).
    dimension_numbers: which leaves to project; see :func:`low_rank`.
    seed: seed of random bases.
    mu_dtype: dtype in which Adam's first moment is stored (as in
      ``optax.adamw``), e.g. ``jnp.bfloat16``; computed in float32. None:
      float32. The second moment stays float32.
    basis_dtype: dtype in which the bases are stored; None: float32. See
      :func:`low_rank`.
    precision: matmul precision of the projections; None: JAX's default. See
      :func:`low_rank`.
    accumulate_steps: micro-batches per update, accumulated in the subspace
      (``r x n`` per matrix instead of ``optax.MultiSteps``' full-size copy);
      the weight decay and learning rate act once per update. See
      :func:`low_rank`.

  State size: :func:`subspace_optax.state_sizes.galore_bytes` (``mu_bytes``,
  ``basis_bytes`` for other dtypes).

  Returns:
    An ``optax.GradientTransformationExtraArgs``; its ``update`` needs
    ``params`` when ``weight_decay`` is used.

  Examples:
    >>> import jax.numpy as jnp
    >>> import subspace_optax as so
    >>> params = {'w': jnp.ones((8, 6)), 'b': jnp.zeros(6)}
    >>> tx = so.galore(learning_rate=1e-3, rank=2, refresh=100)
    >>> state = tx.init(params)
    >>> updates, state = tx.update(params, state, params)
    >>> updates['w'].shape
    (8, 6)
    >>> so.state_bytes(state) == so.state_sizes.galore_bytes(params, rank=2)
    True
  """
  mu_dtype = precision_lib.float_dtype(mu_dtype, 'mu_dtype')
  inner = (
      adam.scale_by_torch_adam(b1, b2, eps, mu_dtype=mu_dtype)
      if eps_before_bias_correction
      else optax.scale_by_adam(b1, b2, eps, mu_dtype=mu_dtype))
  return optax.chain(
      low_rank_lib.low_rank(
          inner, rank=rank, refresh=arguments.refresh_policy(refresh, stagger),
          basis=basis, side=side, on_refresh=on_refresh,
          align_signs=align_signs, scale=scale,
          dimension_numbers=dimension_numbers, seed=seed,
          basis_dtype=basis_dtype, precision=precision,
          accumulate_steps=accumulate_steps),
      *accumulation.once_per_update([
          optax.add_decayed_weights(weight_decay, mask),
          optax.scale_by_learning_rate(learning_rate),
      ], accumulate_steps),
  )
