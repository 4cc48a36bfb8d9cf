"""Tests of the continual-learning baselines (L2, EWC, Fisher) and re-warming."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from subspace_optax import continual as cl


def _params():
  return {'w': jnp.arange(6.0).reshape(2, 3), 'b': jnp.array([1.0, -2.0])}


def test_l2_to_anchor_adds_the_penalty_gradient():
  anchor = _params()
  params = jax.tree.map(lambda p: p + 0.5 * jnp.sign(p + 0.1), anchor)
  tx = cl.l2_to_anchor(strength=0.3)
  state = tx.init(anchor)  # the anchor defaults to the init params
  grads = jax.tree.map(jnp.ones_like, params)
  updates, _ = tx.update(grads, state, params)
  penalty = lambda p: 0.15 * sum(jnp.sum((x - a) ** 2) for x, a in zip(
      jax.tree.leaves(p), jax.tree.leaves(anchor)))
  want = jax.tree.map(jnp.add, grads, jax.grad(penalty)(params))
  jax.tree.map(lambda u, w: np.testing.assert_allclose(u, w, rtol=1e-6),
               updates, want)
  with pytest.raises(ValueError, match='params'):
    tx.update(grads, state)


def test_ewc_matches_the_penalty_gradient_and_moves_with_tree_set():
  params = _params()
  fisher = jax.tree.map(lambda p: jnp.abs(p) + 0.1, params)
  tx = optax.chain(cl.ewc(strength=2.0), optax.sgd(1.0))
  state = tx.init(params)
  grads = jax.tree.map(jnp.zeros_like, params)
  # Zero Fisher until consolidated: no penalty.
  moved = jax.tree.map(lambda p: p + 1.0, params)
  updates, _ = tx.update(grads, state, moved)
  assert max(float(jnp.abs(u).max()) for u in jax.tree.leaves(updates)) == 0.0
  state = optax.tree.set(state, anchor=params, fisher=fisher)
  updates, _ = tx.update(grads, state, moved)
  penalty = lambda p: 1.0 * sum(jnp.sum(f * (x - a) ** 2) for x, a, f in zip(
      jax.tree.leaves(p), jax.tree.leaves(params), jax.tree.leaves(fisher)))
  want = jax.tree.map(lambda g: -g, jax.grad(penalty)(moved))  # sgd: -lr * g
  jax.tree.map(lambda u, w: np.testing.assert_allclose(u, w, rtol=1e-6),
               updates, want)


def test_fisher_diagonal_is_the_mean_squared_per_example_gradient():
  key = jax.random.key(0)
  params = {'w': jax.random.normal(key, (3,)), 'c': jnp.array(0.5)}
  x = jax.random.normal(jax.random.key(1), (7, 3))
  y = jax.random.normal(jax.random.key(2), (7,))

  def loss(p, example):
    xi, yi = example
    return 0.5 * (xi @ p['w'] + p['c'] - yi) ** 2

  fisher = cl.fisher_diagonal(loss, params, (x, y), batch_size=3)
  residual = x @ params['w'] + params['c'] - y
  np.testing.assert_allclose(fisher['w'], np.mean((residual[:, None] * x) ** 2, 0),
                             rtol=1e-5)
  np.testing.assert_allclose(fisher['c'], np.mean(residual ** 2), rtol=1e-5)


def test_rewarm_schedule_restarts_every_task():
  schedule = cl.rewarm_schedule(1.0, steps_per_task=10, warmup_steps=2,
                                init_value=0.0, end_value=0.1)
  values = np.array([float(schedule(t)) for t in range(21)])
  np.testing.assert_allclose(values[[0, 1, 2]], [0.0, 0.5, 1.0], atol=1e-6)
  np.testing.assert_allclose(values[6], 0.1 + 0.45 * (1 + np.cos(np.pi * 0.5)),
                             atol=1e-6)
  np.testing.assert_allclose(values[10:20], values[0:10], atol=1e-6)
  assert np.all(np.diff(values[2:10]) < 0)
  lengths = cl.rewarm_schedule(1.0, steps_per_task=[4, 8], warmup_steps=2)
  np.testing.assert_allclose([float(lengths(t)) for t in (0, 1, 4, 5, 6, 12)],
                             [0.0, 0.5, 0.0, 0.5, 1.0, 0.0], atol=1e-6)
  with pytest.raises(ValueError, match='warmup'):
    cl.rewarm_schedule(1.0, steps_per_task=[4, 2], warmup_steps=2)


def test_consolidate_ewc_accumulates_the_fisher_and_moves_the_anchor():
  params = _params()
  first = jax.tree.map(lambda p: jnp.abs(p) + 0.1, params)
  second = jax.tree.map(lambda p: 2 * jnp.abs(p) + 0.3, params)
  tx = optax.chain(cl.ewc(strength=1.0), optax.sgd(1.0))
  state = cl.consolidate_ewc(tx.init(params), params, first)
  moved = jax.tree.map(lambda p: p + 1.0, params)
  state = cl.consolidate_ewc(state, moved, second, decay=0.5)
  for got, want in zip(jax.tree.leaves(optax.tree.get(state, 'fisher')),
                       jax.tree.leaves(jax.tree.map(
                           lambda a, b: 0.5 * a + b, first, second))):
    np.testing.assert_allclose(got, want, rtol=1e-6)
  for got, want in zip(jax.tree.leaves(optax.tree.get(state, 'anchor')),
                       jax.tree.leaves(moved)):
    np.testing.assert_array_equal(got, want)
