"""Momentum reset on a schedule (pretraining benchmark, arXiv 2505.22922)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

import subspace_optax as so


def _grads(steps, shape=(5, 4), seed=0):
  rng = np.random.RandomState(seed)
  return [jnp.asarray(rng.randn(*shape), jnp.float32) for _ in range(steps)]


def _numpy_adam_with_reset(grads, period, b1=0.9, b2=0.999, eps=1e-8,
                           second_moment=False):
  m = np.zeros(grads[0].shape)
  v = np.zeros(grads[0].shape)
  t = 0
  out = []
  for step, g in enumerate(grads):
    g = np.asarray(g, np.float64)
    if step > 0 and step % period == 0:
      m = np.zeros_like(m)
      if second_moment:
        v, t = np.zeros_like(v), 0
    t += 1
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    out.append((m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps))
  return out


def test_adam_moments_reset_every_period():
  grads = _grads(7)
  for second_moment in (False, True):
    tx = so.reset_moments_every(optax.scale_by_adam(), 3,
                                second_moment=second_moment)
    state = tx.init(grads[0])
    update = jax.jit(tx.update)
    expected = _numpy_adam_with_reset(grads, 3, second_moment=second_moment)
    for g, e in zip(grads, expected):
      u, state = update(g, state)
      np.testing.assert_allclose(u, e, rtol=2e-5, atol=1e-6)
  # The reset matters: plain Adam differs at step 3.
  plain = _numpy_adam_with_reset(grads, 100)
  assert np.abs(plain[3] - expected[3]).max() > 1e-2


def test_around_low_rank_only_inner_moments_are_reset():
  params = {'w': jnp.zeros((8, 6))}
  tx = so.reset_moments_every(
      so.low_rank(optax.scale_by_adam(), rank=2, refresh=100, basis='svd'), 2)
  state = tx.init(params)
  update = jax.jit(tx.update)
  for g in _grads(2, (8, 6)):
    _, state = update({'w': g}, state, params)
  before = state.inner_state
  reset = so.reset_moments(before, where=True)
  np.testing.assert_array_equal(reset.inner_state.mu['w'], 0)
  np.testing.assert_array_equal(reset.inner_state.nu['w'],
                                before.inner_state.nu['w'])
  np.testing.assert_array_equal(reset.basis['w'], before.basis['w'])
  assert reset.count == before.count == 2
  assert reset.inner_state.count == before.inner_state.count
  assert np.abs(before.inner_state.mu['w']).max() > 0
