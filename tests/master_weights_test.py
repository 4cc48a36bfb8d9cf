"""master_weights: float32 master copies keep orthogonal_to's guarantee for
bfloat16 params, which rounding alone breaks."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import subspace_optax as so
from subspace_optax import continual as cl

STEPS = 100
LEARNING_RATE = 1e-2


def _protected_fraction(change, memory):
  """|change - (I - UUᵀ) change (I - VVᵀ)| / |change| (float64)."""
  d = np.asarray(change, np.float64)
  u = np.asarray(memory.left, np.float64)
  v = np.asarray(memory.right, np.float64)
  kept = (d - u @ (u.T @ d)) - (d - u @ (u.T @ d)) @ v @ v.T
  return np.linalg.norm(d - kept) / np.linalg.norm(d)


def _train(dtype, tx):
  """STEPS sculpt steps on a 32 x 16 matrix; returns start, params, state."""
  key = jax.random.key(0)
  start = {'w': 0.5 * jax.random.normal(key, (32, 16))}
  memory = cl.sculpt_memory(start, max_fraction=0.5)
  params = jax.tree.map(lambda x: x.astype(dtype), start)
  state = cl.set_memory(tx.init(params), memory)

  @jax.jit
  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  for i in range(STEPS):
    grads = {'w': jax.random.normal(jax.random.fold_in(key, i), (32, 16))}
    params, state = step(params, state, grads)
  start = jax.tree.map(lambda x: x.astype(dtype).astype(jnp.float32), start)
  return start, params, state, memory['w']


def test_bfloat16_rounding_leaks_and_master_weights_keep_the_guarantee():
  sculpt = so.continual.sculpt(LEARNING_RATE, max_fraction=0.5)
  start, params, _, memory = _train(jnp.float32, sculpt)
  assert _protected_fraction(params['w'] - start['w'], memory) < 1e-5
  # bfloat16 params: the masked update is orthogonal, its rounding is not.
  start, params, _, memory = _train(jnp.bfloat16, sculpt)
  drift = _protected_fraction(params['w'].astype(jnp.float32) - start['w'],
                              memory)
  assert drift > 0.05  # about 20 % of the weight change (documented)
  # Master weights receive the exact updates: orthogonal as in float32.
  start, params, state, memory = _train(
      jnp.bfloat16, optax.chain(sculpt, so.master_weights()))
  master = state[1].master['w']
  assert _protected_fraction(master - start['w'], memory) < 1e-5
  # The bfloat16 params are the rounded master weights, within one rounding
  # of the last update (a bfloat16 ulp is 2^-7 relative).
  assert params['w'].dtype == jnp.bfloat16
  weights = params['w'].astype(jnp.float32)
  assert np.mean(np.asarray(weights == master.astype(jnp.bfloat16))) > 0.99
  assert np.all(np.abs(weights - master) <= 2.0 ** -7 * (
      np.abs(master) + LEARNING_RATE))
  assert _protected_fraction(weights - start['w'], memory) < drift / 5


def test_master_weights_pass_wide_leaves_through_and_track_narrow_ones():
  params = {'f32': jnp.ones((3,)), 'bf16': jnp.ones((3,), jnp.bfloat16),
            'f16': jnp.ones((2,), jnp.float16), 'none': None}
  tx = so.master_weights()
  state = tx.init(params)
  assert isinstance(state.master['f32'], optax.MaskedNode)
  assert state.master['bf16'].dtype == jnp.float32
  assert state.master['f16'].dtype == jnp.float32
  tiny = jax.tree.map(lambda p: jnp.full(p.shape, 1e-3, p.dtype), params)
  updates, state = tx.update(tiny, state, params)
  assert updates['f32'] is tiny['f32'] and updates['none'] is None
  # 1e-3 is below half a bfloat16 ulp at 1.0: plain bf16 would never move.
  assert float(optax.apply_updates(params, tiny)['bf16'][0]) == 1.0
  for _ in range(4):
    params = optax.apply_updates(params, updates)
    updates, state = tx.update(tiny, state, params)
  params = optax.apply_updates(params, updates)
  master = 1 + 5 * float(tiny['bf16'][0])  # the bf16 update, added exactly
  np.testing.assert_allclose(state.master['bf16'], master, rtol=1e-6)
  assert float(params['bf16'][0]) == float(jnp.bfloat16(master)) > 1.0
  assert updates['bf16'].dtype == jnp.bfloat16


def test_master_weights_need_params():
  tx = so.master_weights()
  state = tx.init({'w': jnp.ones(2, jnp.bfloat16)})
  with pytest.raises(ValueError, match='master_weights needs the params'):
    tx.update({'w': jnp.ones(2, jnp.bfloat16)}, state)
