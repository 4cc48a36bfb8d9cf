"""Continual-learning presets composed from :func:`orthogonal_to`.

* :func:`sculpt` — constrained full fine-tuning (Sculpting Subspaces): AdamW
  whose final update is kept orthogonal (two-sided) to each weight's important
  singular directions from earlier tasks.
* :func:`gpm` — Gradient Projection Memory: SGD with momentum whose update is
  kept orthogonal to the span of earlier tasks' layer inputs (input side).
* :func:`gpm_ewc` — the library's recommended recipe: EWC's penalty, Adam, and
  GPM's input-side projection with a low energy threshold.

Both are ``optax.chain(inner, [weight decay], learning rate, orthogonal_to)``
so the invariant is on the update applied to the params.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional

import optax

from subspace_optax._src import arguments
from subspace_optax._src.continual import orthogonal
from subspace_optax._src.continual import regularizers


def sculpt_capacity(max_fraction: float = 0.8) -> Callable[[int, int], int]:
  """Capacity ``floor(max_fraction * min(m, n))`` per side, the largest rank
  :func:`sculpt_memory` keeps (so its memories fit without overflow).

  Args:
    max_fraction: ``trr``, in (0, 1].

  Returns:
    A function ``(m, n) -> capacity`` for ``capacity=`` of
    :func:`orthogonal_to` and :func:`empty_memory`.

  Examples:
    >>> import subspace_optax as so
    >>> so.continual.sculpt_capacity(0.5)(8, 6)
    3
  """
  if not 0.0 < max_fraction <= 1.0:
    raise ValueError(f'`max_fraction` must lie in (0, 1], got {max_fraction}.')
  return lambda rows, columns: max(
      1, math.floor(max_fraction * min(rows, columns) + 1e-6))


@arguments.declare_static_args(
    'max_fraction', 'weight_decay', 'mask', 'dimension_numbers', 'unprotected',
    'mu_dtype')
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
    unprotected: str = 'train',
    mu_dtype: Optional[Any] = None,
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
    unprotected: what happens to the leaves without a memory (biases, norm
      scales) once something is protected: ``'train'`` (default; full
      fine-tuning trains them, as the reference) or ``'freeze'``; see
      :func:`orthogonal_to`.
    mu_dtype: dtype in which Adam's first moment is stored (as in
      ``optax.adamw``); None: float32.

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
  stages = [optax.scale_by_adam(b1=b1, b2=b2, eps=eps, mu_dtype=mu_dtype)]
  # A traced weight_decay (optax.inject_hyperparams) keeps the decay stage.
  if not (isinstance(weight_decay, (int, float)) and weight_decay == 0):
    stages.append(optax.add_decayed_weights(weight_decay, mask))
  stages.append(optax.scale_by_learning_rate(learning_rate))
  stages.append(orthogonal.orthogonal_to(
      memory, mode=mode, capacity=sculpt_capacity(max_fraction),
      dimension_numbers=dimension_numbers, unprotected=unprotected))
  return optax.chain(*stages)


@arguments.declare_static_args('momentum', 'capacity', 'dimension_numbers',
                             'unprotected')
def gpm(
    learning_rate: optax.ScalarOrSchedule,
    *,
    memory: Any = None,
    momentum: Optional[float] = None,
    capacity: Any = 1.0,
    dimension_numbers: Any = None,
    unprotected: str = 'freeze',
) -> optax.GradientTransformation:
  """Gradient Projection Memory (Saha, Garg, Roy, `arXiv 2103.09762
  <https://arxiv.org/abs/2103.09762>`_, ICLR 2021).

  SGD (optionally with momentum) whose update is kept orthogonal to the span
  ``M`` of earlier tasks' layer inputs, ``Δ ← (I - MMᵀ)Δ`` (``W`` is ``m x n``
  with ``m`` the input features). Grow the memory with :func:`gpm_memory` at
  each task boundary and store it with :func:`set_memory`. As in the
  reference, the leaves without a memory (biases, norm scales) are frozen
  once the memory holds a direction (``unprotected='freeze'``).

  Args:
    learning_rate: a float or an optax schedule.
    memory: initial memory (None: nothing protected yet).
    momentum: SGD momentum (None: plain SGD as in the paper).
    capacity: columns of the input-side memory (see :func:`empty_memory`).
    dimension_numbers: which leaves are matrices (default every 2-D leaf).
    unprotected: ``'freeze'`` (default, the reference's recipe) or
      ``'train'``, see :func:`orthogonal_to`.

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
                               dimension_numbers=dimension_numbers,
                               unprotected=unprotected),
  )


@arguments.declare_static_args('capacity', 'dimension_numbers', 'unprotected',
                               'mu_dtype')
def gpm_ewc(
    learning_rate: optax.ScalarOrSchedule,
    *,
    strength: float,
    memory: Any = None,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    capacity: Any = 1.0,
    dimension_numbers: Any = None,
    unprotected: str = 'freeze',
    mu_dtype: Optional[Any] = None,
) -> optax.GradientTransformation:
  """GPM's projection on EWC-regularised Adam: the recommended recipe.

  The update is Adam's step on the gradient plus EWC's penalty (Kirkpatrick et
  al., arXiv 1612.00796), with the span ``M`` of earlier tasks' layer inputs
  (GPM, Saha et al., arXiv 2103.09762) projected out of Adam's input and of
  its step, ``P = I - MMᵀ``:

  .. math::
    Δ = P\\, η\\, adam\\big(P\\,(g + λ F ⊙ (θ - θ^*))\\big).

  Adam wrapped by the projection (``orthogonal_to(inner=...)``) sees only the
  free subspace's gradient, so its step is a descent direction there. The two
  parts cover each other's failure. With a low energy threshold
  (:func:`gpm_memory` at ``threshold=0.9``) the projection protects the input
  directions that carry most of the old tasks' energy and leaves room to
  learn; the forgetting that goes through the remaining low-energy directions
  (Adam takes full-size steps there) is what EWC's penalty holds back. Leaves
  without a memory (biases, norm scales) are frozen once a direction is
  protected (``unprotected='freeze'``).

  At each task boundary, on a calibration batch of the finished task::

    fisher = fisher_diagonal(loss_one, params, samples)
    opt_state = consolidate_ewc(opt_state, params, fisher)
    inputs = layer_inputs(model, samples[0])         # flax NNX models
    memory = gpm_memory(inputs, 0.9, get_memory(opt_state))
    opt_state = set_memory(opt_state, memory)

  State: EWC's anchor and Fisher (2 floats per parameter), Adam's moments (2)
  and an ``m x m`` input basis per matrix (``capacity=1.0``).

  Args:
    learning_rate: a float or an optax schedule.
    strength: EWC's ``λ`` (scale-dependent: choose it on validation data, as
      for :func:`ewc`).
    memory: initial GPM memory (None: nothing protected yet).
    b1, b2, eps: Adam's parameters.
    capacity: columns of the input-side memory (see :func:`empty_memory`).
    dimension_numbers: which leaves are matrices (default every 2-D leaf).
    unprotected: ``'freeze'`` (default, as GPM's reference) or ``'train'``,
      see :func:`orthogonal_to`.
    mu_dtype: dtype in which Adam's first moment is stored (as in
      ``optax.adamw``); None: float32.

  Returns:
    An ``optax.GradientTransformation``.

  Examples:
    >>> import jax.numpy as jnp
    >>> from subspace_optax import continual
    >>> params = {'w': jnp.ones((8, 6)), 'b': jnp.ones(6)}
    >>> tx = continual.gpm_ewc(1e-3, strength=100.0)
    >>> state = tx.init(params)
    >>> updates, state = tx.update(params, state, params)
    >>> updates['w'].shape
    (8, 6)
  """
  return optax.chain(
      regularizers.ewc(strength=strength),
      orthogonal.orthogonal_to(
          memory, mode='left', capacity=capacity,
          dimension_numbers=dimension_numbers, unprotected=unprotected,
          inner=optax.chain(optax.scale_by_adam(b1=b1, b2=b2, eps=eps,
                                                mu_dtype=mu_dtype),
                            optax.scale_by_learning_rate(learning_rate))),
  )
