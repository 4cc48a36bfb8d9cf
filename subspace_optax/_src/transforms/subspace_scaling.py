"""APOLLO's scaling: a low-rank Adam only estimates how to scale the raw gradient.

Zhu et al., `APOLLO: SGD-like Memory, AdamW-level Performance
<https://arxiv.org/abs/2412.05270>`_, 2024.
"""
from __future__ import annotations

from typing import Optional

import jax
import optax

from subspace_optax._src.pipeline import residual as residual_lib
from subspace_optax._src.transforms import norm_growth

_HIGHEST = jax.lax.Precision.HIGHEST


def _scaled(g: jax.Array, s: jax.Array) -> jax.Array:
  """``G ⊙ s``, taken with a leading unit axis on both operands.

  The same product. In a one-layer update of a stack (the CPU's layer loop)
  ``G`` is the layer's slice ``X`` of the gradient stack with its unit layer
  axis squeezed, and the update is written back in place of that slice: the
  extra axis cancels that squeeze, so XLA:CPU computes ``X ⊙ s`` on the slice
  itself and reads it inside the in-place write of the update. With ``G ⊙ s``
  in the squeezed shape a reshape sits between the slice and the product,
  XLA:CPU then cannot read the slice inside the write, and keeps a copy of
  it from the start of the layer to the write, beside the projection's own
  copy (APOLLO's float32 temporaries: 2.6 -> 1.6 matrices,
  ``benchmarks.optimizer_temporaries``). A per-matrix scalar ``s``
  (APOLLO-Mini) needs no help: XLA moves the reshape past a scalar product.
  """
  return (g[None] * s[None])[0]


def scale_gradient_by_subspace(
    granularity: str = 'channel',
) -> optax.GradientTransformationExtraArgs:
  """APOLLO's update direction: the raw gradient scaled, ``G ⊙ s``.

  A residual path for :func:`~subspace_optax.low_rank` with ``scale=0``: it
  ignores the residual and scales the full gradient ``G`` (extra arg
  ``gradients``) by ``s`` = :func:`~subspace_optax.subspace_norm_ratio` of
  the coefficients and the inner optimizer's update in the subspace, per
  channel of the non-projected axis (``'channel'``) or per matrix
  (``'tensor'``). State-free.

  Args:
    granularity: ``'channel'`` (one scale per channel) or ``'tensor'`` (one
      per matrix).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` (state-free).

  Examples:
    >>> import jax.numpy as jnp
    >>> import subspace_optax as so
    >>> tx = so.low_rank(so.transforms.scale_by_adam_moments(), rank=2,
    ...                  scale=0.0, residual=so.scale_gradient_by_subspace())
    >>> params = {'w': jnp.ones((8, 6))}
    >>> updates, state = tx.update(params, tx.init(params))
    >>> updates['w'].shape
    (8, 6)
  """
  if granularity not in residual_lib.GRANULARITIES:
    raise ValueError(
        f'`granularity` must be one of {residual_lib.GRANULARITIES}, got '
        f'{granularity!r}.')

  def init_fn(params):
    del params
    return optax.EmptyState()

  def update_fn(updates, state, params=None, **extra_args):
    del updates, params
    residual_lib.check_extra_args(
        extra_args, ('coefficients', 'subspace_updates', 'gradients'),
                'scale_gradient_by_subspace')
    out = jax.tree.map(
        lambda g, c, n: _scaled(
            g, residual_lib.subspace_norm_ratio(c, n, granularity)),
        extra_args['gradients'], extra_args['coefficients'],
        extra_args['subspace_updates'])
    return out, state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def apollo_scaling(
    scale_type: str = 'channel',
    scale: float = 1.0,
    scale_front: bool = False,
    limiter: Optional[float] = 1.01,
) -> optax.GradientTransformationExtraArgs:
  """APOLLO's output path: ``√scale · limit(G ⊙ s)``.

  :func:`scale_gradient_by_subspace`, the heuristic factor ``sqrt(scale)``
  after the norm-growth limiter (or before it with ``scale_front``:
  ``limit(√scale · G ⊙ s)``), and the limiter (per matrix; None disables it).

  Args:
    scale_type: ``'channel'`` (APOLLO) or ``'tensor'`` (APOLLO-Mini).
    scale: the heuristic scale, applied as ``sqrt(scale)``.
    scale_front: apply ``sqrt(scale)`` before the limiter instead of after.
    limiter: ``γ`` of the norm-growth limiter, None to disable it.

  Returns:
    An ``optax.GradientTransformationExtraArgs``. (a residual path for
    :func:`~subspace_optax.low_rank` with ``scale=0``).

  Examples:
    >>> import jax.numpy as jnp
    >>> import subspace_optax as so
    >>> tx = so.low_rank(so.transforms.scale_by_adam_moments(), rank=2,
    ...                  scale=0.0,
    ...                  residual=so.apollo_scaling(scale_type='tensor'))
    >>> params = {'w': jnp.ones((8, 6))}
    >>> updates, state = tx.update(params, tx.init(params))
    >>> updates['w'].shape
    (8, 6)
  """
  if scale_type not in residual_lib.GRANULARITIES:
    raise ValueError(
        f'`scale_type` must be one of {residual_lib.GRANULARITIES}, got '
        f'{scale_type!r}.')
  factor = optax.scale(scale**0.5)
  parts = [scale_gradient_by_subspace(scale_type)]
  if scale_front:
    parts.append(factor)
  if limiter is not None:
    parts.append(norm_growth.clip_norm_growth(limiter, axes=(-2, -1)))
  if not scale_front:
    parts.append(factor)
  return optax.chain(*parts)


