"""Q-GaLore: GaLore with a quantized basis and lazy, layer-adaptive refreshes."""

from __future__ import annotations

from typing import Any, Optional

import optax

from subspace_optax._src import arguments
from subspace_optax._src.bases import base as bases_lib
from subspace_optax._src.bases import quantized
from subspace_optax._src.pipeline import accumulation
from subspace_optax._src.pipeline import low_rank as low_rank_lib
from subspace_optax._src.pipeline import precision as precision_lib
from subspace_optax._src.refresh import every as refresh_lib
from subspace_optax._src.refresh import lazy
from subspace_optax._src.transforms import adam
from subspace_optax._src.transforms import quantized_moments


@arguments.declare_static_args('rank', 'refresh', 'bits', 'group_size', 'window',
                             'mask', 'dimension_numbers', 'mu_dtype',
                             'accumulate_steps')
def q_galore(
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
    bits: int = 4,
    group_size: int = 256,
    threshold: float = 0.4,
    window: int = 5,
    growth: float = 2.0,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_before_bias_correction: bool = False,
    weight_decay: float = 0.0,
    mask: Optional[Any] = None,
    dimension_numbers: Any = None,
    seed: int = 0,
    eight_bit_moments: bool = True,
    mu_dtype: Optional[Any] = None,
    accumulate_steps: int = 1,
) -> optax.GradientTransformationExtraArgs:
  """Q-GaLore: GaLore with an INT4 basis refreshed lazily per layer.

  Zhang et al., `Q-GaLore: Quantized GaLore with INT4 Projection and
  Layer-Adaptive Low-Rank Gradients <https://arxiv.org/abs/2407.08296>`_, 2024.
  :func:`~subspace_optax.galore`'s update with

  * the basis stored in ``bits``-bit codes, per-group scales and zero points
    (:func:`~subspace_optax.bases.quantized`; 4-bit codes packed two per byte,
    so the basis takes half the bytes of an 8-bit one, unlike the reference);
  * a per-leaf refresh period multiplied by ``growth`` once the mean similarity
    of the last ``window`` successive bases reaches ``threshold``
    (:func:`~subspace_optax.refresh.lazy`; sign-invariant similarity instead of
    the reference's signed first-vector cosine).

  * Adam's moments in 8 bits, block-wise (:func:`~subspace_optax.quantize_moments`,
    the reference's ``QGaLoreAdamW8bit`` uses bitsandbytes' 8-bit Adam);
    ``eight_bit_moments=False`` keeps them float32.

  Q-GaLore's INT8 weights with stochastic rounding are a parameter-storage
  concern, outside the optimizer: see :func:`~subspace_optax.stochastic_round`
  and :func:`~subspace_optax.quantize`.

  Args:
    learning_rate: a float or an optax schedule.
    rank: subspace rank (int, clamped per matrix) or a fraction of ``min(m, n)``.
    refresh: initial updates between refreshes ``T`` (``update_proj_gap``) of
      the lazy policy, or any :mod:`subspace_optax.refresh` policy (which then
      replaces the lazy one: ``threshold``, ``window``, ``growth`` and
      ``stagger`` are not used).
    stagger: spread the first refreshes of different leaves over the period.
    basis: the wrapped dense basis method (``'svd'``, reference).
    side: ``'reference'`` (the reference's ``'std'``) or ``'compact'``.
    on_refresh, align_signs: see :func:`~subspace_optax.low_rank`.
    scale: ``α``, multiplies the unprojected update.
    bits: 4 (reference) or 8.
    group_size: rows of a basis column per quantization group.
    threshold, window, growth: see :func:`~subspace_optax.refresh.lazy`
      (reference: 0.4, 5, 2).
    b1, b2, eps: Adam's hyper-parameters; ``ε = 1e-8`` as the reference's
      ``QGaLoreAdamW8bit`` (bitsandbytes' default; GaLore's is 1e-6).
    eps_before_bias_correction: False (default) adds ``ε`` after the bias
      correction (``optax.scale_by_adam``), as bitsandbytes' Adam kernels
      (``sqrt(v) + ε·sqrt(1-β₂ᵗ)`` against the corrected step); True uses
      GaLore's PyTorch formula
      (:func:`subspace_optax.transforms.scale_by_torch_adam`).
    weight_decay: decoupled weight decay ``λ``.
    mask: optax mask for the weight decay.
    dimension_numbers, seed: see :func:`~subspace_optax.low_rank`.
    eight_bit_moments: store Adam's moments in 8 bits (reference) or float32.
    mu_dtype: dtype in which Adam's first moment is stored (as in
      ``optax.adamw``), e.g. ``jnp.bfloat16``; computed in float32. None:
      float32. With ``eight_bit_moments`` it applies to the moments too small
      to quantize (fewer than 4096 entries). The second moment stays float32.
    accumulate_steps: micro-batches per update, accumulated in the subspace;
      see :func:`~subspace_optax.galore`.

  State size: :func:`subspace_optax.state_sizes.q_galore_bytes`.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; its ``update`` needs
    ``params`` when ``weight_decay`` is used.

  Examples:
    >>> import jax.numpy as jnp
    >>> import subspace_optax as so
    >>> params = {'w': jnp.ones((8, 6))}
    >>> tx = so.q_galore(learning_rate=1e-3, rank=2, group_size=4)
    >>> state = tx.init(params)
    >>> updates, state = tx.update(params, state, params)
    >>> so.state_bytes(state) == so.state_sizes.q_galore_bytes(
    ...     params, rank=2, group_size=4)
    True
  """
  if isinstance(refresh, refresh_lib.RefreshPolicy):
    policy = arguments.refresh_policy(refresh, stagger)
  else:
    refresh_lib.check_period(refresh, 'refresh')
    policy = lazy.lazy(refresh, threshold, window, growth, stagger)
  mu_dtype = precision_lib.float_dtype(mu_dtype, 'mu_dtype')
  inner = (
      adam.scale_by_torch_adam(b1, b2, eps, mu_dtype=mu_dtype)
      if eps_before_bias_correction
      else optax.scale_by_adam(b1, b2, eps, mu_dtype=mu_dtype))
  if eight_bit_moments:
    inner = quantized_moments.quantize_moments(inner)
  return optax.chain(
      low_rank_lib.low_rank(
          inner, rank=rank,
          refresh=policy,
          basis=quantized.quantized(basis, bits, group_size), side=side,
          on_refresh=on_refresh, align_signs=align_signs, scale=scale,
          dimension_numbers=dimension_numbers, seed=seed,
          accumulate_steps=accumulate_steps),
      *accumulation.once_per_update([
          optax.add_decayed_weights(weight_decay, mask),
          optax.scale_by_learning_rate(learning_rate),
      ], accumulate_steps),
  )
