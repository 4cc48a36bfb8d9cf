"""Q-GaLore: GaLore with a quantized basis and lazy, layer-adaptive refreshes."""

from __future__ import annotations

import math
from typing import Any, Optional

import jax
import numpy as np
import optax

from subspace_optax._src import adam
from subspace_optax._src import bases as bases_lib
from subspace_optax._src import layout as layout_lib
from subspace_optax._src import lazy_refresh
from subspace_optax._src import low_rank as low_rank_lib
from subspace_optax._src import quantize
from subspace_optax._src import quantized_moments


def q_galore(
    learning_rate: optax.ScalarOrSchedule,
    rank: int | float = 128,
    refresh_every: int = 200,
    scale: float = 0.25,
    bits: int = 4,
    group_size: int = 256,
    threshold: float = 0.4,
    window: int = 5,
    growth: float = 2.0,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    eps_before_bias_correction: bool = True,
    weight_decay: float = 0.0,
    weight_decay_mask: Optional[Any] = None,
    side: str = 'compact',
    basis: str | bases_lib.BasisMethod = 'svd',
    stagger: bool = True,
    align_signs: bool = True,
    on_refresh: str = 'keep',
    dimension_numbers: Any = None,
    seed: int = 0,
    eight_bit_moments: bool = True,
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
    refresh_every: initial updates between refreshes (``update_proj_gap``).
    scale: ``α``, multiplies the unprojected update.
    bits: 4 (reference) or 8.
    group_size: rows of a basis column per quantization group.
    threshold, window, growth: see :func:`~subspace_optax.refresh.lazy`
      (reference: 0.4, 5, 2).
    b1, b2, eps, eps_before_bias_correction: Adam, as
      :func:`~subspace_optax.galore`.
    weight_decay: decoupled weight decay ``λ``.
    weight_decay_mask: optax mask for the weight decay.
    side: ``'compact'`` or ``'reference'`` (the reference's ``'std'``).
    basis: the wrapped dense basis method (``'svd'``, reference).
    stagger: spread the first refreshes of different leaves over the period.
    align_signs, on_refresh, dimension_numbers, seed: see
      :func:`~subspace_optax.low_rank`.
    eight_bit_moments: store Adam's moments in 8 bits (reference) or float32.
  """
  inner = (
      adam.scale_by_torch_adam(b1, b2, eps) if eps_before_bias_correction
      else optax.scale_by_adam(b1, b2, eps))
  if eight_bit_moments:
    inner = quantized_moments.quantize_moments(inner)
  return optax.chain(
      low_rank_lib.low_rank(
          inner, rank=rank,
          refresh=lazy_refresh.lazy(
              refresh_every, threshold, window, growth, stagger),
          basis=quantize.quantized(basis, bits, group_size), side=side,
          on_refresh=on_refresh, align_signs=align_signs, scale=scale,
          dimension_numbers=dimension_numbers, seed=seed),
      optax.add_decayed_weights(weight_decay, weight_decay_mask),
      optax.scale_by_learning_rate(learning_rate),
  )


def _is_layout(x) -> bool:
  return x is None or isinstance(x, layout_lib.MatrixLayout)


def q_galore_bytes(
    params: Any,
    rank: int | float = 128,
    bits: int = 4,
    group_size: int = 256,
    window: int = 5,
    side: str = 'compact',
    dimension_numbers: Any = None,
    eight_bit_moments: bool = True,
) -> int:
  """Analytic state size of :func:`q_galore`.

  Per projected matrix (``k x r`` basis, ``r x l`` coefficients): basis codes
  ``k r`` bytes (8 bits) or ``k ceil(r/2)`` (4 bits), a float32 scale and a
  uint8 zero point per group (``5 ceil(k/g) r`` bytes), two moments of
  ``r x l``. Per projected leaf the lazy schedule: four int32 and ``window``
  float32. Other leaves keep full Adam moments of their shape. Plus the
  pipeline's and Adam's step counts. A moment of ``s`` entries takes ``4 s``
  bytes in float32; with ``eight_bit_moments``, a moment leaf (the stack of
  all matrices of a leaf) of at least 4096 entries takes ``s + 4 s / b``
  (:func:`~subspace_optax._src.quantized_moments.moment_bytes`).
  """
  layouts = layout_lib.leaf_layouts(params, dimension_numbers, side, rank)
  moment = (quantized_moments.moment_bytes if eight_bit_moments
            else lambda shape: 4 * math.prod(shape))
  total = 2 * 4
  for p, lay in zip(jax.tree.leaves(params),
                    jax.tree.leaves(layouts, is_leaf=_is_layout)):
    if lay is None:
      total += 2 * moment(np.shape(p))
      continue
    k, r = lay.projected_dim, lay.rank
    codes = k * r if bits == 8 else k * (-(-r // 2))
    groups = -(-k // group_size) * r
    moments = 2 * moment(lay.coefficient_shape)
    total += lay.num_matrices * (codes + 5 * groups) + moments
    total += 4 * 4 + 4 * window
  return total
