"""Refresh policies, observed through the pipeline: on which updates each
leaf's basis actually changes (a random orthonormal basis changes at every
refresh, so a changed basis is a refresh)."""

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import subspace_optax as so

NAMES = ('a', 'b', 'c')


def _params():
  return {name: jnp.zeros((8, 6), jnp.float32) for name in NAMES}


def _gradients(step):
  keys = jax.random.split(jax.random.key(step), len(NAMES))
  return {name: jax.random.normal(key, (8, 6))
          for name, key in zip(NAMES, keys)}


def _refresh_steps(tx, steps, gradients=_gradients):
  """Per leaf, the updates on which its basis changed."""
  params = _params()
  state = tx.init(params)
  update = jax.jit(tx.update)
  changed = {name: [] for name in NAMES}
  for t in range(steps):
    before = state.basis
    _, state = update(gradients(t), state)
    for name in NAMES:
      if not np.array_equal(before[name], state.basis[name]):
        changed[name].append(t)
  return changed


def _low_rank(refresh, basis='random_orthonormal'):
  return so.low_rank(optax.identity(), rank=2, refresh=refresh, basis=basis,
                     align_signs=False)


def test_staggered_offsets_are_the_documented_ones():
  """Leaf j of n refreshes at 0, then T - jT//n, 2T - jT//n, ..."""
  period, steps = 6, 20
  changed = _refresh_steps(_low_rank(so.refresh.every(period)), steps)
  for j, name in enumerate(NAMES):
    offset = j * period // len(NAMES)
    want = [0] + list(range(period - offset, steps, period))
    assert changed[name] == want, (name, changed[name], want)


def test_an_int_period_is_the_staggered_policy():
  assert _refresh_steps(_low_rank(6), 14) == _refresh_steps(
      _low_rank(so.refresh.every(6, stagger=True)), 14)


def test_without_stagger_every_leaf_refreshes_together():
  changed = _refresh_steps(_low_rank(so.refresh.every(4, stagger=False)), 13)
  for name in NAMES:
    assert changed[name] == [0, 4, 8, 12]


def _constant_gradients(step):
  del step
  return _gradients(0)


def test_lazy_refresh_stretches_the_period_once_bases_agree():
  """Constant gradients, SVD: each new basis equals the old (similarity 1).

  Period 2, window 2, growth 2: refreshes at 0, 2, 4 (the window fills), then
  the period doubles at each refresh: 8, 16.
  """
  policy = so.refresh.lazy(2, threshold=0.9, window=2, growth=2.0,
                           stagger=False)
  tx = _low_rank(policy, basis='svd')
  state = tx.init(_params())
  update = jax.jit(tx.update)
  refreshed = []
  for t in range(20):
    _, state = update(_constant_gradients(t), state)
    if int(state.refresh['a'].refreshes) > len(refreshed):
      refreshed.append(t)
  assert refreshed == [0, 2, 4, 8, 16]
  np.testing.assert_allclose(state.refresh['a'].similarities, 1.0, atol=1e-5)
  assert int(state.refresh['a'].period) == 16


def test_lazy_refresh_keeps_its_period_while_bases_move():
  """Independent random gradients: similarity ~ r/k, below the threshold."""
  policy = so.refresh.lazy(2, threshold=0.9, window=2, growth=2.0,
                           stagger=False)
  changed = _refresh_steps(_low_rank(policy, basis='svd'), 13)
  for name in NAMES:
    assert changed[name] == [0, 2, 4, 6, 8, 10, 12]


def test_lazy_similarity_is_the_mean_squared_principal_cosine():
  """The recorded similarity is ‖Q_newᵀ Q_old‖_F² / r of the two bases."""
  policy = so.refresh.lazy(1, threshold=1.0, window=3, stagger=False)
  tx = _low_rank(policy, basis='svd')
  state = tx.init(_params())
  update = jax.jit(tx.update)
  _, state = update(_gradients(0), state)
  old = np.asarray(state.basis['a'])
  _, state = update(_gradients(1), state)
  new = np.asarray(state.basis['a'])
  want = np.sum((new.T @ old) ** 2) / 2
  np.testing.assert_allclose(state.refresh['a'].similarities[-1], want,
                             rtol=1e-5)
  assert 0.05 < want < 0.95


@pytest.mark.parametrize('threshold, stretched', [(0.3, True), (0.99, False)])
def test_q_galore_stops_refreshing_stable_layers(threshold, stretched):
  """The preset's lazy refresh: constant gradients stretch the period."""
  # The period argument is being renamed refresh -> refresh.
  period = ('refresh' if 'refresh' in inspect.signature(so.q_galore).parameters
            else 'refresh')
  tx = so.q_galore(1e-2, rank=2, window=2, threshold=threshold, stagger=False,
                   **{period: 2})
  params = _params()
  state = tx.init(params)
  update = jax.jit(tx.update)
  gradients = _gradients(0)
  for t in range(12):
    _, state = update(gradients if stretched else _gradients(t), state, params)
  subspace = [s for s in jax.tree.leaves(
      state, is_leaf=lambda x: isinstance(x, so.SubspaceState))
              if isinstance(s, so.SubspaceState)][0]
  refreshes = int(subspace.refresh['a'].refreshes)
  # Period 2 over 12 updates: 6 refreshes; stretched: 0, 2, 4, 8 only.
  assert refreshes == (4 if stretched else 6)
