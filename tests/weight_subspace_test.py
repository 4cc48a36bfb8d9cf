"""so.weight_subspace and so.bases.weight_singular: updates restricted to a
fixed singular subspace of the pre-trained weights.

Every check compares with an explicit numpy SVD of the weight, so taking the
wrong end of the spectrum, the wrong side of the matrix or a refreshed basis
fails.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import subspace_optax as so

RANK = 2


def _weights(shape, seed=0):
  # A spread spectrum, so the top and bottom subspaces are well separated.
  rng = np.random.default_rng(seed)
  w = rng.normal(size=shape).astype(np.float32)
  u, _, vt = np.linalg.svd(w, full_matrices=False)
  s = np.geomspace(10.0, 0.1, min(shape[-2:])).astype(np.float32)
  return jnp.asarray((u * s) @ vt)


def _reference_basis(w, end, rank, left=True):
  u, _, vt = np.linalg.svd(np.asarray(w, np.float64), full_matrices=False)
  vectors = u if left else vt.swapaxes(-1, -2)
  size = vectors.shape[-1]
  return vectors[..., :rank] if end == 'top' else vectors[..., size - rank:]


def _grads(shape, seed):
  return jnp.asarray(np.random.default_rng(100 + seed).normal(
      size=shape).astype(np.float32))


@pytest.mark.parametrize('end', ['top', 'bottom'])
@pytest.mark.parametrize('side', ['left', 'right'])
def test_basis_is_the_weights_singular_vectors_up_to_sign(end, side):
  """Q equals the weight's left (side='left') or right singular vectors at
  ``end``, column by column up to sign."""
  w = _weights((12, 8))
  tx = so.weight_subspace(optax.scale_by_adam(), rank=RANK, end=end, side=side)
  q = np.asarray(tx.init({'w': w}).basis['w'])
  expected = _reference_basis(w, end, RANK, left=side == 'left')
  assert q.shape == expected.shape
  np.testing.assert_allclose(np.abs(q.T @ expected), np.eye(RANK), atol=1e-5)


@pytest.mark.parametrize('end', ['top', 'bottom'])
def test_update_lies_in_the_weight_subspace(end):
  """U = QQᵀU with Q from an explicit SVD of W (so the wrong end fails), the
  update is nonzero, and the part of the gradient outside is dropped."""
  w = _weights((12, 8))
  q = _reference_basis(w, end, RANK)
  other = _reference_basis(w, 'bottom' if end == 'top' else 'top', RANK)
  tx = so.weight_subspace(optax.scale_by_adam(), rank=RANK, end=end,
                          side='left')
  state = tx.init({'w': w})
  stored = np.asarray(state.basis['w'], np.float64)
  for step in range(3):
    updates, state = tx.update({'w': _grads(w.shape, step)}, state)
    u = np.asarray(updates['w'], np.float64)
    assert np.linalg.norm(u) > 0.1
    np.testing.assert_allclose(stored @ (stored.T @ u), u, atol=1e-6)
    # The same subspace as numpy's SVD (float32 SVD: 1e-5), not the other end.
    np.testing.assert_allclose(q @ (q.T @ u), u, atol=1e-5)
    assert np.linalg.norm(other.T @ u) < 1e-5 * np.linalg.norm(u)
  # With an identity inner optimizer the update is exactly QQᵀG.
  identity = so.weight_subspace(optax.identity(), rank=RANK, end=end,
                                side='left')
  g = _grads(w.shape, 7)
  u, _ = identity.update({'w': g}, identity.init({'w': w}))
  np.testing.assert_allclose(np.asarray(u['w']), q @ (q.T @ np.asarray(g)),
                             atol=1e-5)


def test_stacked_leaf_gets_one_basis_per_matrix():
  """A (L, m, n) stack with last_two_axes: each layer's basis is that
  layer's SVD (not the first layer's broadcast)."""
  w = jnp.stack([_weights((6, 10), seed) for seed in range(3)])
  tx = so.weight_subspace(optax.scale_by_adam(), rank=RANK, end='top',
                          dimension_numbers=so.last_two_axes)
  q = np.asarray(tx.init({'w': w}).basis['w'])
  assert q.shape == (3, 6, RANK)
  expected = _reference_basis(w, 'top', RANK)
  for layer in range(3):
    np.testing.assert_allclose(np.abs(q[layer].T @ expected[layer]),
                               np.eye(RANK), atol=1e-5)


def test_basis_never_changes_over_steps():
  """Refreshes (every step here) keep the weight basis: it is never
  recomputed from the gradients, even under jit."""
  w = _weights((8, 12))
  tx = so.low_rank(optax.scale_by_adam(), rank=RANK, refresh=1,
                   basis=so.bases.weight_singular('bottom'))
  state = tx.init({'w': w})
  first = np.asarray(state.basis['w'])
  step = jax.jit(tx.update)
  for i in range(4):
    _, state = step({'w': _grads(w.shape, i)}, state)
  np.testing.assert_array_equal(np.asarray(state.basis['w']), first)


def test_other_leaves_get_the_inner_optimizer_at_full_size():
  w, b = _weights((8, 6)), jnp.ones(6)
  tx = so.weight_subspace(optax.identity(), rank=RANK)
  updates, _ = tx.update({'w': _grads((8, 6), 0), 'b': b},
                         tx.init({'w': w, 'b': b}))
  np.testing.assert_array_equal(np.asarray(updates['b']), np.ones(6))


def test_basis_dtype_is_respected():
  tx = so.weight_subspace(optax.scale_by_adam(), rank=RANK,
                          basis_dtype=jnp.bfloat16)
  assert tx.init({'w': _weights((8, 6))}).basis['w'].dtype == jnp.bfloat16


def test_rank_above_min_dimension_raises():
  tx = so.weight_subspace(optax.scale_by_adam(), rank=7)
  with pytest.raises(ValueError, match=r"\['w'\].*above min\(m, n\)=6"):
    tx.init({'w': _weights((8, 6))})


def test_non_finite_weight_raises():
  w = _weights((8, 6)).at[2, 3].set(jnp.nan)
  with pytest.raises(ValueError, match=r"\['w'\].*non-finite"):
    so.weight_subspace(optax.scale_by_adam(), rank=RANK).init({'w': w})
  basis = so.bases.weight_singular()
  with pytest.raises(ValueError, match='non-finite'):
    so.low_rank(optax.scale_by_adam(), rank=RANK, basis=basis).init({'w': w})


def test_bad_end_and_abstract_params_raise():
  with pytest.raises(ValueError, match='`end`'):
    so.bases.weight_singular('middle')
  with pytest.raises(ValueError, match='`end`'):
    so.weight_subspace(optax.scale_by_adam(), rank=RANK, end='minor')
  tx = so.weight_subspace(optax.scale_by_adam(), rank=RANK)
  with pytest.raises(TypeError, match='ShapeDtypeStruct'):
    tx.init({'w': jax.ShapeDtypeStruct((8, 6), jnp.float32)})
  # A trace of the params is fine (eval_shape, jit).
  shapes = jax.eval_shape(tx.init, {'w': jax.ShapeDtypeStruct((8, 6),
                                                              jnp.float32)})
  assert shapes.basis['w'].shape == (6, RANK)


@pytest.mark.slow
def test_sharded_weight_on_explicit_mesh():
  """On an 8-device Explicit mesh the weight is gathered for its SVD once;
  the basis is sharded by low_rank's rule (k axis like the weight's rows) and
  a jitted step gives the unsharded update, sharded like the weight."""
  # pylint: disable-next=import-outside-toplevel
  from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
  mesh = jax.make_mesh((8,), ('fsdp',), axis_types=(AxisType.Explicit,))
  w, g = _weights((16, 8)), _grads((16, 8), 0)
  tx = so.weight_subspace(optax.scale_by_adam(), rank=RANK, side='left')
  reference, _ = tx.update({'w': g}, tx.init({'w': w}))
  with jax.set_mesh(mesh):
    where = NamedSharding(mesh, P('fsdp', None))
    params = {'w': jax.device_put(w, where)}
    state = tx.init(params)
    updates, after = jax.jit(tx.update)({'w': jax.device_put(g, where)}, state)
  assert state.basis['w'].sharding.spec == P('fsdp', None)
  assert jax.typeof(after.basis['w']) == jax.typeof(state.basis['w'])
  assert updates['w'].sharding.is_equivalent_to(where, 2)
  np.testing.assert_allclose(np.asarray(updates['w']),
                             np.asarray(reference['w']), atol=1e-6)
