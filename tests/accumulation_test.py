"""Gradient accumulation in the subspace (pipeline/accumulation.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import subspace_optax as so

K = 3  # micro-batches per update
PARAMS = {'w': jnp.ones((12, 8)), 'b': jnp.ones((8,))}


def _gradients(n, seed=0):
  rng = np.random.default_rng(seed)
  return [jax.tree.map(lambda p: jnp.asarray(
      rng.standard_normal(p.shape), jnp.float32), PARAMS) for _ in range(n)]


def _assert_close(a, b, atol=1e-6):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=atol)


def test_random_basis_equals_multisteps():
  """Qᵀ mean(G_j) = mean(QᵀG_j): with a basis that does not depend on the
  gradient, accumulating coefficients is optax.MultiSteps exactly."""
  low = lambda **kw: so.low_rank(optax.scale_by_adam(), rank=2, refresh=1,
                                 basis='random', **kw)
  accumulated, reference = low(accumulate_steps=K), optax.MultiSteps(low(), K)
  state, reference_state = accumulated.init(PARAMS), reference.init(PARAMS)
  step, reference_step = jax.jit(accumulated.update), jax.jit(reference.update)
  for call, g in enumerate(_gradients(2 * K)):
    u, state = step(g, state)
    expected, reference_state = reference_step(g, reference_state)
    _assert_close(u, expected)
    emitted = any(np.any(np.asarray(x)) for x in jax.tree.leaves(u))
    assert emitted == (call % K == K - 1), call
  assert int(state.count) == 2 * K


def test_galore_preset_gates_weight_decay_and_schedule():
  """The stages after the projection act once per update: a trajectory with
  weight decay and a decaying learning rate equals MultiSteps'."""
  schedule = optax.linear_schedule(1e-2, 1e-3, 4)
  make = lambda **kw: so.galore(schedule, rank=2, refresh=2, basis='random',
                                weight_decay=0.1, **kw)
  accumulated, reference = make(accumulate_steps=K), optax.MultiSteps(make(), K)
  params, reference_params = PARAMS, PARAMS
  state, reference_state = accumulated.init(PARAMS), reference.init(PARAMS)
  for g in _gradients(3 * K, seed=1):
    u, state = accumulated.update(g, state, params)
    params = optax.apply_updates(params, u)
    v, reference_state = reference.update(g, reference_state, reference_params)
    reference_params = optax.apply_updates(reference_params, v)
  _assert_close(params, reference_params)
  assert not np.allclose(params['w'], PARAMS['w'])


@pytest.mark.parametrize('shape', [(12, 8), (8, 12)])
def test_svd_basis_comes_from_the_first_micro_batch(shape):
  """The basis of a cycle is the top-r singular subspace of its first
  micro-batch's gradient, and the update is Q Qᵀ mean(G_j) (identity inner),
  with Q on whichever side the layout puts it."""
  params = {'w': jnp.ones(shape)}
  tx = so.low_rank(optax.identity(), rank=2, refresh=1, basis='svd',
                   accumulate_steps=K)
  rng = np.random.default_rng(2)
  grads = [{'w': jnp.asarray(rng.standard_normal(shape), jnp.float32)}
           for _ in range(K)]
  state = tx.init(params)
  for g in grads:
    u, state = tx.update(g, state)
  q = np.asarray(state.basis['w'])
  first, mean = np.asarray(grads[0]['w']), np.mean([g['w'] for g in grads], 0)
  left = q.shape[0] == shape[0]
  top = (np.linalg.svd(first)[0][:, :2] if left
         else np.linalg.svd(first)[2][:2].T)
  np.testing.assert_allclose(q @ q.T @ top, top, atol=1e-5)
  of_mean = (np.linalg.svd(mean)[0][:, :2] if left
             else np.linalg.svd(mean)[2][:2].T)
  assert np.abs(q @ q.T @ of_mean - of_mean).max() > 1e-2
  expected = q @ q.T @ mean if left else mean @ q @ q.T
  np.testing.assert_allclose(u['w'], expected, atol=1e-5)


def test_state_holds_a_coefficient_sized_sum():
  """The accumulator is r x n per matrix (float32) plus a counter; MultiSteps
  keeps a full-size copy of every gradient."""
  plain = so.low_rank(optax.scale_by_adam(), rank=2)
  accumulated = so.low_rank(optax.scale_by_adam(), rank=2, accumulate_steps=K)
  coefficients = 2 * 12 + 8  # w: Qᵀ on the 8 side gives (2, 12); b: full
  extra = so.state_bytes(accumulated.init(PARAMS)) - so.state_bytes(
      plain.init(PARAMS))
  assert extra == 4 * coefficients + 4
  multisteps_extra = so.state_bytes(optax.MultiSteps(plain, K).init(
      PARAMS)) - so.state_bytes(plain.init(PARAMS))
  assert multisteps_extra > 4 * (12 * 8 + 8)


def test_refresh_periods_count_updates_not_micro_batches():
  tx = so.low_rank(optax.scale_by_adam(), rank=2, basis='svd', accumulate_steps=K,
                   refresh=so.refresh.every(2, stagger=False))
  state = tx.init(PARAMS)
  step = jax.jit(tx.update)
  changed = []
  for g in _gradients(5 * K, seed=3):
    before = state.basis['w']
    _, state = step(g, state)
    changed.append(not np.array_equal(before, state.basis['w']))
  # Updates 0, 2 and 4 refresh, each at its first micro-batch.
  assert [i for i, c in enumerate(changed) if c] == [0, 2 * K, 4 * K]


def test_a_skipped_refresh_waits_for_the_next_update():
  """A refresh skipped on a non-finite first micro-batch is retried at the
  next update's first micro-batch, never within the cycle (its other
  coefficients would be in another basis)."""
  tx = so.low_rank(optax.scale_by_adam(), rank=2, basis='svd', accumulate_steps=K,
                   refresh=so.refresh.every(5, stagger=False))
  state = tx.init(PARAMS)
  step = jax.jit(tx.update)
  grads = _gradients(2 * K, seed=4)
  grads[0] = jax.tree.map(lambda g: g.at[0].set(jnp.nan), grads[0])
  bases = []
  for g in grads:
    _, state = step(g, state)
    bases.append(np.asarray(state.basis['w']))
  assert all(np.array_equal(bases[0], b) for b in bases[1:K])
  assert not np.array_equal(bases[K - 1], bases[K])


def test_presets_keep_their_state_without_accumulation():
  """accumulate_steps=1 leaves galore's chain (and so its checkpoints) as
  it was: low_rank, weight decay, learning rate."""
  for preset in (so.galore, so.q_galore):
    assert len(preset(1e-2, rank=2).init(PARAMS)) == 3
    assert len(preset(1e-2, rank=2, accumulate_steps=2).init(PARAMS)) == 2


def test_named_errors():
  with pytest.raises(ValueError, match='accumulate_steps'):
    so.low_rank(optax.scale_by_adam(), rank=2, accumulate_steps=0)
  with pytest.raises(TypeError, match='accumulate_steps'):
    so.galore(1e-3, accumulate_steps=2.0)
  with pytest.raises(ValueError, match='residual'):
    so.low_rank(optax.scale_by_adam(), rank=2, accumulate_steps=2,
                residual=optax.scale_by_sign())
  with pytest.raises(ValueError, match='every call'):
    so.low_rank(optax.scale_by_adam(), rank=2, accumulate_steps=2,
                basis='online_pca')
