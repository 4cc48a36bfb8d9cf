"""AdamP / SGDP: remove the radial part of the step of scale-invariant weights.

Heo et al., `AdamP: Slowing Down the Slowdown for Momentum Optimizers on
Scale-invariant Weights <https://arxiv.org/abs/2006.08217>`_, ICLR 2021.

A weight followed by a normalization layer is scale-invariant: its gradient is
orthogonal to it, and momentum steps along ``w`` only grow ``‖w‖``, which
shrinks the effective learning rate. AdamP detects such weights by a small
cosine between gradient and weight and projects the radial component out of the
step.
"""

from __future__ import annotations

from typing import Any, Optional

import optax

from subspace_optax._src import arguments
from subspace_optax._src.transforms import adam
from subspace_optax._src.transforms import radial as radial_lib


@arguments.declare_static_args('channel_axis', 'mu_dtype')
def adamp(
    learning_rate: optax.ScalarOrSchedule,
    *,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    nesterov: bool = False,
    weight_decay: float = 0.0,
    delta: float = 0.1,
    wd_ratio: float = 0.1,
    channel_axis: int = -1,
    mu_dtype: Optional[Any] = None,
) -> optax.GradientTransformationExtraArgs:
  """AdamP: Adam with the radial projection of :func:`project_radial`.

  Heo et al., `AdamP <https://arxiv.org/abs/2006.08217>`_, ICLR 2021; defaults
  of the reference package (``adamp`` 0.3.0):

  .. math::
    p = \\frac{\\hat m}{\\sqrt{\\hat v} + ε},\\quad
    p \\leftarrow Π_{radial}(p)\\ \\text{if scale-invariant},\\quad
    w \\leftarrow w - η (p + λ\\,r\\,w),\\ r = \\text{wd\\_ratio or } 1.

  State: Adam's ``2|w|`` (:func:`subspace_optax.state_sizes.adamp_bytes`). Needs
  ``params`` in ``update``.

  Args:
    learning_rate: a float or an optax schedule.
    b1, b2, eps: Adam's hyper-parameters.
    nesterov: use the Nesterov momentum of the reference.
    weight_decay, delta, wd_ratio, channel_axis: see :func:`project_radial`.
    mu_dtype: dtype in which Adam's first moment is stored (as in
      ``optax.adamw``), e.g. ``jnp.bfloat16``; computed in float32. None:
      float32. The second moment stays float32.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; its ``update`` needs
    ``params``.

  Examples:
    >>> import jax.numpy as jnp
    >>> import subspace_optax as so
    >>> params = {'w': jnp.ones((8, 6))}
    >>> tx = so.adamp(learning_rate=1e-3, weight_decay=1e-2)
    >>> state = tx.init(params)
    >>> updates, state = tx.update(params, state, params)
    >>> so.state_bytes(state) == so.state_sizes.adamp_bytes(params)
    True
  """
  return optax.chain(
      radial_lib.project_radial(
          adam.scale_by_torch_nesterov_adam(
              b1, b2, eps, nesterov, mu_dtype=mu_dtype), delta=delta,
          wd_ratio=wd_ratio, weight_decay=weight_decay, eps=eps,
          channel_axis=channel_axis),
      optax.scale_by_learning_rate(learning_rate),
  )


@arguments.declare_static_args('channel_axis')
def sgdp(
    learning_rate: optax.ScalarOrSchedule,
    *,
    momentum: float = 0.0,
    nesterov: bool = False,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    delta: float = 0.1,
    wd_ratio: float = 0.1,
    channel_axis: int = -1,
) -> optax.GradientTransformationExtraArgs:
  """SGDP: momentum SGD with the radial projection of :func:`project_radial`.

  Heo et al., `AdamP <https://arxiv.org/abs/2006.08217>`_, ICLR 2021; the
  reference (``adamp`` 0.3.0, dampening 0):

  .. math::
    b \\leftarrow μ b + g,\\quad p = g + μ b\\ (\\text{Nesterov})\\ \\text{or}\\ b,
    \\quad w \\leftarrow w - η\\,(Π_{radial}(p) + \\tfrac{λ r}{1 - μ} w).

  The weight decay carries the reference's extra ``1/(1 - μ)`` factor.
  State: one momentum buffer ``|w|`` when ``momentum > 0``.

  Args:
    learning_rate: a float or an optax schedule.
    momentum: ``μ`` (0: plain SGD, no state).
    nesterov: Nesterov momentum.
    eps, weight_decay, delta, wd_ratio, channel_axis: see
      :func:`project_radial`.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; its ``update`` needs
    ``params``.

  Examples:
    >>> import jax.numpy as jnp
    >>> import subspace_optax as so
    >>> params = {'w': jnp.ones((8, 6))}
    >>> tx = so.sgdp(learning_rate=1e-2, momentum=0.9)
    >>> state = tx.init(params)
    >>> updates, state = tx.update(params, state, params)
    >>> updates['w'].shape
    (8, 6)
  """
  no_momentum = isinstance(momentum, (int, float)) and momentum == 0
  inner = (optax.identity() if no_momentum
           else optax.trace(decay=momentum, nesterov=False))
  # optax.trace's Nesterov step g + μb, taken by the projection from the
  # momentum b: XLA:CPU then need not hold it (see project_radial).
  return optax.chain(
      radial_lib.project_radial(
          inner, delta=delta, wd_ratio=wd_ratio,
          weight_decay=weight_decay / (1.0 - momentum), eps=eps,
          channel_axis=channel_axis,
          nesterov_momentum=momentum if nesterov and not no_momentum
          else None),
      optax.scale_by_learning_rate(learning_rate),
  )
