"""Adam with the PyTorch/HF ``eps`` placement, for parity with the references."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax


def bias_correction(count: jax.Array, b1: float, b2: float) -> jax.Array:
  """Adam's step-size factor ``sqrt(1 - β₂ᵗ) / (1 - β₁ᵗ)`` at update ``count``.

  ``1 - βᵗ`` is computed as ``-expm1(t log1p(-(1 - β)))`` with ``1 - β`` taken
  in Python double precision: ``float32(0.999)`` is off by 1.3e-8, which would
  put a 1e-5 relative error into ``1 - β₂`` at ``t = 1``.
  """
  t = count.astype(jnp.float32)
  one_minus = lambda b: -jnp.expm1(t * jnp.log1p(-(1.0 - b)))
  return jnp.sqrt(one_minus(b2)) / one_minus(b1)


class ScaleByTorchAdamState(NamedTuple):
  count: jax.Array  # int32 scalar
  mu: optax.Updates  # first moment, like the updates
  nu: optax.Updates  # second moment, like the updates


def scale_by_torch_adam(
    b1: float = 0.9, b2: float = 0.999, eps: float = 1e-6
) -> optax.GradientTransformation:
  """Adam as GaLore, Fira and APOLLO compute it (``eps`` inside the bias correction).

  .. math::
    m_t = β_1 m_{t-1} + (1-β_1) g,\\quad v_t = β_2 v_{t-1} + (1-β_2) g^2,\\quad
    u_t = \\frac{\\sqrt{1-β_2^t}}{1-β_1^t}\\,\\frac{m_t}{\\sqrt{v_t} + ε}.

  ``optax.scale_by_adam`` adds ``ε`` after the bias correction, i.e. it uses
  ``ε·sqrt(1-β_2^t)`` here; the two agree up to that ``ε`` term.

  References:
    Kingma & Ba, `Adam <https://arxiv.org/abs/1412.6980>`_, 2014 (Algorithm 1,
    "efficient version" in §2).
  """

  def init_fn(params):
    # zeros_like keeps each leaf's sharding (and accepts ShapeDtypeStructs).
    zeros = lambda p: optax.tree.zeros_like(p, dtype=jnp.float32)
    return ScaleByTorchAdamState(
        jnp.zeros([], jnp.int32), jax.tree.map(zeros, params),
        jax.tree.map(zeros, params))

  def update_fn(updates, state, params=None):
    del params
    count = optax.safe_increment(state.count)
    mu = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, state.mu, updates)
    nu = jax.tree.map(lambda v, g: b2 * v + (1 - b2) * g * g, state.nu, updates)
    step = bias_correction(count, b1, b2)
    out = jax.tree.map(
        lambda m, v, g: (step * m / (jnp.sqrt(v) + eps)).astype(jnp.result_type(g)),
        mu, nu, updates)
    return out, ScaleByTorchAdamState(count, mu, nu)

  return optax.GradientTransformation(init_fn, update_fn)
