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
from subspace_optax._src.pipeline import per_matrix


def _view_axes(x: jax.Array, channel_axis: Optional[int]) -> tuple[int, ...]:
  """Axes one view's norms run over: all but ``channel_axis``, or all (layer)."""
  if channel_axis is None:
    return tuple(range(x.ndim))
  return tuple(a for a in range(x.ndim) if a != channel_axis % x.ndim)


def _inner_products(weight, grad, step, axes, separate: bool):
  """``⟨w, w⟩, ⟨g, g⟩, ⟨w, g⟩, ⟨w, p⟩`` over ``axes``, in float32.

  The results pass an optimization barrier, which keeps XLA from merging the
  layer view's sums of them into reductions of their own over the leaf (XLA:CPU
  then held each product full-size). With ``separate`` (XLA:CPU), each
  reduction also takes its operands through a barrier of its own, so their
  casts to float32 fuse into it (a cast that several reductions share is
  held full-size). GPU lowerings fuse the casts without it; there the
  barrier would make its operand, e.g. a fused Nesterov step, a buffer.
  """

  def dot(a, b):
    if separate:
      a, b = jax.lax.optimization_barrier((a, b))
    return jnp.sum(a.astype(jnp.float32) * b.astype(jnp.float32), axis=axes,
                   keepdims=True)

  products = (dot(weight, weight), dot(grad, grad), dot(weight, grad),
              dot(weight, step))
  return jax.lax.optimization_barrier(products)


def _step(base, grad, nesterov_momentum):
  """``base``, or the Nesterov step ``g + μ·base`` (``optax.trace``'s)."""
  if nesterov_momentum is None:
    return base
  return grad + nesterov_momentum * base


def _radial_projection(base, grad, weight, delta, eps, channel_axis,
                       nesterov_momentum=None):
  """``(projected step, projected?)`` for one leaf of rank >= 2 (AdamP's rule).

  The step is ``p = base``, or with ``nesterov_momentum`` ``μ`` the Nesterov
  step ``p = g + μ·base`` of the momentum ``base``. Reductions over the
  view's axes (no reshape), so sharded leaves keep their sharding. The four
  inner products are taken once per channel; the layer view's are their
  sums over the channels. The radial part ``ŵ⟨ŵ, p⟩`` is written
  ``w · ⟨w, p⟩ / (‖w‖ + ε)²``, so the step is one elementwise expression of
  ``p`` and ``w`` after the reductions: no full-size unit vector or
  candidate step is held beside the leaf.

  On XLA:CPU a Nesterov step is not held either: its consumers were the
  reduction ``⟨w, p⟩`` and that expression, and XLA:CPU held it between them
  (in float32 for a bfloat16 leaf; recomputed inside the reduction, its
  ``μ`` became a full-size broadcast operand of XLA:CPU's fused reduction).
  There ``⟨w, p⟩ = ⟨w, g⟩ + μ⟨w, b⟩`` (``p`` is linear in ``b``), and
  the final expression computes ``p`` elementwise. GPU lowerings reduce
  ``⟨w, p⟩`` with ``p`` fused, as before.
  """
  axes = _view_axes(weight, channel_axis)
  step = _step(base, grad, nesterov_momentum)

  def cpu(w, g, u, _):
    ww, gg, wg, wu = _inner_products(w, g, u, axes, separate=True)
    if nesterov_momentum is not None:
      wu = wg + nesterov_momentum * wu  # ⟨w, g + μb⟩
    return ww, gg, wg, wu

  by_channel = per_matrix.on_platform(
      weight, grad, base, step, cpu=cpu,
      gpu=lambda w, g, _, p: _inner_products(w, g, p, axes, separate=False))
  by_layer = tuple(jnp.sum(x) for x in by_channel)
  tests = []
  for (ww, gg, wg, wp), width in (
      (by_channel, math.prod(weight.shape[a] for a in axes)),
      (by_layer, weight.size)):
    w_norm = jnp.sqrt(ww)
    cosine = jnp.abs(wg) / (jnp.maximum(w_norm, eps)
                            * jnp.maximum(jnp.sqrt(gg), eps))
    invariant = jnp.max(cosine) < delta / math.sqrt(width)
    tests.append((invariant, wp / jnp.square(w_norm + eps)))
  (channel_invariant, channel_radial), (layer_invariant, layer_radial) = tests
  projected = channel_invariant | layer_invariant
  radial = jnp.where(channel_invariant, channel_radial, layer_radial)
  step32 = step.astype(jnp.float32)
  out = jnp.where(projected, step32 - weight.astype(jnp.float32) * radial,
                  step32)
  return out.astype(step.dtype), projected


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
    nesterov_momentum: Optional[float] = None,
) -> optax.GradientTransformationExtraArgs:
  """``inner``'s step with the radial component removed on scale-invariant weights.

  Heo et al., `AdamP <https://arxiv.org/abs/2006.08217>`_, ICLR 2021 (Alg. 1-2).
  For each leaf of rank >= 2, with ``g`` the gradient, ``w`` the weight and
  ``p = inner(g)`` the step (``g + μ inner(g)`` with ``nesterov_momentum``),
  in the channel view (one row per output channel) and then, if that test
  fails, the layer view (one row):

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
    nesterov_momentum: ``μ`` when ``inner``'s output is a momentum ``b``
      (``optax.trace`` without Nesterov) and the step is the Nesterov step
      ``p = g + μb``, as SGDP's: the same step as ``optax.trace``'s
      ``nesterov=True``, but not held beside the leaf on XLA:CPU
      (:func:`_radial_projection`). None: ``p`` is ``inner``'s output.

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

    def leaf(base, grad, weight):
      ratio = 1.0
      if jnp.ndim(weight) > 1:
        step, projected = _radial_projection(
            base, grad, weight, delta, eps, channel_axis, nesterov_momentum)
        ratio = jnp.where(projected, wd_ratio, 1.0)
      else:
        step = _step(base, grad, nesterov_momentum)
      if not (isinstance(weight_decay, (int, float)) and weight_decay == 0):
        step = (step + weight_decay * ratio * weight).astype(step.dtype)
      return step

    return (jax.tree.map(leaf, steps, updates, params),
            ProjectRadialState(inner_state))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


