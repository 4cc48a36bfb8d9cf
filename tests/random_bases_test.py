"""Random bases (GoLore, Flora): gradient-free, seeded, keyless state."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import subspace_optax as so
from subspace_optax._src.bases import registry


def _params():
  return {'w': jnp.zeros((12, 8)), 'b': jnp.zeros((8,))}


@functools.lru_cache(maxsize=None)
def _golore(seed):  # one compilation per seed
  """GoLore refreshing every step, and its compiled update."""
  tx = so.golore(1e-2, rank=3, refresh=1, stagger=False, seed=seed)
  return tx, jax.jit(tx.update)


def _bases_after_two_refreshes(seed, gradient_seed):
  """The bases GoLore used at updates 0 and 1."""
  tx, update = _golore(seed)
  params = _params()
  state = tx.init(params)
  rng = np.random.RandomState(gradient_seed)
  bases = []
  for _ in range(2):
    grads = jax.tree.map(
        lambda p: jnp.asarray(rng.randn(*p.shape), jnp.float32), params)
    _, state = update(grads, state, params)
    bases.append(np.asarray(state[0].basis['w']))
  return bases, state


def test_golore_basis_is_gradient_free_seeded_and_keyless():
  first, state = _bases_after_two_refreshes(seed=0, gradient_seed=0)
  other_gradients, _ = _bases_after_two_refreshes(seed=0, gradient_seed=1)
  for basis in first:
    np.testing.assert_allclose(basis.T @ basis, np.eye(3), atol=1e-5)
  # Independent of the gradient, deterministic given (seed, count).
  np.testing.assert_array_equal(first[0], other_gradients[0])
  np.testing.assert_array_equal(first[1], other_gradients[1])
  assert np.abs(first[0] - first[1]).max() > 0.1  # redrawn with the count
  for leaf in jax.tree.leaves(state):
    assert not jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key)
    assert leaf.dtype in (jnp.float32, jnp.int32)


def test_random_orthonormal_is_uniform_on_average():
  method = so.bases.random_orthonormal()
  old = jnp.eye(4, 2)
  keys = jax.random.split(jax.random.key(0), 2000)
  q = jax.jit(jax.vmap(lambda k: method.refresh(None, old, k, False)))(keys)
  # Haar measure on the Stiefel manifold: E[QQᵀ] = (r/k) I.
  mean = np.asarray(jnp.mean(q @ jnp.swapaxes(q, 1, 2), axis=0))
  np.testing.assert_allclose(mean, 0.5 * np.eye(4), atol=0.04)


def test_gaussian_basis_has_variance_one_over_rank():
  method = so.bases.gaussian()
  old = jnp.eye(6, 3)
  keys = jax.random.split(jax.random.key(1), 2000)
  q = jax.jit(jax.vmap(lambda k: method.refresh(None, old, k, False)))(keys)
  np.testing.assert_allclose(np.mean(np.asarray(q) ** 2), 1 / 3, rtol=0.03)
  # Unbiased back-projection: E[QQᵀ] = I.
  mean = np.asarray(jnp.mean(q @ jnp.swapaxes(q, 1, 2), axis=0))
  np.testing.assert_allclose(mean, np.eye(6), atol=0.1)
  # Not orthonormalised: individual draws are not orthonormal.
  gram = np.asarray(q[0]).T @ np.asarray(q[0])
  assert np.abs(gram - np.eye(3)).max() > 0.05


@pytest.mark.parametrize('lowering', ['cpu', 'gpu'])
def test_normal_matrix_draws_column_j_from_fold_in_j(lowering, monkeypatch):
  # The CPU draws one column at a time (threefry's loop state is the draw),
  # other platforms all at once: the same matrix, N(0, 1) entries, columns
  # independent of the matrix's width.
  from subspace_optax._src.bases import base  # pylint: disable=import-outside-toplevel
  from subspace_optax._src.pipeline import per_matrix  # pylint: disable=import-outside-toplevel
  chosen = []
  original = per_matrix.on_platform

  def forced(*args, cpu, gpu):
    chosen.append(lowering)
    return original(*args, cpu=cpu if lowering == 'cpu' else gpu,
                    gpu=cpu if lowering == 'cpu' else gpu)

  monkeypatch.setattr(per_matrix, 'on_platform', forced)
  key = jax.random.key(3)
  y = np.asarray(jax.jit(lambda k: base.normal_matrix(k, (500, 40)))(key))
  assert chosen and y.shape == (500, 40) and y.dtype == np.float32
  for j in (0, 17, 39):
    np.testing.assert_array_equal(y[:, j], np.asarray(jax.random.normal(
        jax.random.fold_in(key, j), (500,), jnp.float32)))
  np.testing.assert_array_equal(
      y[:, :7], np.asarray(base.normal_matrix(key, (500, 7))))
  assert abs(y.mean()) < 0.02 and abs(y.std() - 1.0) < 0.02
  # Distinct columns are uncorrelated.
  correlation = np.corrcoef(y.T)
  assert np.abs(correlation - np.eye(40)).max() < 0.2


def test_golore_state_bytes_match_galore_bytes():
  params = {'w': jnp.zeros((20, 12)), 'v': jnp.zeros((6, 14)),
            'b': jnp.zeros((12,))}
  state = jax.eval_shape(so.golore(1e-3, rank=4).init, params)
  assert so.state_bytes(state) == so.state_sizes.galore_bytes(params, 4)


@pytest.mark.parametrize('name', ['random_orthonormal', 'gaussian'])
def test_bases_are_registered_by_name(name):
  assert registry.resolve(name).name == name
