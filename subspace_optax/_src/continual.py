"""Continual-learning presets composed from :func:`orthogonal_to`.

* :func:`sculpt` — constrained full fine-tuning (Sculpting Subspaces): AdamW
  whose final update is kept orthogonal (two-sided) to each weight's important
  singular directions from earlier tasks.
* :func:`gpm` — Gradient Projection Memory: SGD with momentum whose update is
  kept orthogonal to the span of earlier tasks' layer inputs (input side).

Both are ``optax.chain(inner, [weight decay], learning rate, orthogonal_to)``
so the invariant is on the update applied to the params.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional

import optax

from subspace_optax._src import deprecation
from subspace_optax._src import orthogonal
from subspace_optax._src import presets


def sculpt_capacity(max_fraction: float = 0.8) -> Callable[[int, int], int]:
  """Capacity ``floor(max_fraction * min(m, n))`` per side, the largest rank
  :func:`sculpt_memory` keeps (so its memories fit without overflow)."""
  if not 0.0 < max_fraction <= 1.0:
    raise ValueError(f'`max_fraction` must lie in (0, 1], got {max_fraction}.')
  return lambda rows, columns: max(
      1, math.floor(max_fraction * min(rows, columns) + 1e-6))


@deprecation.renamed_arguments(weight_decay_mask='mask')
@presets.declare_static_args(
    'max_fraction', 'weight_decay', 'mask', 'dimension_numbers')
def sculpt(
    learning_rate: optax.ScalarOrSchedule,
    *,
    memory: Any = None,
    mode: str = 'two_sided',
    max_fraction: float = 0.8,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    mask: Optional[Any] = None,
    dimension_numbers: Any = None,
) -> optax.GradientTransformation:
  """Constrained full fine-tuning for continual learning (Sculpting Subspaces).

  Nayak et al., `Sculpting Subspaces: Constrained Full Fine-Tuning in LLMs for
  Continual Learning <https://arxiv.org/abs/2504.07097>`_, 2025. Every weight
  is trained (no adapters, no parameters per task), but its update is kept out
  of the top singular directions ``U_h, V_h`` of the weights at the start of
  the task (chosen per layer by :func:`sculpt_memory`):

  .. math::
    Δ = (I - U_hU_hᵀ)\\, η\\,(adam(g) + λθ)\\, (I - V_hV_hᵀ).

  This applies the mask to the final update (AdamW's step, decay included),
  which the reference code approximates by projecting the gradients of a
  factored parametrisation. It stores ``(m + n) k`` floats per matrix besides
  AdamW's moments (the reference keeps ≈ 2x the weights). ``mode='block'``
  gives the blog's formula ``Δ - U_hU_hᵀΔV_hV_hᵀ``.

  At each task boundary::

    memory = sculpt_memory(params, importance, max_fraction=max_fraction)
    opt_state = set_memory(opt_state, memory)      # replaces, no retrace

  Args:
    learning_rate: a float or an optax schedule (e.g. :func:`rewarm_schedule`).
    memory: initial protected memory (None: nothing protected yet).
    mode: ``'two_sided'`` (default) or ``'block'``.
    max_fraction: ``trr``, the largest retained fraction; sets the memory's
      capacity ``floor(max_fraction * min(m, n))`` per side.
    b1, b2, eps: Adam's parameters.
    weight_decay: decoupled weight decay (applied inside the projection; a
      Python 0 leaves the decay stage out, so it is a static argument).
    mask: optax mask for the decay.
    dimension_numbers: which leaves are matrices (default every 2-D leaf).

  Returns:
    An ``optax.GradientTransformation``.

  Examples:
    >>> import jax.numpy as jnp
    >>> from subspace_optax import continual
    >>> params = {'w': jnp.ones((8, 6))}
    >>> tx = continual.sculpt(learning_rate=1e-3, weight_decay=1e-2)
    >>> state = tx.init(params)
    >>> state = continual.set_memory(state, continual.sculpt_memory(params))
    >>> updates, state = tx.update(params, state, params)
    >>> updates['w'].shape
    (8, 6)
  """
  if mode not in ('two_sided', 'block'):
    raise ValueError(f"sculpt's `mode` must be 'two_sided' or 'block', got "
                     f'{mode!r}.')
  stages = [optax.scale_by_adam(b1=b1, b2=b2, eps=eps)]
  # A traced weight_decay (optax.inject_hyperparams) keeps the decay stage.
  if not (isinstance(weight_decay, (int, float)) and weight_decay == 0):
    stages.append(optax.add_decayed_weights(weight_decay, mask))
  stages.append(optax.scale_by_learning_rate(learning_rate))
  stages.append(orthogonal.orthogonal_to(
      memory, mode=mode, capacity=sculpt_capacity(max_fraction),
      dimension_numbers=dimension_numbers))
  return optax.chain(*stages)


@presets.declare_static_args('momentum', 'capacity', 'dimension_numbers')
def gpm(
    learning_rate: optax.ScalarOrSchedule,
    *,
    memory: Any = None,
    momentum: Optional[float] = None,
    capacity: Any = 1.0,
    dimension_numbers: Any = None,
) -> optax.GradientTransformation:
  """Gradient Projection Memory (Saha, Garg, Roy, `arXiv 2103.09762
  <https://arxiv.org/abs/2103.09762>`_, ICLR 2021).

  SGD (optionally with momentum) whose update is kept orthogonal to the span
  ``M`` of earlier tasks' layer inputs, ``Δ ← (I - MMᵀ)Δ`` (``W`` is ``m x n``
  with ``m`` the input features). Grow the memory with :func:`gpm_memory` at
  each task boundary and store it with :func:`set_memory`. (The reference also
  freezes biases after the first task; mask them with ``optax.masked`` if
  wanted.)

  Args:
    learning_rate: a float or an optax schedule.
    memory: initial memory (None: nothing protected yet).
    momentum: SGD momentum (None: plain SGD as in the paper).
    capacity: columns of the input-side memory (see :func:`empty_memory`).
    dimension_numbers: which leaves are matrices (default every 2-D leaf).

  Returns:
    An ``optax.GradientTransformation``.

  Examples:
    >>> import jax.numpy as jnp
    >>> from subspace_optax import continual
    >>> params = {'w': jnp.ones((8, 6))}
    >>> tx = continual.gpm(learning_rate=1e-2, momentum=0.9)
    >>> state = tx.init(params)
    >>> updates, state = tx.update(params, state, params)
    >>> updates['w'].shape
    (8, 6)
  """
  return optax.chain(
      optax.sgd(learning_rate, momentum=momentum),
      orthogonal.orthogonal_to(memory, mode='left', capacity=capacity,
                               dimension_numbers=dimension_numbers),
  )
