"""stochastic_rounding: bfloat16 params that keep updates far below their
rounding step on average, with no float32 copy."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import subspace_optax as so

N = 20_000  # entries; the mean of N draws has a standard error of step/(2√N)


def _apply(tx, params, grads, steps):
  state = tx.init(params)
  for _ in range(steps):
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
  return params, updates, state


def test_unbiased_where_nearest_rounding_loses_the_update():
  # At 1.0 bfloat16's step upwards is 2^-7 = 7.8e-3; 1e-3 is an eighth of it.
  params = {'w': jnp.ones(N, jnp.bfloat16)}
  grads = {'w': jnp.full(N, -1e-3, jnp.float32)}
  sr, updates, _ = _apply(
      optax.chain(optax.sgd(1.0), so.stochastic_rounding(seed=3)),
      params, grads, 1)
  nearest, _, _ = _apply(optax.sgd(1.0), params, grads, 1)
  assert sr['w'].dtype == jnp.bfloat16
  assert updates['w'].dtype == jnp.float32
  values = np.asarray(sr['w'], np.float64)
  # Only the two neighbours of 1.001 in bfloat16.
  assert set(np.unique(values)) <= {1.0, 1.0 + 2.0 ** -7}
  # E[SR(x)] = x: the mean is 1.001 within 5 standard errors (2.8e-5 each).
  step = 2.0 ** -7
  p = 1e-3 / step
  error = step * np.sqrt(p * (1 - p) / N)
  assert abs(values.mean() - 1.001) < 5 * error
  # Round-to-nearest keeps every weight at 1: the update is lost.
  assert np.all(np.asarray(nearest['w'], np.float64) == 1.0)


def test_many_small_steps_accumulate_in_expectation():
  # 50 steps of -2e-4 (a fortieth of the step): +0.01 in total on average.
  params = {'w': jnp.ones(N, jnp.bfloat16)}
  grads = {'w': jnp.full(N, 2e-4, jnp.float32)}
  sr, _, state = _apply(
      optax.chain(optax.sgd(-1.0), so.stochastic_rounding()), params, grads,
      50)
  assert int(state[1].count) == 50
  mean = float(np.asarray(sr['w'], np.float64).mean())
  # Each step's rounding error has mean 0 and s.d. <= step/2 per entry.
  assert abs(mean - 1.01) < 5 * (2.0 ** -7 / 2) * np.sqrt(50 / N)
  nearest, _, _ = _apply(optax.sgd(-1.0), params, grads, 50)
  assert np.all(np.asarray(nearest['w'], np.float64) == 1.0)


def test_negative_values_and_larger_updates_stay_unbiased():
  key = jax.random.key(0)
  w = jax.random.normal(key, (N,)).astype(jnp.bfloat16)
  delta = 0.37 * jnp.abs(w.astype(jnp.float32)) * 2.0 ** -8 + 3e-3
  params, grads = {'w': w}, {'w': delta}
  tx = optax.chain(optax.sgd(-1.0), so.stochastic_rounding())
  updates, _ = tx.update(grads, tx.init(params), params)
  new = optax.apply_updates(params, updates)['w']
  exact = np.asarray(w, np.float64) + np.asarray(delta, np.float64)
  residual = np.asarray(new, np.float64) - np.asarray(exact)
  # Each entry lands on a neighbour of w + Δ: within one bfloat16 step.
  spacing = np.abs(np.asarray(exact)) * 2.0 ** -7 + 1e-30
  assert np.all(np.abs(residual) <= spacing)
  # Unbiased overall: the mean rounding error is far below the mean step.
  assert abs(residual.mean()) < 5 * np.std(residual) / np.sqrt(N)


def test_float32_and_integer_leaves_pass_through():
  params = {'f32': jnp.ones(8), 'i': jnp.arange(3), 'b': jnp.ones(8, jnp.bfloat16)}
  updates = {'f32': jnp.full(8, 1e-9), 'i': jnp.zeros(3, jnp.int32),
             'b': jnp.full(8, 0.5)}
  tx = so.stochastic_rounding()
  out, _ = tx.update(updates, tx.init(params), params)
  assert out['f32'] is updates['f32'] and out['i'] is updates['i']
  np.testing.assert_array_equal(out['b'], 0.5)  # 1.5 is representable


def test_steps_draw_different_keys_and_seeds_matter():
  params = {'w': jnp.ones(256, jnp.bfloat16)}
  grads = {'w': jnp.full(256, 2e-3)}
  tx = so.stochastic_rounding(seed=0)
  state = tx.init(params)
  first, state = tx.update(grads, state, params)
  second, _ = tx.update(grads, state, params)
  other, _ = so.stochastic_rounding(seed=1).update(grads, state, params)
  assert not np.array_equal(first['w'], second['w'])
  assert not np.array_equal(second['w'], other['w'])


def test_needs_params():
  tx = so.stochastic_rounding()
  params = {'w': jnp.ones(3, jnp.bfloat16)}
  with pytest.raises(ValueError, match='needs the params'):
    tx.update(params, tx.init(params))


def test_seed_must_be_an_int():
  with pytest.raises(TypeError, match='`seed` must be an int'):
    so.stochastic_rounding(seed=1.5)


def test_jit_and_state_is_one_count():
  params = {'w': jnp.ones((4, 4), jnp.bfloat16)}
  tx = optax.chain(optax.adam(1e-3), so.stochastic_rounding())
  state = tx.init(params)
  assert so.state_bytes(state[1]) == 4
  updates, _ = jax.jit(tx.update)(params, state, params)
  assert optax.apply_updates(params, updates)['w'].dtype == jnp.bfloat16
