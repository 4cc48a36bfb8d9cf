"""Gradient-driven bases on gradients with a known spectrum.

``G = U diag(σ) Vᵀ`` with a wide gap after ``r`` (σ = 10, 9, 8 then ≤ 1e-2), so
the top-``r`` left singular subspace is well defined and each method's promise
can be checked against it: exact and randomized SVD, online PCA after enough
steps, I3S sampling (∝ σ) and DCT column selection (largest alignment).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.fft

import spectra
from subspace_optax import bases

K, L, RANK = 24, 16, 3


def _gradient(seed=0):
  g, u, sigma = spectra.known_spectrum(
      K, L, spectra.gapped_sigma(RANK, L), seed)
  return jnp.asarray(g, jnp.float32), u, sigma


SVD = bases.svd()
RANDOMIZED = bases.randomized()
IMPORTANCE = bases.importance_sampled()


@functools.lru_cache(maxsize=None)
def _jitted_refresh(method):
  return jax.jit(method.refresh, static_argnums=3)


def _refresh(method, g, seed=0, align=False):
  k, l = g.shape
  return _jitted_refresh(method)(
      g, method.init(k, l, RANK), jax.random.key(seed), align)


@pytest.mark.parametrize('method', [SVD, RANDOMIZED],
                         ids=['svd', 'randomized'])
@pytest.mark.parametrize('seed', [0, 1])
def test_basis_spans_the_top_singular_subspace(method, seed):
  g, u, _ = _gradient(seed)
  q = _refresh(method, g, seed)
  assert q.shape == (K, RANK) and q.dtype == jnp.float32
  assert spectra.orthonormality_error(q) < 1e-5
  assert spectra.distance(q, u[:, :RANK]) < 1e-4
  # ... and it is not the bottom (or any other) part of the spectrum.
  assert spectra.distance(q, u[:, RANK:2 * RANK]) > 0.99


def test_a_plain_sketch_spans_the_top_subspace_for_a_typical_draw():
  # One sketch of exactly r columns, no power iteration: the error is
  # σ_{r+1}/σ_r times a heavy-tailed factor (the inverse of the smallest
  # singular value of an r x r Gaussian; Halko et al. 2011, §10), so a
  # typical draw is close (here ~5e-3 against 1.25e-3 for σ_{r+1}/σ_r), not
  # every draw.
  method = bases.randomized(oversample=0, power_iterations=0)
  g, u, _ = _gradient(0)
  distances = []
  for key in range(16):
    q = _refresh(method, g, key)
    assert spectra.orthonormality_error(q) < 1e-5
    assert spectra.distance(q, u[:, RANK:2 * RANK]) > 0.99
    distances.append(spectra.distance(q, u[:, :RANK]))
  assert np.median(distances) < 3e-2


@pytest.mark.parametrize('method', [SVD, RANDOMIZED], ids=['svd', 'randomized'])
def test_projection_keeps_the_top_singular_values(method):
  """``QᵀG`` carries σ_1..σ_r: ``‖QᵀG‖_F² = Σ_{i≤r} σ_i²``."""
  g, _, sigma = _gradient()
  q = _refresh(method, g)
  c = method.project(g, q)
  assert c.shape == (RANK, L)
  np.testing.assert_allclose(
      np.sum(np.asarray(c, np.float64) ** 2), np.sum(sigma[:RANK] ** 2),
      rtol=1e-5)
  np.testing.assert_allclose(
      np.linalg.svd(np.asarray(c), compute_uv=False), sigma[:RANK], rtol=1e-5)


@pytest.mark.parametrize('scale', [1e-20, 1e20])
def test_randomized_is_scale_invariant(scale):
  g, u, _ = _gradient()
  q = _refresh(RANDOMIZED, g * scale)
  assert spectra.distance(q, u[:, :RANK]) < 1e-3


def test_online_pca_converges_to_the_top_subspace():
  """From a random start, online PCA steps on a fixed ``G`` find span(U_r)."""
  g, u, _ = _gradient()
  method = bases.online_pca(learning_rate=0.05, initial='random')
  state = method.first_refresh(
      g, method.init(K, L, RANK), jax.random.key(0), False)
  assert spectra.distance(state.basis, u[:, :RANK]) > 0.5  # random start
  steps = jax.jit(lambda s: jax.lax.fori_loop(
      0, 300, lambda _, s: method.refresh(g, s, jax.random.key(0), False), s))
  state = steps(state)
  assert spectra.distance(state.basis, u[:, :RANK]) < 1e-3
  assert spectra.orthonormality_error(state.basis) < 1e-3
  np.testing.assert_allclose(method.project(g, state),
                             np.asarray(state.basis).T @ np.asarray(g),
                             atol=1e-4)


@pytest.mark.parametrize('initial', ['svd', 'range_finder'])
def test_online_pca_initial_basis_from_the_gradient(initial):
  g, u, _ = _gradient()
  method = bases.online_pca(initial=initial)
  state = method.first_refresh(
      g, method.init(K, L, RANK), jax.random.key(0), False)
  assert spectra.distance(state.basis, u[:, :RANK]) < 1e-3


@pytest.mark.parametrize('weight', [0.0, 0.1])
def test_online_pca_gradient_is_the_gradient_of_its_loss(weight):
  """Closed form vs autodiff of ``‖PPᵀG̃ - G̃‖² + λ‖PᵀP - I‖²``, G̃ = G/‖G‖."""
  g, _, _ = _gradient()
  p = jnp.asarray(spectra.orthonormal(K, RANK, 5) + 0.1 * np.random.default_rng(
      0).normal(size=(K, RANK)), jnp.float32)

  def loss(p):
    gn = g / jnp.linalg.norm(g)
    fit = p @ (p.T @ gn) - gn
    return jnp.sum(fit ** 2) + weight * jnp.sum(
        (p.T @ p - jnp.eye(RANK)) ** 2)

  np.testing.assert_allclose(
      bases.online_pca_gradient(p, g, weight), jax.grad(loss)(p),
      rtol=1e-4, atol=1e-5)


def test_importance_sampled_in_its_deterministic_limit_is_the_top_subspace():
  """σ = 10, 9, 8 then ≤ 1e-2: the r draws are the top r almost surely."""
  g, u, _ = _gradient()
  for seed in range(3):
    q = _refresh(IMPORTANCE, g, seed)
    assert spectra.orthonormality_error(q) < 1e-5
    assert spectra.distance(q, u[:, :RANK]) < 1e-3


def _chosen_directions(method, g, u, rank, keys):
  """For each key, which singular directions (columns of ``u``) were drawn."""
  k, l = g.shape
  init = method.init(k, l, rank)
  draw = jax.jit(jax.vmap(lambda key: method.refresh(g, init, key, False)))
  q = np.asarray(draw(keys), np.float64)
  overlap = np.abs(np.einsum('kn,bkr->bnr', u, q))  # (draws, directions, rank)
  assert np.all(np.sort(overlap, axis=1)[:, -1] > 1 - 1e-4), (
      'a drawn column is not a singular vector')
  return np.argmax(overlap, axis=1)  # (draws, rank)


def test_importance_sampled_draws_directions_in_proportion_to_sigma():
  """rank 1: P(direction i) = σ_i / Σσ. A χ² test over 3000 keys."""
  sigma = np.array([4.0, 3.0, 2.0, 1.0])
  g, u, _ = spectra.known_spectrum(6, 4, sigma, seed=3)
  chosen = _chosen_directions(
      IMPORTANCE, jnp.asarray(g, jnp.float32), u, 1,
      jax.random.split(jax.random.key(0), 3000))[:, 0]
  counts = np.bincount(chosen, minlength=4)
  expected = len(chosen) * sigma / sigma.sum()
  chi2 = np.sum((counts - expected) ** 2 / expected)
  # 3 degrees of freedom: P(χ² > 20) ≈ 2e-4. Sampling ∝ σ² gives χ² ≈ 200,
  # uniform ≈ 250, ∝ 1/σ ≈ 1000.
  assert chi2 < 20, (counts, expected)


def test_importance_sampled_draws_without_replacement():
  sigma = np.array([4.0, 3.0, 2.0, 1.0])
  g, u, _ = spectra.known_spectrum(6, 4, sigma, seed=3)
  chosen = _chosen_directions(
      IMPORTANCE, jnp.asarray(g, jnp.float32), u, 2,
      jax.random.split(jax.random.key(1), 500))
  assert np.all(chosen[:, 0] != chosen[:, 1])
  # Successive sampling: {0, 1} (the two largest σ) is the likeliest pair, but
  # other pairs occur too.
  pairs = {tuple(sorted(p)) for p in chosen}
  assert (0, 1) in pairs and len(pairs) > 3


def test_importance_sampling_is_deterministic_per_key():
  g, _, _ = _gradient()
  np.testing.assert_array_equal(_refresh(IMPORTANCE, g, 7),
                                _refresh(IMPORTANCE, g, 7))


# -------------------------------------------------------------------- DCT


def _numpy_dct(size):
  """Orthonormal DCT-II basis vectors as columns, from scipy (independent)."""
  return scipy.fft.idct(np.eye(size), type=2, norm='ortho', axis=0)


@pytest.mark.parametrize('size', [1, 5, 16])
def test_dct_matrix_is_the_orthonormal_dct_ii(size):
  d = bases.dct_matrix(size)
  np.testing.assert_allclose(d, _numpy_dct(size), atol=1e-12)
  np.testing.assert_allclose(d.T @ d, np.eye(size), atol=1e-12)
  indices = jnp.asarray([size - 1, 0][: min(2, size)], jnp.int32)
  columns = jax.jit(bases.dct_columns, static_argnums=1)(indices, size)
  np.testing.assert_allclose(columns,
                             _numpy_dct(size)[:, np.asarray(indices)],
                             atol=1e-6)


@pytest.mark.parametrize('norm_order', [1.0, 2.0])
def _aligned_with(columns, seed=0):
  """A gradient whose energy lies in the given DCT columns (row norms ~20)
  plus a weak rest."""
  rng = np.random.default_rng(seed)
  d = _numpy_dct(K)
  g = d[:, columns] @ rng.normal(size=(len(columns), L)) * 5
  return jnp.asarray(g + 0.01 * rng.normal(size=(K, L)), jnp.float32)


@pytest.mark.parametrize('norm_order', [1.0, 2.0])
def test_dct_selects_the_columns_of_largest_alignment(norm_order):
  """Chosen columns = the r columns with the largest ``‖(DᵀG)_{j,:}‖_p``."""
  method = bases.dct(norm_order)
  np.testing.assert_array_equal(
      _refresh(method, _aligned_with([19, 2, 11])).indices, [2, 11, 19])
  # Against a numpy ranking of a generic gradient too.
  g = spectra.normal((K, L), 3)
  scores = np.sum(
      np.abs(_numpy_dct(K).T @ np.asarray(g, np.float64))**norm_order, axis=1)
  np.testing.assert_array_equal(_refresh(method, g).indices,
                                np.sort(np.argsort(-scores)[:RANK]))


def test_dct_projects_and_unprojects_with_the_chosen_columns():
  g = spectra.normal((K, L), 1)
  method = bases.dct()
  state = _refresh(method, g)
  q = _numpy_dct(K)[:, np.asarray(state.indices)]
  c = method.project(g, state)
  np.testing.assert_allclose(c, q.T @ np.asarray(g), atol=1e-5)
  np.testing.assert_allclose(method.unproject(c, state),
                             q @ q.T @ np.asarray(g), atol=1e-5)


def test_dct_transition_is_the_partial_permutation():
  """``R = Q_newᵀ Q_old``: column 11 moves from slot 1 to slot 0, 19 from 2
  to 1, column 2 leaves and 20 enters."""
  method = bases.dct()
  old = _refresh(method, _aligned_with([2, 11, 19]))
  new = _refresh(method, _aligned_with([11, 19, 20], seed=1))
  np.testing.assert_array_equal(new.indices, [11, 19, 20])
  want = np.zeros((RANK, RANK))
  want[0, 1] = want[1, 2] = 1.0
  np.testing.assert_array_equal(method.transition(old, new), want)
  d = _numpy_dct(K)
  np.testing.assert_allclose(
      d[:, np.asarray(new.indices)].T @ d[:, np.asarray(old.indices)], want,
      atol=1e-12)
