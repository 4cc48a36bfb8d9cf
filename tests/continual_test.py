"""Tests of the continual presets composed from orthogonal_to."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from subspace_optax import continual as cl


def _params():
  keys = jax.random.split(jax.random.key(0), 2)
  return {'w': jax.random.normal(keys[0], (10, 6)),
          'b': jax.random.normal(keys[1], (6,))}


def test_gpm_ewc_is_the_projected_adam_step_on_the_penalised_gradient():
  """Δ = -P η adam(P (g + λ F ⊙ (θ - θ*))), P = I - MMᵀ; biases frozen."""
  params, lr, strength = _params(), 1e-2, 3.0
  tx = cl.gpm_ewc(lr, strength=strength)
  state = tx.init(params)
  inputs = {'w': jax.random.normal(jax.random.key(1), (40, 10)) @ jnp.diag(
      jnp.array([1.0] * 4 + [0.0] * 6)), 'b': None}
  fisher = jax.tree.map(lambda p: jnp.abs(p) + 0.5, params)
  state = cl.consolidate_ewc(state, params, fisher)
  state = cl.set_memory(state, cl.gpm_memory(
      inputs, 1.0, cl.get_memory(state)))
  memory = np.asarray(cl.get_memory(state)['w'].left, np.float64)
  assert int(cl.get_memory(state)['w'].left_count) == 4
  moved = jax.tree.map(lambda p: p + 0.1, params)
  grads = jax.tree.map(lambda p: jnp.sin(p), params)
  updates, _ = tx.update(grads, state, moved)
  penalised = jax.tree.map(lambda g, f: g + strength * f * 0.1, grads, fisher)
  project = lambda x: x - memory @ (memory.T @ x)
  penalised['w'] = project(penalised['w'])
  adam_step, _ = optax.adam(lr).update(penalised, optax.adam(lr).init(params))
  expected = project(adam_step['w'])
  np.testing.assert_allclose(updates['w'], expected, atol=1e-6)
  np.testing.assert_array_equal(updates['b'], 0)
  # The protected inputs see no change: x Δ = 0.
  assert float(jnp.max(jnp.abs(inputs['w'] @ updates['w']))) < 1e-6


def test_gpm_freezes_what_it_cannot_protect_by_default():
  params = _params()
  tx = cl.gpm(0.1)
  state = tx.init(params)
  updates, _ = tx.update(params, state, params)
  np.testing.assert_allclose(updates['b'], -0.1 * params['b'])
  inputs = {'w': jnp.eye(10)[:2], 'b': None}
  state = cl.set_memory(state, cl.gpm_memory(inputs, 1.0,
                                             cl.get_memory(state)))
  updates, _ = tx.update(params, state, params)
  np.testing.assert_array_equal(updates['b'], 0)
  np.testing.assert_array_equal(updates['w'][:2], 0)
  np.testing.assert_allclose(updates['w'][2:], -0.1 * params['w'][2:])
