"""The Adam variants against a float64 numpy reference.

β₁ = 0.8 and β₂ = 0.95 (not the defaults, so a swapped β shows) and a large
``ε`` against small gradients, so the place of ``ε`` changes the update by
far more than the tolerance.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import subspace_optax as so
from subspace_optax._src.transforms import adam

B1, B2, EPS = 0.8, 0.95, 1e-3
STEPS = 4
RTOL = 2e-6


def _gradients(shape=(3, 5)):
  rng = np.random.default_rng(0)
  return [1e-3 * rng.standard_normal(shape) for _ in range(STEPS)]


def _moments(grads, b1=B1, b2=B2):
  """Float64 (m_t, v_t) for t = 1..len(grads)."""
  m = v = 0.0
  out = []
  for g in grads:
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    out.append((m, v))
  return out


def _run(tx, grads):
  state = tx.init(jnp.zeros(grads[0].shape, jnp.float32))
  update = jax.jit(tx.update)
  outs = []
  for g in grads:
    u, state = update(jnp.asarray(g, jnp.float32), state)
    outs.append(np.asarray(u, np.float64))
  return outs


def _torch_reference(grads):
  """PyTorch/GaLore: ε inside the bias correction."""
  out = []
  for t, (m, v) in enumerate(_moments(grads), start=1):
    out.append(np.sqrt(1 - B2**t) / (1 - B1**t) * m / (np.sqrt(v) + EPS))
  return out


def _optax_reference(grads, nesterov=False):
  """optax/AdamP: ε added to the bias-corrected sqrt(v̂)."""
  out = []
  for t, ((m, v), g) in enumerate(zip(_moments(grads), grads), start=1):
    direction = B1 * m + (1 - B1) * g if nesterov else m
    out.append(direction / (1 - B1**t) / (np.sqrt(v / (1 - B2**t)) + EPS))
  return out


def _assert_close(actual, desired):
  """Within RTOL of the largest entry (small entries of m cancel)."""
  for a, d in zip(actual, desired):
    np.testing.assert_allclose(a, d, rtol=0, atol=RTOL * np.max(np.abs(d)))


def test_eps_placements_differ_by_more_than_the_tolerance():
  """Guards the tests below: the two references are far apart here."""
  grads = _gradients()
  for a, b in zip(_torch_reference(grads), _optax_reference(grads)):
    assert np.max(np.abs(a - b)) > 100 * RTOL * np.max(np.abs(b))


def test_torch_adam_matches_reference_with_eps_inside():
  grads = _gradients()
  _assert_close(_run(so.transforms.scale_by_torch_adam(B1, B2, EPS), grads),
                _torch_reference(grads))


def test_split_adam_is_torch_adam():
  """scale_by_adam_moments then scale_by_bias_correction (Fira, APOLLO)."""
  grads = _gradients()
  tx = optax.chain(so.transforms.scale_by_adam_moments(B1, B2, EPS),
                   so.transforms.scale_by_bias_correction(B1, B2))
  _assert_close(_run(tx, grads), _torch_reference(grads))
  # Without the second half: the uncorrected ratio m / (sqrt(v) + ε).
  ratios = [m / (np.sqrt(v) + EPS) for m, v in _moments(grads)]
  _assert_close(_run(so.transforms.scale_by_adam_moments(B1, B2, EPS), grads), ratios)


@pytest.mark.parametrize('nesterov', [False, True])
def test_adamp_adam_matches_reference(nesterov):
  grads = _gradients()
  _assert_close(
      _run(so.transforms.scale_by_torch_nesterov_adam(B1, B2, EPS, nesterov), grads),
      _optax_reference(grads, nesterov))


def test_resettable_adam_matches_reference():
  grads = _gradients()
  _assert_close(_run(so.transforms.scale_by_resettable_adam(B1, B2, EPS), grads),
                _optax_reference(grads))


def test_lion_momentum_matches_reference():
  grads = _gradients()
  m, expected = 0.0, []
  for g in grads:
    expected.append(B1 * m + (1 - B1) * g)
    m = B2 * m + (1 - B2) * g
  _assert_close(_run(so.transforms.scale_by_lion_momentum(B1, B2), grads), expected)


@pytest.mark.parametrize('t', [1, 2, 100, 10_000])
@pytest.mark.parametrize('b2', [0.999, 0.9999])
def test_bias_correction_is_accurate(t, b2):
  """sqrt(1-β₂ᵗ)/(1-β₁ᵗ) to float32 precision; float32 ``1 - 0.999**t``
  (optax's way) is 1.3e-5 off at t = 1."""
  expected = np.sqrt(1 - b2**t) / (1 - 0.9**t)
  actual = float(adam.bias_correction(jnp.int32(t), 0.9, b2))
  assert abs(actual / expected - 1) < 3e-7
  float32_way = np.sqrt(1 - np.float32(b2) ** np.float32(t)) / (
      1 - np.float32(0.9) ** np.float32(t))
  if t == 1:
    assert abs(float32_way / expected - 1) > 1e-6


def test_step_100_from_given_moments():
  """One update at t = 100 from given moments: the bias correction of step
  100, not of step 1."""
  rng = np.random.default_rng(1)
  m, v = rng.standard_normal((2, 4)), rng.random((2, 4))
  g = rng.standard_normal((2, 4))
  state = adam.ScaleByTorchAdamState(
      jnp.int32(99), jnp.asarray(m, jnp.float32), jnp.asarray(v, jnp.float32))
  u, new = so.transforms.scale_by_torch_adam(B1, B2, EPS).update(
      jnp.asarray(g, jnp.float32), state)
  m = B1 * m + (1 - B1) * g
  v = B2 * v + (1 - B2) * g * g
  expected = np.sqrt(1 - B2**100) / (1 - B1**100) * m / (np.sqrt(v) + EPS)
  np.testing.assert_allclose(u, expected, rtol=RTOL)
  np.testing.assert_allclose(new.mu, m, rtol=RTOL)
  np.testing.assert_allclose(new.nu, v, rtol=RTOL)
  assert int(new.count) == 100


def test_bfloat16_gradients_are_squared_in_float32():
  g = jnp.asarray([1.0 + 2.0**-7, 3.0 + 2.0**-6], jnp.bfloat16)
  nu = adam.update_second_moment(g, jnp.zeros(2, jnp.float32), B2)
  exact = (1 - B2) * np.asarray(g, np.float64) ** 2
  np.testing.assert_allclose(nu, exact, rtol=1e-7)
  assert nu.dtype == jnp.float32


def test_moments_keep_their_dtype_and_start_as_zeros_like():
  params = {'w': jnp.ones((2, 3), jnp.bfloat16)}
  zero = adam.init_moment(params)
  assert zero['w'].dtype == jnp.float32 and not jnp.any(zero['w'])
  lion = so.transforms.scale_by_lion_momentum()
  _, state = lion.update(params, lion.init(params))
  assert state.mu['w'].dtype == jnp.bfloat16  # as optax.scale_by_lion
