"""Basis methods through their ``BasisMethod`` functions: the dense operations,
sign alignment, and the gradient-free bases (random orthonormal, Gaussian,
random columns, blocks), whose promises are statistical."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import spectra
from subspace_optax import bases
from subspace_optax._src.bases import registry

K, L, RANK = 12, 7, 3
DRAWS = 2000


def _gradient(seed=0, shape=(K, L)):
  return spectra.normal(shape, seed)


@functools.lru_cache(maxsize=None)
def _draws(method, k=K, rank=RANK, count=DRAWS, align=False):
  """``count`` refreshes of ``method`` from keys 0..count-1 (one gradient)."""
  init = method.init(k, L, rank)
  g = _gradient(0, (k, L))
  keys = jax.random.split(jax.random.key(0), count)
  refresh = jax.vmap(lambda key: method.refresh(g, init, key, align))
  return jax.jit(refresh)(keys)


RANDOM_ORTHONORMAL = registry.resolve('random_orthonormal')
GAUSSIAN = registry.resolve('gaussian')
RANDOM_COLUMNS = registry.resolve('random_columns')


# --------------------------------------------------------- dense operations


def test_dense_project_unproject_and_transition_are_the_formulas():
  method = bases.svd()
  q_old = jnp.asarray(spectra.orthonormal(K, RANK, 0), jnp.float32)
  q_new = jnp.asarray(spectra.orthonormal(K, RANK, 1), jnp.float32)
  g = _gradient()
  c = method.project(g, q_old)
  np.testing.assert_allclose(c, np.asarray(q_old).T @ np.asarray(g), atol=1e-5)
  np.testing.assert_allclose(method.unproject(c, q_old),
                             np.asarray(q_old) @ np.asarray(c), atol=1e-5)
  np.testing.assert_allclose(method.transition(q_old, q_new),
                             np.asarray(q_new).T @ np.asarray(q_old), atol=1e-6)


def test_align_signs_makes_every_column_agree_with_the_old_one():
  old = spectra.orthonormal(K, RANK, 0)
  flips = np.array([-1.0, 1.0, -1.0])
  new = old * flips + 0.05 * spectra.orthonormal(K, RANK, 1)
  aligned = np.asarray(bases.align_signs(jnp.asarray(new), jnp.asarray(old)))
  np.testing.assert_allclose(aligned, new * flips, atol=1e-7)
  assert np.all(np.sum(aligned * old, axis=0) > 0)


@pytest.mark.parametrize('method', [bases.svd(), bases.randomized()],
                         ids=['svd', 'randomized'])
def test_refresh_aligns_signs_only_when_asked(method):
  """``refresh(g, old=-Q, ...)``: aligned, the columns agree with ``old``; not
  aligned, the refresh ignores ``old`` and flips back."""
  g = _gradient()
  refresh = jax.jit(method.refresh, static_argnums=3)
  key = jax.random.key(0)
  q = refresh(g, method.init(K, L, RANK), key, False)
  for old in (q, -q, q * jnp.asarray([1.0, -1.0, 1.0])):
    aligned = refresh(g, old, key, True)
    free = refresh(g, old, key, False)
    assert np.all(np.sum(np.asarray(aligned) * np.asarray(old), axis=0) > 0.9)
    np.testing.assert_allclose(np.abs(free), np.abs(aligned), atol=1e-4)
  dots = np.sum(np.asarray(refresh(g, -q, key, False)) * np.asarray(q), axis=0)
  assert np.all(dots > 0.9), 'align=False should not look at the old basis'


# ------------------------------------------------------- random orthonormal


def test_random_orthonormal_is_orthonormal_and_ignores_the_gradient():
  init = RANDOM_ORTHONORMAL.init(K, L, RANK)
  refresh = jax.jit(RANDOM_ORTHONORMAL.refresh, static_argnums=3)
  key = jax.random.key(3)
  q = refresh(_gradient(0), init, key, False)
  assert spectra.orthonormality_error(q) < 1e-5
  np.testing.assert_array_equal(q, refresh(_gradient(1), init, key, False))
  np.testing.assert_array_equal(q, refresh(_gradient(0), init, key, False))
  other = refresh(_gradient(0), init, jax.random.key(4), False)
  assert spectra.distance(q, other) > 0.3


def _isotropy_z(projectors, expected):
  """Largest deviation of ``mean(QQᵀ)`` from ``expected``, in standard
  errors."""
  mean = projectors.mean(axis=0)
  error = projectors.std(axis=0) / np.sqrt(len(projectors))
  return np.max(np.abs(mean - expected) / np.maximum(error, 1e-3))


def test_random_orthonormal_is_isotropic():
  """``E[QQᵀ] = (r/k) I`` for a Haar basis, entry by entry."""
  q = np.asarray(_draws(RANDOM_ORTHONORMAL), np.float64)
  projectors = np.einsum('bkr,blr->bkl', q, q)
  assert _isotropy_z(projectors, RANK / K * np.eye(K)) < 5
  assert np.max(np.abs(q.transpose(0, 2, 1) @ q - np.eye(RANK))) < 1e-5
  # Draws differ per key.
  assert spectra.distance(q[0], q[1]) > 0.3


def test_gaussian_has_the_documented_scaling_and_is_unbiased():
  """Entries ``N(0, 1/r)``, so ``E[QQᵀ] = I_k``; the gradient is not read."""
  q = np.asarray(_draws(GAUSSIAN), np.float64)
  np.testing.assert_allclose(q.std(), 1 / np.sqrt(RANK), rtol=0.03)
  assert abs(q.mean()) < 5 / np.sqrt(q.size) / np.sqrt(RANK)
  projectors = np.einsum('bkr,blr->bkl', q, q)
  assert _isotropy_z(projectors, np.eye(K)) < 5
  init = GAUSSIAN.init(K, L, RANK)
  key = jax.random.key(3)
  np.testing.assert_array_equal(
      GAUSSIAN.refresh(_gradient(0), init, key, False),
      GAUSSIAN.refresh(_gradient(1), init, key, False))


# ------------------------------------------------------------- index bases


def test_random_columns_select_exactly_those_coordinates():
  g = _gradient()
  state = RANDOM_COLUMNS.refresh(
      g, RANDOM_COLUMNS.init(K, L, RANK), jax.random.key(5), False)
  idx = np.asarray(state.indices)
  assert len(set(idx.tolist())) == RANK and np.all(np.diff(idx) > 0)
  c = RANDOM_COLUMNS.project(g, state)
  np.testing.assert_array_equal(c, np.asarray(g)[idx])
  back = np.asarray(RANDOM_COLUMNS.unproject(c, state))
  want = np.zeros((K, L), np.float32)
  want[idx] = np.asarray(g)[idx]
  np.testing.assert_array_equal(back, want)
  # The transition is Q_newᵀ Q_old with Q = I[:, S].
  other = RANDOM_COLUMNS.refresh(g, state, jax.random.key(6), False)
  eye = np.eye(K)
  np.testing.assert_array_equal(
      RANDOM_COLUMNS.transition(state, other),
      eye[:, np.asarray(other.indices)].T @ eye[:, idx])


def test_random_columns_are_uniform_over_coordinates():
  indices = np.asarray(_draws(RANDOM_COLUMNS).indices)
  # Every draw is a subset: ascending, no repeats.
  assert np.all(np.diff(indices, axis=1) > 0)
  counts = np.bincount(indices.reshape(-1), minlength=K)
  expected = DRAWS * RANK / K
  chi2 = np.sum((counts - expected) ** 2 / expected)
  assert chi2 < 40, counts  # 11 degrees of freedom: P(χ² > 40) ≈ 3e-5


@pytest.mark.parametrize('density', [0.0, 0.3, 1.0])
def test_blocks_activate_whole_matrices_with_the_given_density(density):
  method = bases.blocks(density)
  active = np.asarray(_draws(method, k=K, rank=K).active)
  assert set(np.unique(active).tolist()) <= {0.0, 1.0}
  assert abs(active.mean() - density) < 4 * np.sqrt(
      density * (1 - density) / DRAWS) + 1e-9
  g = _gradient()
  for on in (0.0, 1.0):
    state = bases.BlockState(jnp.float32(on))
    for apply in (method.project, method.unproject):
      np.testing.assert_array_equal(apply(g, state), on * np.asarray(g))
