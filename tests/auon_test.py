"""AuON: normalized Nesterov momentum, the cosh brake, Newton–Schulz hybrid."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import subspace_optax as so
from subspace_optax._src.pipeline import per_matrix
from subspace_optax._src.transforms import auon as auon_lib


def _numpy_newton_schulz_step(x):
  a, b, c = 3.4445, -4.7750, 2.0315
  tall = x.shape[0] > x.shape[1]
  if tall:
    x = x.T
  gram = x @ x.T
  x = a * x + (b * gram + c * gram @ gram) @ x
  return x.T if tall else x


def _numpy_brake(x, gamma):
  return np.sqrt(np.mean(np.cosh(gamma * x) ** 2))


@pytest.mark.parametrize('gamma', [1.0, 1.5])
def test_brake_is_one_plus_gamma_squared_over_two_n(gamma):
  x = np.random.RandomState(0).randn(48, 32)
  x /= np.linalg.norm(x)
  n = x.size
  brake = float(auon_lib.cosh_brake(jnp.asarray(x, jnp.float32), gamma)[0, 0])
  # √mean cosh²(γx) = 1 + γ²/(2N) + O(γ⁴ Σx⁴ / N); here γ²/(2N) ~ 1e-3.
  np.testing.assert_allclose(brake - 1, gamma**2 / (2 * n), rtol=2e-2)


@pytest.mark.parametrize('shape', [(6, 9), (9, 6)])
def test_newton_schulz_step_matches_numpy(shape):
  x = np.random.RandomState(1).randn(*shape)
  x /= np.linalg.norm(x)
  np.testing.assert_allclose(
      auon_lib.newton_schulz_step(jnp.asarray(x, jnp.float32)),
      _numpy_newton_schulz_step(x), rtol=1e-5, atol=1e-6)


def _numpy_auon(grads, beta, gamma, ns_steps, normalize=True):
  m = np.zeros_like(grads[0])
  out = []
  for g in grads:
    m = beta * m + (1 - beta) * g
    nesterov = beta * m + (1 - beta) * g
    x = nesterov / (np.linalg.norm(nesterov) + 1e-7)
    for _ in range(ns_steps):
      x = _numpy_newton_schulz_step(x)
    out.append((x if normalize else nesterov) / (_numpy_brake(x, gamma) + 1e-8))
  return out


@pytest.mark.parametrize('lowering', ['cpu', 'gpu'])
@pytest.mark.parametrize('ns_steps,gamma,normalize', [
    (0, 1.0, True), (1, 1.0, True), (0, 1.5, False)])
def test_scale_by_auon_matches_numpy(ns_steps, gamma, normalize, lowering,
                                     monkeypatch):
  # A stack of two matrices: looped on the CPU (without forming X when there
  # are no Newton-Schulz steps), vectorised as X on GPUs; same rule.
  if lowering == 'gpu':
    monkeypatch.setattr(per_matrix, 'on_platform',
                        lambda *args, cpu, gpu: gpu(*args))
  rng = np.random.RandomState(2)
  grads = [rng.randn(2, 8, 5) for _ in range(3)]
  tx = so.scale_by_auon(newton_schulz_steps=ns_steps, gamma=gamma,
                        normalize=normalize)
  state = tx.init(jnp.zeros((2, 8, 5)))
  update = jax.jit(tx.update)
  expected = np.stack([
      _numpy_auon([g[i] for g in grads], 0.95, gamma, ns_steps, normalize)
      for i in range(2)], axis=1)
  for g, e in zip(grads, expected):
    u, state = update(jnp.asarray(g, jnp.float32), state)
    np.testing.assert_allclose(u, e, rtol=1e-4, atol=1e-6)
    if ns_steps == 0 and normalize:
      # Unit Frobenius norm up to the brake, ‖U‖ = 1/brake, brake ≈ 1 + γ²/(2N).
      for one in np.asarray(u):
        x = one / np.linalg.norm(one)
        np.testing.assert_allclose(
            np.linalg.norm(one), 1 / _numpy_brake(x, gamma), rtol=1e-5)
        np.testing.assert_allclose(
            np.linalg.norm(one), 1 / (1 + gamma**2 / (2 * one.size)),
            rtol=2e-3)


def test_stacked_matrices_are_normalized_one_by_one():
  g = np.random.RandomState(3).randn(3, 4, 6)
  g[1] *= 100.0
  tx = so.scale_by_auon(nesterov=False)
  u, _ = jax.jit(tx.update)(jnp.asarray(g, jnp.float32),
                            tx.init(jnp.zeros((3, 4, 6))))
  u = np.asarray(u)
  norms = np.linalg.norm(u.reshape(3, -1), axis=1)
  brakes = [_numpy_brake(x / np.linalg.norm(x), 1.0) for x in u]
  np.testing.assert_allclose(norms, 1 / np.array(brakes), rtol=1e-5)


def test_auon_alias_scales_by_aspect_ratio_and_routes_vectors_to_adamw():
  params = {'wide': jnp.zeros((4, 16)), 'tall': jnp.zeros((16, 4)),
            'b': jnp.zeros((16,))}
  tx = so.auon(0.1, weight_decay=0.0)
  grads = jax.tree.map(lambda p: jnp.ones_like(p), params)
  u, state = jax.jit(tx.update)(grads, tx.init(params), params)
  norm = lambda x: float(np.linalg.norm(np.asarray(x)))
  # (in, out) = (4, 16): fan_out/fan_in = 4 -> ×2; tall: ×1.
  np.testing.assert_allclose(norm(u['wide']) / norm(u['tall']), 2.0, rtol=1e-3)
  x = np.full((16, 4), 1 / 8)  # the normalized all-ones gradient
  np.testing.assert_allclose(norm(u['tall']), 0.1 / _numpy_brake(x, 1.0),
                             rtol=1e-5)
  np.testing.assert_allclose(np.abs(u['b']), 0.1, rtol=1e-4)  # Adam's 1st step
  assert so.state_bytes(state) == so.state_sizes.auon_bytes(params)
