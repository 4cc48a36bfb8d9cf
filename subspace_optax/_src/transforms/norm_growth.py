"""Norm-growth limiter: successive update norms grow by at most a factor."""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax


class ClipNormGrowthState(NamedTuple):
  # Per leaf (per matrix with ``axes``): the norm of the previous limited
  # update, float32; 0 means "no previous update", so the next is unlimited.
  norm: optax.Updates


def _norm(x: jax.Array, axes: Optional[tuple[int, ...]]) -> jax.Array:
  x = x.astype(jnp.float32)
  return jnp.sqrt(jnp.sum(x * x, axis=axes))


def clip_norm_growth(
    max_ratio: float = 1.01, axes: Optional[tuple[int, ...]] = None
) -> optax.GradientTransformation:
  """Rescale each update so its norm is at most ``max_ratio`` times the last one.

  Fira's norm-growth limiter (Chen et al., `Fira: Can We Achieve Full-rank
  Training of LLMs Under Low-rank Constraint? <https://arxiv.org/abs/2410.01623>`_,
  §3.3), also used by APOLLO. With ``S_t`` the incoming update and ``n_{t-1}``
  the norm of the previous *limited* update:

  .. math::
    λ_t = \\max\\Big(\\frac{‖S_t‖}{n_{t-1} + 10^{-8}},\\ γ\\Big) / γ,\\qquad
    S_t \\leftarrow S_t / λ_t,\\qquad n_t = ‖S_t‖ / λ_t.

  The first update passes unchanged. A previous norm of exactly 0 also counts as
  "no previous update" (the reference would then pin every later update to
  norm ~1e-8). The state is one float32 per leaf, or per slice over ``axes``.

  Args:
    max_ratio: ``γ``, the largest allowed growth of the norm per step.
    axes: axes the norm is taken over; None takes the whole leaf (one scalar
      state per leaf). ``(-2, -1)`` limits each matrix of a stack separately.

  Returns:
    An ``optax.GradientTransformation`` whose state is a
    :class:`ClipNormGrowthState`.

  Examples:
    >>> import jax.numpy as jnp
    >>> import subspace_optax as so
    >>> tx = so.clip_norm_growth(max_ratio=2.0)
    >>> state = tx.init(jnp.zeros(2))
    >>> _, state = tx.update(jnp.array([3.0, 4.0]), state)  # norm 5: passes
    >>> updates, state = tx.update(jnp.array([30.0, 40.0]), state)
    >>> float(jnp.linalg.norm(updates))  # at most 2x the last norm
    10.0
  """
  if isinstance(max_ratio, (int, float)) and not max_ratio >= 1.0:
    raise ValueError(f'`max_ratio` must be >= 1, got {max_ratio}.')

  def init_fn(params):
    return ClipNormGrowthState(jax.tree.map(
        lambda p: jnp.zeros_like(_norm(jnp.zeros(jnp.shape(p)), axes)), params))

  def limit(u, previous):
    norm = _norm(u, axes)
    ratio = jnp.maximum(norm / (previous + 1e-8), max_ratio) / max_ratio
    factor = jnp.where(previous > 0, ratio, 1.0)
    expanded = factor if axes is None else jnp.expand_dims(factor, axes)
    return (u / expanded).astype(u.dtype), norm / factor

  def update_fn(updates, state, params=None):
    del params
    leaves, treedef = jax.tree.flatten(updates)
    limited = [limit(u, n) for u, n in zip(
        leaves, treedef.flatten_up_to(state.norm))]
    return treedef.unflatten([u for u, _ in limited]), ClipNormGrowthState(
        treedef.unflatten([n for _, n in limited]))

  return optax.GradientTransformation(init_fn, update_fn)
