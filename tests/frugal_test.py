"""Tests of FRUGAL and its pieces: index bases, the resettable Adam, the preset."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import subspace_optax as so
from subspace_optax._src.pipeline import layout as layout_lib

DIMS = so.last_two_axes


def _params():
  return {
      'w': jnp.ones((40, 16)),  # reference side: basis over the 16 columns
      'stack': jnp.ones((2, 10, 14)),  # stacked layers
      'b': jnp.ones((16,)),  # not projected: full Adam
  }


def _gradients(seed, params):
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return treedef.unflatten(
      [jax.random.normal(k, p.shape) for k, p in zip(keys, leaves)])


def _view(x, name, params, rank=0.25, side='reference'):
  lay = layout_lib.leaf_layouts(params, DIMS, side, rank)[name]
  return np.asarray(layout_lib.matrix_view(jnp.asarray(x), lay))


def test_update_is_full_rank_and_follows_algorithm_1():
  """U = -η (Q Adam(QᵀG) + s_r sign(G - QQᵀG)), not confined to span(Q)."""
  params = {'w': jnp.ones((40, 16)), 'b': jnp.ones((16,))}
  tx = so.frugal(0.1, rank=0.25, residual_scale=0.5, dimension_numbers=DIMS)
  state = tx.init(params)
  grads = _gradients(0, params)
  updates, state = jax.jit(tx.update)(grads, state, params)
  g = _view(grads['w'], 'w', params)  # (16, 40)
  q = np.asarray(state[0].basis['w'])  # (16, 4)
  u = _view(updates['w'], 'w', params)
  # The basis spans the top-4 left singular subspace of the oriented view.
  top = np.linalg.svd(g)[0][:, :4]
  np.testing.assert_allclose(q @ q.T, top @ top.T, atol=1e-5)
  c = q.T @ g
  adam_first = c / (np.abs(c) + 1e-8)  # Adam's first step: m̂/(sqrt(v̂)+ε)
  expected = -0.1 * (q @ adam_first + 0.5 * np.sign(g - q @ c))
  np.testing.assert_allclose(u, expected, rtol=1e-5, atol=1e-6)
  outside = u - q @ (q.T @ u)
  assert np.linalg.norm(outside) > 0.5 * np.linalg.norm(u)
  assert np.linalg.matrix_rank(u) > 4
  # The unprojected leaf gets plain Adam: -η sign(g) at the first step.
  np.testing.assert_allclose(
      updates['b'], -0.1 * np.sign(grads['b']), rtol=1e-5)


@pytest.mark.parametrize('basis,rank', [
    ('svd', 0.25), (so.bases.random_columns(), 0.25),
    (so.bases.blocks(0.5), 1.0)])
def test_subspace_plus_residual_is_the_gradient(basis, rank):
  """With identity inner and residual transforms, QQᵀG + (G - QQᵀG) = G."""
  params = _params()
  tx = so.low_rank(optax.identity(), rank=rank, refresh=1, basis=basis,
                   side='reference', residual=optax.identity(),
                   dimension_numbers=DIMS)
  state = tx.init(params)
  update = jax.jit(tx.update)
  for t in range(2):
    grads = _gradients(t, params)
    updates, state = update(grads, state)
    for name in params:
      np.testing.assert_allclose(updates[name], grads[name], atol=1e-5)


@pytest.mark.parametrize('basis', ['svd', 'random', 'columns', 'blocks'])
def test_state_bytes_equal_analytic_size(basis):
  params = _params()
  rank = 0.5 if basis == 'blocks' else 0.25
  state = so.frugal(1e-3, rank=rank, basis=basis,
                    dimension_numbers=DIMS).init(params)
  assert so.state_bytes(state) == so.state_sizes.frugal_bytes(
      params, rank, basis=basis, dimension_numbers=DIMS)
  inner = state[0].inner_state
  if basis == 'blocks':  # all-or-nothing: full-size moments (documented)
    assert inner.mu['w'].shape == (16, 40)
  else:  # only the low-rank part holds state
    assert inner.mu['w'].shape == (4, 40)
    assert inner.mu['stack'].shape == (2, 2, 14)
  assert so.state_bytes(state[0].residual_state) == 0  # signSGD is state-free


def test_columns_transition_is_partial_permutation():
  method = so.bases.random_columns()
  old = so.bases.SelectedColumns(jnp.array([1, 4, 7], jnp.int32), 9)
  new = so.bases.SelectedColumns(jnp.array([0, 4, 7], jnp.int32), 9)
  np.testing.assert_array_equal(
      method.transition(old, new), [[0, 0, 0], [0, 1, 0], [0, 0, 1]])
  g = jnp.arange(18.0).reshape(9, 2)
  back = method.unproject(method.project(g, new), new)
  np.testing.assert_array_equal(back[jnp.array([0, 4, 7])], g[jnp.array([0, 4, 7])])
  assert float(jnp.abs(back).sum()) == float(g[jnp.array([0, 4, 7])].sum())


@pytest.mark.parametrize('density', [0.0, 1.0])
def test_blocks_extremes_are_sign_sgd_and_adam(density):
  params = {'w': jnp.ones((6, 9))}
  # One refresh (at update 0): later ones would reset the moments (FRUGAL).
  tx = so.frugal(0.1, rank=density, basis='blocks', refresh=100)
  reference = (optax.chain(optax.scale_by_sign(), optax.scale(-0.1))
               if density == 0.0 else optax.adam(0.1))
  state, reference_state = tx.init(params), reference.init(params)
  update = jax.jit(tx.update)
  for t in range(3):
    grads = _gradients(t, params)
    ours, state = update(grads, state, params)
    theirs, reference_state = reference.update(grads, reference_state, params)
    np.testing.assert_allclose(ours['w'], theirs['w'], rtol=1e-5, atol=1e-7)


def test_resettable_adam_is_adam_and_restarts_on_zeroed_moments():
  params = {'a': jnp.ones((3, 2)), 'b': jnp.ones((4,))}
  ours, adam = so.transforms.scale_by_resettable_adam(), optax.scale_by_adam()
  state, adam_state = ours.init(params), adam.init(params)
  ours_update, adam_update = jax.jit(ours.update), jax.jit(adam.update)
  for t in range(3):
    grads = _gradients(t, params)
    u, state = ours_update(grads, state)
    v, adam_state = adam_update(grads, adam_state)
    for name in params:  # optax's float32 1 - β₂ᵗ is 1.3e-5 off at t = 1
      np.testing.assert_allclose(u[name], v[name], rtol=2e-5)
  # Zero one leaf's moments (what low_rank's on_refresh='reset' does): that
  # leaf restarts like a fresh Adam, the other one carries on.
  zeroed = state._replace(
      mu={**state.mu, 'a': jnp.zeros((3, 2))},
      nu={**state.nu, 'a': jnp.zeros((3, 2))})
  grads = _gradients(7, params)
  u, zeroed = ours_update(grads, zeroed)
  fresh, _ = adam_update(grads, adam.init(params))
  np.testing.assert_allclose(u['a'], fresh['a'], rtol=2e-5)
  assert int(zeroed.count['a']) == 1 and int(zeroed.count['b']) == 4


def test_columns_basis_is_indices_and_reset_restarts_bias_correction():
  """State: int32 indices only, no dense basis in the jaxpr; right after a
  reset the Adam part steps by η per coordinate, as at the first step."""
  params = {'w': jnp.ones((40, 16))}  # reference side: k = 16, rank 4
  tx = so.frugal(0.1, rank=0.25, basis='columns', refresh=2,
                 stagger=False)
  state = tx.init(params)
  assert [(x.shape, x.dtype) for x in jax.tree.leaves(state[0].basis)] == [
      ((4,), jnp.int32)]
  grads = _gradients(0, params)
  text = str(jax.make_jaxpr(tx.update)(grads, state, params))
  for shape in ('[16,4]', '[4,16]', '[40,4]', '[4,40,'):
    assert shape not in text, shape
  assert '[4,40]' in text  # the coefficients, for contrast
  update = jax.jit(tx.update)
  for t in range(3):  # refreshes at updates 0 and 2
    updates, state = update(_gradients(t, params), state, params)
  rows = np.asarray(state[0].basis['w'].indices)
  assert len(set(rows.tolist())) == 4 and rows.max() < 16
  u = _view(updates['w'], 'w', params)
  # Without the restart |u| would be 0.1 · 0.64 on the rows (step 3 of Adam).
  np.testing.assert_allclose(np.abs(u[rows]), 0.1, rtol=1e-4)
  others = np.setdiff1d(np.arange(16), rows)
  np.testing.assert_allclose(np.abs(u[others]), 0.1, rtol=1e-6)  # signSGD
