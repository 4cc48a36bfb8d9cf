"""Adam split in two: the moment ratio and the bias-corrected step size.

Fira and APOLLO (like GaLore's PyTorch AdamW) compute ``m / (sqrt(v) + ε)``
from *uncorrected* moments, build their scale factors from that ratio, and
only then multiply the whole update by Adam's bias correction
``sqrt(1 - β₂ᵗ) / (1 - β₁ᵗ)``. Splitting Adam into these two transforms puts
the bias correction after the subspace pipeline, so such methods see exactly
the reference's quantities:

.. math::
  chain(scale\\_by\\_adam\\_moments,\\ scale\\_by\\_bias\\_correction)
  = scale\\_by\\_torch\\_adam.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from subspace_optax._src import adam
from subspace_optax._src import precision


class ScaleByAdamMomentsState(NamedTuple):
  mu: optax.Updates  # first moment (uncorrected), like the updates
  nu: optax.Updates  # second moment (uncorrected), like the updates


class ScaleByBiasCorrectionState(NamedTuple):
  count: jax.Array  # int32 scalar


def scale_by_adam_moments(
    b1: float = 0.9, b2: float = 0.999, eps: float = 1e-6, *,
    mu_dtype: Optional[Any] = None,
) -> optax.GradientTransformation:
  """Adam's ratio of uncorrected moments, ``m / (sqrt(v) + ε)``.

  .. math::
    m_t = β_1 m_{t-1} + (1-β_1) g,\\quad v_t = β_2 v_{t-1} + (1-β_2) g^2,\\quad
    u_t = \\frac{m_t}{\\sqrt{v_t} + ε}.

  Follow it (anywhere later in the chain) by :func:`scale_by_bias_correction`
  to get Adam (Kingma & Ba, `Adam <https://arxiv.org/abs/1412.6980>`_, 2014,
  Algorithm 1 in its "efficient" form, as PyTorch computes it). The state has
  no step count, so the moments can sit inside a subspace pipeline.
  ``mu_dtype`` (None: float32) stores the first moment as in
  ``optax.scale_by_adam``: computed, and the step taken, in float32.
  """
  mu_dtype = precision.float_dtype(mu_dtype, 'mu_dtype')

  def init_fn(params):
    return ScaleByAdamMomentsState(
        adam.init_moment(params, mu_dtype), adam.init_moment(params))

  def update_fn(updates, state, params=None):
    del params
    mu, nu = adam.moments_for_step(updates, state.mu, state.nu, b1, b2)
    out = jax.tree.map(
        lambda m, v, g: (m / (jnp.sqrt(v) + eps)).astype(jnp.result_type(g)),
        mu, nu, updates)
    return out, ScaleByAdamMomentsState(adam.stored_like(mu, state.mu), nu)

  return optax.GradientTransformation(init_fn, update_fn)


def scale_by_bias_correction(
    b1: float = 0.9, b2: float = 0.999
) -> optax.GradientTransformation:
  """Multiply the updates by Adam's bias correction ``sqrt(1-β₂ᵗ) / (1-β₁ᵗ)``.

  ``t`` counts the updates of this transform (1 at the first). See
  :func:`scale_by_adam_moments`.
  """

  def init_fn(params):
    del params
    return ScaleByBiasCorrectionState(jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params=None):
    del params
    count = optax.safe_increment(state.count)
    step = adam.bias_correction(count, b1, b2)
    return jax.tree.map(
        lambda u: (step * u).astype(jnp.result_type(u)), updates
    ), ScaleByBiasCorrectionState(count)

  return optax.GradientTransformation(init_fn, update_fn)
