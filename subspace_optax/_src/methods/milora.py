"""MiLoRA and PiSSA: LoRA factors from the minor or principal singular triplets.

Wang et al., `MiLoRA: Harnessing Minor Singular Components for
Parameter-Efficient LLM Finetuning <https://arxiv.org/abs/2406.09044>`_, 2024;
Meng et al., `PiSSA: Principal Singular Values and Singular Vectors Adaptation
of Large Language Models <https://arxiv.org/abs/2404.02948>`_, 2024.
"""

from __future__ import annotations

from typing import Any, Optional

import jax.numpy as jnp
import optax

from subspace_optax._src import arguments
from subspace_optax._src.finetune import reparameterize as reparameterize_lib

ENDS = ('top', 'bottom')


def product_difference(factors, step) -> Any:
  """``(A + u_A)(B + u_B) - AB = u_A (B + u_B) + A u_B`` for one matrix's
  LoRA factors (``down = A``, ``up = B``) and their step ``u``: rounding
  relative to the update, not to ``AB``."""
  mm = reparameterize_lib.matmul
  return (mm('mr,rn->mn', step['down'], factors['up'] + step['up'])
          + mm('mr,rn->mn', factors['down'], step['up']))


def singular_lora_factorization(
    rank: int | float = 16, end: str = 'bottom',
) -> reparameterize_lib.Factorization:
  """LoRA factors from ``r`` singular triplets of ``W = UΣVᵀ``.

  ``down = U_s Σ_s^½`` (``m x r``), ``up = Σ_s^½ V_sᵀ`` (``r x n``) over the
  triplets ``s``: the top ``r`` (``end='top'``, PiSSA) or the bottom ``r``
  (``end='bottom'``, MiLoRA); ``reconstruct = down @ up``.
  """
  if end not in ENDS:
    raise ValueError(f'`end` must be one of {ENDS}, got {end!r}.')
  reparameterize_lib.validate_rank(rank)

  def init(w, key, path):
    del key
    u, s, v = reparameterize_lib.thin_svd(w, path)
    k = s.shape[-1]
    r = reparameterize_lib.resolve_rank(rank, k, path)
    part = slice(0, r) if end == 'top' else slice(k - r, k)
    root = jnp.sqrt(s[..., part])[..., None, :]
    down = u[..., part] * root
    up = jnp.swapaxes(v[..., part] * root, -1, -2)
    return {'down': down, 'up': up}, {}

  def reconstruct(factors, frozen):
    del frozen
    return reparameterize_lib.matmul('mr,rn->mn', factors['down'],
                                     factors['up'])

  def difference(factors, step, frozen):
    del frozen
    return product_difference(factors, step)

  name = 'pissa' if end == 'top' else 'milora'
  return reparameterize_lib.Factorization(name, init, reconstruct,
                                          difference=difference)


def _preset(end, learning_rate, rank, b1, b2, eps, weight_decay, mask, others,
            stacked):
  return reparameterize_lib.reparameterize(
      singular_lora_factorization(rank, end),
      optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps,
                  weight_decay=weight_decay),
      mask=mask, others=others, stacked=stacked)


@arguments.declare_static_args('rank', 'mask', 'stacked')
def milora(
    learning_rate: optax.ScalarOrSchedule,
    rank: int | float = 16,
    *,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    mask: Any = None,
    others: Optional[optax.GradientTransformation] = None,
    stacked: bool = True,
) -> optax.GradientTransformationExtraArgs:
  """MiLoRA: LoRA initialised on the minor singular triplets.

  Wang et al., `MiLoRA: Harnessing Minor Singular Components for
  Parameter-Efficient LLM Finetuning <https://arxiv.org/abs/2406.09044>`_,
  2024. With ``W = UΣVᵀ`` and its bottom ``r`` triplets ``(U_m, Σ_m, V_m)``
  (the flax ``(in, out)`` kernel view: ``x W``):

  .. math::
    W' = (W - B_0A_0) + BA,\\qquad B_0 = U_mΣ_m^{1/2}\\ (m \\times r),\\quad
    A_0 = Σ_m^{1/2}V_mᵀ\\ (r \\times n),

  then ordinary LoRA (AdamW on ``down = B``, ``up = A``); ``W - B_0A_0`` is
  frozen and held by the params. Exact on the dense model through
  :func:`subspace_optax.reparameterize`. State per matrix: ``(m + n) r``
  factors and AdamW's two moments. Departure: LoRA's ``α/r`` scale is 1 (the
  factors already carry the singular values' scale); dropout on the adapter
  path cannot be expressed as a weight update and is left out.

  Args:
    learning_rate: a float or an optax schedule.
    rank: ``r``, an int ``<= min(m, n)`` or a float fraction of it.
    b1: AdamW's first-moment decay.
    b2: AdamW's second-moment decay.
    eps: AdamW's epsilon.
    weight_decay: AdamW's decoupled weight decay, on both factors.
    mask: which leaves to reparameterise (see
      :func:`subspace_optax.reparameterize`).
    others: optimizer of the other leaves; None freezes them.
    stacked: leaves of rank > 2 are stacks of matrices.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Examples:
    >>> import jax.numpy as jnp
    >>> import subspace_optax as so
    >>> params = {'w': jnp.diag(jnp.array([4.0, 1.0]))}
    >>> so.milora(1e-3, rank=1).init(params).factors['w']['up']
    Array([[0., 1.]], dtype=float32)

  References:
    Wang et al., 2024, arXiv:2406.09044.
  """
  return _preset('bottom', learning_rate, rank, b1, b2, eps, weight_decay,
                 mask, others, stacked)


@arguments.declare_static_args('rank', 'mask', 'stacked')
def pissa(
    learning_rate: optax.ScalarOrSchedule,
    rank: int | float = 16,
    *,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    mask: Any = None,
    others: Optional[optax.GradientTransformation] = None,
    stacked: bool = True,
) -> optax.GradientTransformationExtraArgs:
  """PiSSA: LoRA initialised on the principal singular triplets.

  Meng et al., `PiSSA: Principal Singular Values and Singular Vectors
  Adaptation of Large Language Models <https://arxiv.org/abs/2404.02948>`_,
  2024. As :func:`milora` with the top ``r`` triplets:
  ``down = U_rΣ_r^{1/2}``, ``up = Σ_r^{1/2}V_rᵀ``, ``W_res = W - down·up``
  frozen. Departures: exact SVD (PiSSA also offers a fast randomized one);
  scale 1 (PiSSA sets ``lora_alpha = r``); no dropout.

  Args:
    learning_rate: a float or an optax schedule.
    rank: ``r``, an int ``<= min(m, n)`` or a float fraction of it.
    b1: AdamW's first-moment decay.
    b2: AdamW's second-moment decay.
    eps: AdamW's epsilon.
    weight_decay: AdamW's decoupled weight decay, on both factors.
    mask: which leaves to reparameterise (see
      :func:`subspace_optax.reparameterize`).
    others: optimizer of the other leaves; None freezes them.
    stacked: leaves of rank > 2 are stacks of matrices.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Examples:
    >>> import jax.numpy as jnp
    >>> import subspace_optax as so
    >>> params = {'w': jnp.diag(jnp.array([4.0, 1.0]))}
    >>> so.pissa(1e-3, rank=1).init(params).factors['w']['up']
    Array([[2., 0.]], dtype=float32)

  References:
    Meng et al., 2024, arXiv:2404.02948.
  """
  return _preset('top', learning_rate, rank, b1, b2, eps, weight_decay,
                 mask, others, stacked)
