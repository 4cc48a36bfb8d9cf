"""LoRA as an optimizer: the low-rank adapter trained on the dense weights.

Hu et al., `LoRA: Low-Rank Adaptation of Large Language Models
<https://arxiv.org/abs/2106.09685>`_, 2021.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import jax
import jax.numpy as jnp
import optax

from subspace_optax._src import arguments
from subspace_optax._src.finetune import reparameterize as reparameterize_lib
from subspace_optax._src.methods import milora as milora_lib


def lora_factorization(
    rank: int | float = 8, *, alpha: Optional[float] = None,
) -> reparameterize_lib.Factorization:
  """LoRA's factors ``down`` (``m x r``, Kaiming-uniform) and ``up``
  (``r x n``, zeros); ``reconstruct = (α/r) down @ up`` (scale 1 without
  ``alpha``)."""
  reparameterize_lib.validate_rank(rank)

  def init(w, key, path):
    m, n = w.shape[-2:]
    r = reparameterize_lib.resolve_rank(rank, min(m, n), path)
    bound = 1.0 / math.sqrt(m)  # kaiming_uniform_(a=√5) with fan_in = m
    down = jax.random.uniform(key, w.shape[:-2] + (m, r), w.dtype, -bound,
                              bound)
    up = jnp.zeros(w.shape[:-2] + (r, n), w.dtype)
    return {'down': down, 'up': up}, {}

  def reconstruct(factors, frozen):
    del frozen
    r = factors['down'].shape[-1]
    scale = 1.0 if alpha is None else alpha / r
    return scale * reparameterize_lib.matmul('mr,rn->mn', factors['down'],
                                             factors['up'])

  def difference(factors, step, frozen):
    del frozen
    r = factors['down'].shape[-1]
    scale = 1.0 if alpha is None else alpha / r
    return scale * milora_lib.product_difference(factors, step)

  return reparameterize_lib.Factorization('lora', init, reconstruct,
                                          difference=difference)


@arguments.declare_static_args('rank', 'mask', 'stacked', 'seed')
def lora(
    learning_rate: optax.ScalarOrSchedule,
    rank: int | float = 8,
    *,
    alpha: Optional[float] = None,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    mask: Any = None,
    others: Optional[optax.GradientTransformation] = None,
    stacked: bool = True,
    seed: int = 0,
) -> optax.GradientTransformationExtraArgs:
  """LoRA: AdamW on a low-rank adapter, applied to the dense weights.

  Hu et al., `LoRA: Low-Rank Adaptation of Large Language Models
  <https://arxiv.org/abs/2106.09685>`_, 2021. In the flax ``(in, out)`` kernel
  view (``x W``, ``m`` inputs):

  .. math::
    W' = W + \\frac{α}{r}\\,A B,\\qquad A \\in R^{m×r} \\sim
    U(-1/\\sqrt{m}, 1/\\sqrt{m}),\\quad B = 0 \\in R^{r×n},

  ``W`` frozen, ``A`` (``down``) and ``B`` (``up``) trained: PEFT's init
  (``kaiming_uniform_(a=√5)`` on ``lora_A``, zeros on ``lora_B``). Exact on
  the dense model through :func:`subspace_optax.reparameterize`: the weight
  itself is updated by ``(α/r)(A'B' - AB)``, no adapter module is added.
  State per matrix: ``(m + n) r`` factors and AdamW's two moments.
  Departures: ``alpha=None`` means a scale of 1 (PEFT's default
  ``lora_alpha = 8`` with ``r = 8``); adapter dropout is left out (it is not a
  weight update); biases are frozen unless ``others`` trains them (PEFT's
  ``bias='none'``).

  Args:
    learning_rate: a float or an optax schedule.
    rank: ``r``, an int ``<= min(m, n)`` or a float fraction of it.
    alpha: LoRA's ``α``; the adapter is scaled by ``α / r``.
    b1: AdamW's first-moment decay.
    b2: AdamW's second-moment decay.
    eps: AdamW's epsilon.
    weight_decay: AdamW's decoupled weight decay, on both factors.
    mask: which leaves to reparameterise (see
      :func:`subspace_optax.reparameterize`).
    others: optimizer of the other leaves; None freezes them.
    stacked: leaves of rank > 2 are stacks of matrices.
    seed: seeds ``A``, one key per leaf.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Examples:
    >>> import jax.numpy as jnp
    >>> import subspace_optax as so
    >>> params = {'w': jnp.ones((6, 4))}
    >>> state = so.lora(1e-3, rank=2).init(params)
    >>> state.factors['w']['down'].shape, state.factors['w']['up'].shape
    ((6, 2), (2, 4))

  References:
    Hu et al., 2021, arXiv:2106.09685.
  """
  return reparameterize_lib.reparameterize(
      lora_factorization(rank, alpha=alpha),
      optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps,
                  weight_decay=weight_decay),
      mask=mask, others=others, stacked=stacked, seed=seed)
