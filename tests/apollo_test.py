"""Tests of APOLLO / APOLLO-Mini and the seeded Gaussian basis."""

import math

import jax
import jax.numpy as jnp
import numpy as np

import subspace_optax as so


def _normal(seed, shape):
  return jax.random.normal(jax.random.key(seed), shape)


def test_seeded_gaussian_is_regenerated_from_its_seed():
  method = so.bases.seeded_gaussian()
  state = method.init(256, 5, 64)
  assert [(x.shape, x.dtype) for x in jax.tree.leaves(state)] == [
      ((), jnp.uint32)]
  one = method.refresh(None, state, jax.random.key(1), True)
  two = method.refresh(None, state, jax.random.key(2), True)
  p1, p2 = so.bases.seeded_matrix(one), so.bases.seeded_matrix(two)
  assert p1.shape == (256, 64)
  np.testing.assert_array_equal(p1, so.bases.seeded_matrix(one))
  assert float(jnp.abs(p1 - p2).max()) > 0.1
  np.testing.assert_allclose(float(jnp.var(p1)), 1 / 64, rtol=0.05)
  g = _normal(3, (256, 5))
  np.testing.assert_allclose(method.project(g, one), p1.T @ g, rtol=1e-5,
                             atol=1e-5)
  np.testing.assert_allclose(method.transition(one, two), p2.T @ p1,
                             rtol=1e-5, atol=1e-5)


def _first_step(tx, params, grads):
  state = tx.init(params)
  updates, state = jax.jit(tx.update)(grads, state, params)
  return np.asarray(updates['w']), state


def test_update_is_gradient_scaled_per_channel():
  """U/G is constant along each channel (rows of the 30 x 12 matrix here)."""
  params = {'w': jnp.ones((30, 12))}  # reference side: sketch over 12 columns
  grads = {'w': _normal(0, (30, 12))}
  lr = 0.1
  u, state = _first_step(so.apollo(lr, rank=3, limiter=None), params, grads)
  ratio = u / np.asarray(grads['w'])
  np.testing.assert_allclose(ratio, ratio[:, :1] * np.ones((1, 12)), rtol=1e-5)
  assert np.std(ratio[:, 0]) > 1e-3 * np.abs(ratio).mean()  # channels differ
  # The exact factor: s_j = ‖N_j‖ / (‖C_j‖ + 1e-8) from the regenerated sketch.
  p = np.asarray(so.bases.seeded_matrix(state[0].basis['w']), np.float64)
  assert p.shape == (12, 3)
  c = p.T @ np.asarray(grads['w'], np.float64).T  # (3, 30)
  n = 0.1 * c / (np.sqrt(0.001) * np.abs(c) + 1e-6)
  s = np.linalg.norm(n, axis=0) / (np.linalg.norm(c, axis=0) + 1e-8)
  step = np.sqrt(1 - 0.999) / (1 - 0.9)
  np.testing.assert_allclose(ratio[:, 0], -lr * step * s, rtol=1e-4)


def test_apollo_mini_scales_the_whole_matrix_by_sqrt_128():
  params = {'w': jnp.ones((30, 12))}
  grads = {'w': _normal(1, (30, 12))}
  # The reference side (apollo-torch's proj_type='std'): the sketch on the
  # smaller dimension, its coefficients along the larger one.
  u, state = _first_step(so.apollo_mini(0.1, side='reference'), params, grads)
  ratio = u / np.asarray(grads['w'])
  np.testing.assert_allclose(ratio, np.full_like(ratio, ratio[0, 0]), rtol=1e-5)
  c = np.asarray(so.bases.seeded_matrix(state[0].basis['w'])).T @ np.asarray(
      grads['w']).T
  n = 0.1 * c / (np.sqrt(0.001) * np.abs(c) + 1e-6)
  s = np.linalg.norm(n) / (np.linalg.norm(c) + 1e-8)
  step = np.sqrt(1 - 0.999) / (1 - 0.9)
  np.testing.assert_allclose(ratio[0, 0], -0.1 * step * math.sqrt(128) * s,
                             rtol=1e-4)


def test_limiter_bounds_growth_of_the_scaled_gradient():
  params = {'w': jnp.ones((20, 8))}
  tx = so.apollo(1.0, rank=2, refresh=100)
  state = tx.init(params)
  update = jax.jit(tx.update)
  direction = _normal(2, (20, 8))
  norms = []
  for t in range(1, 5):
    updates, state = update({'w': 10.0**t * direction}, state, params)
    step = math.sqrt(1 - 0.999**t) / (1 - 0.9**t)
    norms.append(float(jnp.linalg.norm(updates['w'])) / step)
  for before, after in zip(norms[:-1], norms[1:]):
    assert after <= 1.01 * before * (1 + 1e-5)


def test_state_is_low_rank_moments_plus_scalars():
  params = {'w': jnp.ones((40, 16)), 'stack': jnp.ones((2, 10, 14)),
            'b': jnp.ones((16,))}
  dims = so.last_two_axes
  for rank, tx in ((4, so.apollo(1e-3, rank=4, dimension_numbers=dims)),
                   (1, so.apollo_mini(1e-3, side='reference',
                                      dimension_numbers=dims))):
    state = tx.init(params)
    expected = so.state_sizes.apollo_bytes(params, rank, dimension_numbers=dims)
    assert so.state_bytes(state) == expected
    assert so.state_bytes(state[0].basis) == 3 * 4  # one seed per matrix
    moments = 2 * 4 * rank * (40 + 2 * 14) + 2 * 4 * 16
    # + pipeline and bias-correction counts, refresh schedules, limiters.
    assert expected == moments + 2 * 4 + 2 * 2 * 4 + 3 * 4 + 3 * 4
  # APOLLO-Mini's default side is 'compact' (measured, benchmarks/results/
  # quality_cpu_apollo_side_3seeds.json): moments along the smaller dimension.
  mini = so.apollo_mini(1e-3, dimension_numbers=dims).init(params)
  assert so.state_bytes(mini) == so.state_sizes.apollo_bytes(
      params, 1, side='compact', dimension_numbers=dims)
  reference = so.state_sizes.apollo_bytes(params, 1, dimension_numbers=dims)
  assert so.state_bytes(mini) == reference - 2 * 4 * ((40 + 2 * 14)
                                                      - (16 + 2 * 10))
  dense = so.apollo(1e-3, rank=4, basis='gaussian', dimension_numbers=dims)
  assert so.state_bytes(dense.init(params)) == so.state_sizes.apollo_bytes(
      params, 4, basis='gaussian', dimension_numbers=dims)
