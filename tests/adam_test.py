"""PyTorch-style Adam (``ε`` inside the bias correction) against numpy, and the
split moments + bias correction pair that equals it."""

import jax.numpy as jnp
import numpy as np
import optax
import pytest

import subspace_optax as so

B1, B2, EPS = 0.9, 0.99, 1e-3


def _numpy_adam(gradients):
  m = v = 0.0
  out = []
  for t, g in enumerate(gradients, start=1):
    m = B1 * m + (1 - B1) * g
    v = B2 * v + (1 - B2) * g * g
    correction = np.sqrt(1 - B2**t) / (1 - B1**t)
    out.append(correction * m / (np.sqrt(v) + EPS))
  return out


def _gradients():
  rng = np.random.default_rng(0)
  return [rng.normal(size=(3, 4)) * 10.0**-s for s in range(4)]


@pytest.mark.parametrize('tx', [
    so.scale_by_torch_adam(B1, B2, EPS),
    optax.chain(so.scale_by_adam_moments(B1, B2, EPS),
                so.scale_by_bias_correction(B1, B2)),
], ids=['torch_adam', 'moments_then_bias_correction'])
def test_matches_the_formula(tx):
  gradients = _gradients()
  state = tx.init(jnp.zeros((3, 4)))
  for g, want in zip(gradients, _numpy_adam(gradients)):
    out, state = tx.update(jnp.asarray(g, jnp.float32), state)
    np.testing.assert_allclose(out, want, rtol=2e-5, atol=1e-7)
