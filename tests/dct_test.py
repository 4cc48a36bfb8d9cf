"""DCT column-selection basis (SVD-free) and the DCT-AdamW preset."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import subspace_optax as so
from subspace_optax._src.bases import dct as dct_lib


def test_dct_matrix_is_orthonormal_and_matches_the_fast_transforms():
  d = dct_lib.dct_matrix(12)
  np.testing.assert_allclose(d.T @ d, np.eye(12), atol=1e-12)
  g = np.random.RandomState(0).randn(12, 5).astype(np.float32)
  indices = jnp.array([0, 3, 11], jnp.int32)
  columns, similarity = jax.jit(
      lambda i, g: (dct_lib.dct_columns(i, 12), dct_lib.dct_similarity(g)))(
          indices, g)
  np.testing.assert_allclose(columns, d[:, [0, 3, 11]], atol=1e-6)
  np.testing.assert_allclose(similarity, d.T @ g, atol=1e-5)


@pytest.mark.parametrize('l', [1, 5, 13, 16, 64])
@pytest.mark.parametrize('norm_order', [1, 2, 0.5])
def test_scores_are_the_row_norms_of_the_whole_transform(l, norm_order):
  # Summed over blocks of strided columns (l = 13: one block; 5: five of
  # one column; 16 and 64: eight): every column is counted once.
  g = np.random.RandomState(l).randn(12, l).astype(np.float32)
  scores = jax.jit(dct_lib.dct_scores, static_argnums=1)(g, norm_order)
  expected = np.sum(np.abs(dct_lib.dct_matrix(12).T @ g) ** norm_order, axis=1)
  np.testing.assert_allclose(scores, expected, rtol=1e-4)


def _planted_gradient(columns, k=16, l=6, seed=0, noise=0.01):
  rng = np.random.RandomState(seed)
  d = dct_lib.dct_matrix(k)
  return (d[:, columns] @ (3 + rng.rand(len(columns), l))
          + noise * rng.randn(k, l)).astype(np.float32)


def test_refresh_selects_the_planted_columns_and_state_is_indices():
  method = so.bases.dct()
  state = method.init(16, 6, 3)
  assert [leaf.dtype for leaf in jax.tree.leaves(state)] == [jnp.int32]
  g = _planted_gradient([9, 2, 13])

  @jax.jit
  def refresh_project_unproject(g, state):
    new = method.refresh(g, state, None, False)
    c = method.project(g, new)
    return new, c, method.unproject(c, new)

  new, c, back = refresh_project_unproject(g, state)
  np.testing.assert_array_equal(new.indices, [2, 9, 13])
  assert new.size == 16
  d = dct_lib.dct_matrix(16)[:, [2, 9, 13]]
  np.testing.assert_allclose(c, d.T @ g, atol=1e-5)
  np.testing.assert_allclose(back, d @ d.T @ g, atol=1e-5)


def test_transition_is_a_partial_permutation():
  method = so.bases.dct()
  old = so.bases.SelectedColumns(jnp.array([1, 5, 7], jnp.int32), 16)
  new = so.bases.SelectedColumns(jnp.array([0, 5, 7], jnp.int32), 16)
  expected = np.zeros((3, 3))
  expected[1, 1] = expected[2, 2] = 1
  np.testing.assert_array_equal(method.transition(old, new), expected)
  d = dct_lib.dct_matrix(16)  # equal to Q_newᵀ Q_old
  np.testing.assert_allclose(expected, d[:, [0, 5, 7]].T @ d[:, [1, 5, 7]],
                             atol=1e-12)


def test_transport_carries_moments_of_kept_columns_and_zeros_new_ones():
  tx = so.low_rank(optax.trace(decay=0.5), rank=2, refresh=1,
                   basis=so.bases.dct(), on_refresh='transport', side='compact')
  params = {'w': jnp.zeros((16, 6))}
  state = tx.init(params)
  update = jax.jit(tx.update)
  g0 = _planted_gradient([1, 5], noise=0.0)
  _, state = update({'w': g0}, state, params)
  np.testing.assert_array_equal(state.basis['w'].indices, [1, 5])
  first = np.asarray(state.inner_state.trace['w'])  # rows: columns 1, 5
  g1 = _planted_gradient([5, 7], seed=1, noise=0.0)
  _, state = update({'w': g1}, state, params)
  np.testing.assert_array_equal(state.basis['w'].indices, [5, 7])
  d = dct_lib.dct_matrix(16)
  coefficients = d[:, [5, 7]].T @ g1
  carried = np.stack([first[1], np.zeros(6)])  # column 5 kept, 7 is new
  np.testing.assert_allclose(
      state.inner_state.trace['w'], coefficients + 0.5 * carried, atol=1e-5)


def test_dct_adamw_state_bytes_match_the_analytic_size():
  params = {'w': jnp.zeros((20, 12)), 'v': jnp.zeros((6, 14)),
            'stack': jnp.zeros((2, 8, 10)), 'b': jnp.zeros((12,))}
  tx = so.dct_adamw(1e-3, rank=4, dimension_numbers=so.last_two_axes, side='compact')
  state = jax.eval_shape(tx.init, params)
  basis_leaves = jax.tree.leaves(state[0].basis)
  assert {leaf.dtype for leaf in basis_leaves} == {jnp.dtype(jnp.int32)}
  assert {leaf.shape for leaf in basis_leaves} == {(4,), (2, 4)}
  assert so.state_bytes(state) == so.state_sizes.dct_adamw_bytes(
      params, 4, dimension_numbers=so.last_two_axes, side='compact')


def test_dct_adamw_runs_on_stacked_layers():
  params = {'stack': jnp.zeros((2, 16, 6))}
  tx = so.dct_adamw(1e-2, rank=2, refresh=1,
                    dimension_numbers=so.last_two_axes, side='compact')
  state = tx.init(params)
  grads = {'stack': jnp.stack([_planted_gradient([3, 4]),
                               _planted_gradient([8, 15], seed=2)])}
  u, state = jax.jit(tx.update)(grads, state, params)
  np.testing.assert_array_equal(state[0].basis['stack'].indices,
                                [[3, 4], [8, 15]])
  assert np.all(np.isfinite(u['stack']))


@pytest.mark.parametrize('scale', [1.0, 1e20, 1e30])
def test_dct_adamw_stays_finite_for_huge_finite_gradients(scale):
  """Adam's second moment overflows to Inf above ~1e19 (g² in float32); the
  transport by a partial permutation must not turn 0 · Inf into NaN (it did,
  and optax.apply_if_finite, which checks the gradients, could not see it)."""
  params = {'w': jnp.zeros((16, 12))}
  tx = so.dct_adamw(1e-3, rank=4, refresh=2, side='compact')
  state = tx.init(params)
  update = jax.jit(tx.update)
  for step in range(6):  # three refreshes, each moving the selection
    grads = {'w': scale * jax.random.normal(jax.random.key(step), (16, 12))}
    out, state = update(grads, state, params)
    assert np.all(np.isfinite(out['w'])), step
  nu = np.asarray(optax.tree.get(state, 'nu')['w'])
  assert not np.any(np.isnan(nu))
  assert np.any(np.isinf(nu)) == (scale > 1e19)  # overflowed, but never NaN
