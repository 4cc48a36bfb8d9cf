"""Tests of Q-GaLore's pieces: quantized bases, lazy refresh, stochastic rounding."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import subspace_optax as so


def _normal(seed, shape):
  return jax.random.normal(jax.random.key(seed), shape)


def _group_scale(q, group_size, k):
  return np.repeat(np.asarray(q.scale), group_size, axis=0)[:k]


@pytest.mark.parametrize('bits', [4, 8])
def test_quantize_roundtrip_within_half_a_step(bits):
  x = _normal(0, (37, 5))  # a short last group and an odd column count
  quantize = jax.jit(lambda x: so.quantize(x, bits, group_size=16))
  dequantize = jax.jit(lambda q: so.dequantize(q, bits, 16))
  q = quantize(x)
  assert q.scale.shape == q.zero.shape == (3, 5)
  assert q.codes.shape == ((37, 5) if bits == 8 else (37, 3))
  assert q.codes.dtype == q.zero.dtype == jnp.uint8
  error = np.abs(np.asarray(dequantize(q) - x))
  assert np.all(error <= 0.5 * _group_scale(q, 16, 37) + 1e-6)
  # Groups whose entries all have one sign stay in range (0 is in the range).
  positive = jnp.abs(x) + 1.0
  q = quantize(positive)
  error = np.abs(np.asarray(dequantize(q) - positive))
  assert np.all(error <= 0.5 * _group_scale(q, 16, 37) + 1e-6)


@pytest.mark.parametrize('bits', [4, 8])
def test_quantized_svd_basis_is_the_svd_basis_up_to_quantization(bits):
  svd, wrapped = so.bases.svd(), so.bases.quantized('svd', bits, 16)
  g = _normal(1, (40, 12))
  key = jax.random.key(0)

  @jax.jit
  def both(g):
    dense = svd.refresh(g, svd.init(40, 12, 4), key, True)
    state = wrapped.refresh(g, wrapped.init(40, 12, 4), key, True)
    return (dense, state, so.dequantize(state, bits, 16),
            wrapped.project(g, state))

  dense, state, basis, projected = both(g)
  basis = np.asarray(basis)
  error = np.abs(basis - np.asarray(dense))
  assert np.all(error <= 0.5 * _group_scale(state, 16, 40) + 1e-6)
  step = float(np.max(np.asarray(state.scale)))
  assert step < (0.15 if bits == 4 else 0.01)
  np.testing.assert_allclose(projected, basis.T @ np.asarray(g), rtol=1e-4,
                             atol=1e-4)


def test_state_bytes_shrink_with_bits():
  params = {'w': jnp.ones((64, 24)), 'stack': jnp.ones((2, 40, 16)),
            'b': jnp.ones((16,))}
  dims = so.last_two_axes
  sizes = {}
  for bits in (4, 8):
    tx = so.q_galore(1e-3, rank=4, bits=bits, group_size=32,
                     dimension_numbers=dims, side='compact')
    state = jax.eval_shape(tx.init, params)
    sizes[bits] = so.state_bytes(state)
    assert sizes[bits] == so.state_sizes.q_galore_bytes(
        params, 4, bits=bits, group_size=32, dimension_numbers=dims, side='compact')
    codes = [b.codes for b in jax.tree.leaves(
        state[0].basis, is_leaf=lambda x: isinstance(x, so.QuantizedMatrix))]
    assert all(c.dtype == jnp.uint8 for c in codes)
    if bits == 4:
      codes4 = sum(np.prod(c.shape) for c in codes)
    else:
      codes8 = sum(np.prod(c.shape) for c in codes)
  assert codes4 * 2 == codes8  # int4 codes take half the bytes of int8
  assert sizes[8] - sizes[4] == codes8 - codes4
  galore = so.state_sizes.galore_bytes(params, 4, dimension_numbers=dims, side='compact')
  assert sizes[4] < galore


def _run_policy(policy, similarities, steps):
  """Drive a policy with one similarity per refresh; returns refresh steps."""
  state = policy.init(0, 1)
  refreshed_at, queue = [], list(similarities)
  for count in range(steps):
    count = jnp.asarray(count, jnp.int32)
    due = policy.due(state, count)
    similarity = jnp.asarray(queue[0] if bool(due) and queue else 0.0)
    if bool(due):
      refreshed_at.append(int(count))
      queue = queue[1:] if refreshed_at[1:] else queue  # first: no similarity
    state = policy.after(state, count, due, similarity)
  return refreshed_at, state


def test_lazy_refresh_stretches_the_period_once_bases_agree():
  policy = so.refresh.lazy(2, threshold=0.45, window=3, growth=2)
  # Similarities of the 2nd, 3rd, ... refreshes: the mean of the last 3 first
  # reaches the threshold at the 6th refresh (0.3, 0.3, 0.9).
  at, state = _run_policy(policy, [0.3, 0.3, 0.3, 0.3, 0.9, 0.9, 0.9, 0.9], 40)
  assert at[:6] == [0, 2, 4, 6, 8, 10]  # not before: period 2 until update 10
  # Stable from then on: the period doubles at every refresh (the window is
  # not cleared, as the reference).
  assert at[6:] == [14, 22, 38]
  assert int(state.period) == 32
  # Disagreeing bases never stretch the period.
  at, state = _run_policy(policy, [0.3] * 30, 20)
  assert at == list(range(0, 20, 2)) and int(state.period) == 2


def test_lazy_refresh_in_the_pipeline():
  """Constant gradients (identical bases) double the gap; random ones do not."""
  params = {'w': jnp.ones((24, 12))}
  policy = so.refresh.lazy(2, threshold=0.9, window=2, growth=2)
  tx = so.low_rank(optax.identity(), rank=2, refresh=policy, basis='svd', side='compact')
  update = jax.jit(tx.update)
  for constant in (True, False):
    state = tx.init(params)
    periods = []
    for t in range(10):
      g = {'w': _normal(0 if constant else t, (24, 12))}
      _, state = update(g, state)
      periods.append(int(state.refresh['w'].period))
    if constant:  # refreshes at 0, 2, 4 (window full: period 4), 8 (period 8)
      assert periods == [2, 2, 2, 2, 4, 4, 4, 4, 8, 8]
    else:
      assert periods == [2] * 10


def test_q_galore_update_lies_in_the_dequantized_basis():
  params = {'w': jnp.ones((48, 20))}
  tx = so.q_galore(0.1, rank=3, group_size=16, side='compact')
  state = tx.init(params)
  updates, state = jax.jit(tx.update)({'w': _normal(5, (48, 20))}, state, params)
  q = np.asarray(so.dequantize(state[0].basis['w'], 4, 16))  # compact: (48, 3)
  u = np.asarray(updates['w'])
  inside = q @ np.linalg.lstsq(q, u, rcond=None)[0]
  np.testing.assert_allclose(u, inside, atol=1e-5 * np.abs(u).max())


def test_stochastic_round_is_unbiased():
  key = jax.random.key(0)
  stochastic_round = jax.jit(so.stochastic_round, static_argnums=1)
  n = 200_000
  # bfloat16 has a step of 2^-7 at 1: 1 + 0.3 step rounds to 1 when nearest.
  x = jnp.full((n,), 1.0 + 0.3 * 2.0**-7, jnp.float32)
  rounded = stochastic_round(x, jnp.bfloat16, key)
  assert rounded.dtype == jnp.bfloat16
  values = np.unique(np.asarray(rounded, np.float32))
  np.testing.assert_array_equal(values, [1.0, 1.0 + 2.0**-7])
  standard_error = 2.0**-7 * np.sqrt(0.21 / n)
  mean = float(jnp.mean(rounded.astype(jnp.float32)))
  assert abs(mean - float(x[0])) < 4 * standard_error
  nearest = float(x[0].astype(jnp.bfloat16).astype(jnp.float32))
  bias_of_nearest = abs(nearest - float(x[0]))
  assert bias_of_nearest > 100 * standard_error
  # Integers: -2.3 becomes -3 or -2, on average -2.3; exact values stay.
  ints = stochastic_round(jnp.full((n,), -2.3), jnp.int8, key)
  assert set(np.unique(np.asarray(ints)).tolist()) == {-3, -2}
  assert abs(float(jnp.mean(ints.astype(jnp.float32))) + 2.3) < 4 * np.sqrt(
      0.21 / n)
  exact = jnp.array([0.5, -3.0, 1.0 + 2.0**-7])
  np.testing.assert_array_equal(
      stochastic_round(exact, jnp.bfloat16, key).astype(jnp.float32), exact)
