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

import math
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from subspace_optax._src import arguments


def _view_axes(x: jax.Array, channel_axis: Optional[int]) -> tuple[int, ...]:
  """Axes one view's norms run over: all but ``channel_axis``, or all (layer)."""
  if channel_axis is None:
    return tuple(range(x.ndim))
  return tuple(a for a in range(x.ndim) if a != channel_axis % x.ndim)


def _radial_projection(step, grad, weight, delta, eps, channel_axis):
  """``(projected step, projected?)`` for one leaf of rank >= 2 (AdamP's rule).

  Reductions over the view's axes (no reshape), so sharded leaves keep their
  sharding.
  """
  step32 = step.astype(jnp.float32)
  grad32 = grad.astype(jnp.float32)
  w = weight.astype(jnp.float32)
  results = []
  for axis in (channel_axis, None):  # channel view first, then the layer view
    axes = _view_axes(w, axis)
    dot = lambda a, b: jnp.sum(a * b, axis=axes, keepdims=True)  # pylint: disable=cell-var-from-loop
    w_norm = jnp.sqrt(dot(w, w))
    g_norm = jnp.sqrt(dot(grad32, grad32))
    cosine = jnp.abs(dot(w, grad32)) / (
        jnp.maximum(w_norm, eps) * jnp.maximum(g_norm, eps))
    fan_in = math.prod(w.shape[a] for a in axes)
    invariant = jnp.max(cosine) < delta / math.sqrt(fan_in)
    unit = w / (w_norm + eps)
    results.append((invariant, step32 - unit * dot(unit, step32)))
  (by_channel, channel_step), (by_layer, layer_step) = results
  out = jnp.where(by_channel, channel_step,
                  jnp.where(by_layer, layer_step, step32))
  return out.astype(step.dtype), by_channel | by_layer


class ProjectRadialState(NamedTuple):
  inner_state: optax.OptState


@arguments.declare_static_args('channel_axis')
def project_radial(
    inner: optax.GradientTransformation,
    *,
    delta: float = 0.1,
    wd_ratio: float = 0.1,
    weight_decay: float = 0.0,
    eps: float = 1e-8,
    channel_axis: int = -1,
) -> optax.GradientTransformationExtraArgs:
  """``inner``'s step with the radial component removed on scale-invariant weights.

  Heo et al., `AdamP <https://arxiv.org/abs/2006.08217>`_, ICLR 2021 (Alg. 1-2).
  For each leaf of rank >= 2, with ``g`` the gradient, ``w`` the weight and
  ``p = inner(g)`` the step, in the channel view (one row per output channel)
  and then, if that test fails, the layer view (one row):

  .. math::
    \\text{if } \\max_{rows} \\frac{|⟨w, g⟩|}{\\|w\\|\\|g\\|} <
    \\frac{δ}{\\sqrt{\\text{row width}}}:\\quad
    p \\leftarrow p - ŵ⟨ŵ, p⟩_{row},\\ ŵ = \\frac{w}{\\|w\\|_{row} + ε},
    \\ λ \\leftarrow λ \\cdot \\text{wd\\_ratio}.

  The output is ``p + λ w`` (decoupled weight decay on the pre-step weight,
  scaled by ``wd_ratio`` where the projection applied); chain
  ``optax.scale_by_learning_rate`` after it. The test needs the raw gradient,
  so this wraps ``inner`` rather than following it in a chain. Leaves of rank
  < 2 get ``p + λ w`` unchanged.

  Args:
    inner: the base optimizer (e.g. Adam or momentum SGD), params-free.
    delta: ``δ`` of the cosine threshold ``δ/√dim``.
    wd_ratio: weight-decay multiplier for projected weights.
    weight_decay: decoupled weight decay ``λ``.
    eps: ``ε`` of the norms.
    channel_axis: the output-channel axis of the channel view: ``-1`` for flax
      kernels ``(..., in, out)``; ``0`` for PyTorch ``(out, in, ...)`` layouts.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is a
    :class:`ProjectRadialState`; its ``update`` needs ``params``.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import subspace_optax as so
    >>> params = {'w': jnp.ones((8, 6))}
    >>> tx = so.project_radial(optax.scale_by_adam(), weight_decay=1e-2)
    >>> updates, state = tx.update(params, tx.init(params), params)
    >>> updates['w'].shape
    (8, 6)
  """
  inner = optax.with_extra_args_support(inner)

  def init_fn(params):
    return ProjectRadialState(inner.init(params))

  def update_fn(updates, state, params=None, **extra_args):
    if params is None:
      raise ValueError(
          'project_radial (AdamP/SGDP) needs the params: call '
          'update(grads, state, params).')
    steps, inner_state = inner.update(
        updates, state.inner_state, params, **extra_args)

    def leaf(step, grad, weight):
      ratio = 1.0
      if jnp.ndim(weight) > 1:
        step, projected = _radial_projection(
            step, grad, weight, delta, eps, channel_axis)
        ratio = jnp.where(projected, wd_ratio, 1.0)
      if not (isinstance(weight_decay, (int, float)) and weight_decay == 0):
        step = (step + weight_decay * ratio * weight).astype(step.dtype)
      return step

    return (jax.tree.map(leaf, steps, updates, params),
            ProjectRadialState(inner_state))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


