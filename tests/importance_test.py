"""I3S: singular directions sampled without replacement, probability ∝ σ."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np

import subspace_optax as so

_SIGMA = np.array([8.0, 4.0, 2.0, 1.0, 0.5])


def _matrix_with_spectrum(k=7, l=5, seed=0):
  rng = np.random.RandomState(seed)
  u = np.linalg.qr(rng.randn(k, len(_SIGMA)))[0]
  v = np.linalg.qr(rng.randn(l, len(_SIGMA)))[0]
  return (u * _SIGMA) @ v.T, u


def _sample(rank, draws, seed):
  g, u = _matrix_with_spectrum()
  method = so.bases.importance_sampled()
  old = jnp.eye(g.shape[0], rank)
  keys = jax.random.split(jax.random.key(seed), draws)
  q = jax.jit(jax.vmap(lambda k: method.refresh(
      jnp.asarray(g, jnp.float32), old, k, False)))(keys)
  # Which singular vector is each column? |u_iᵀ q_j| = 1 for the chosen i.
  overlap = np.abs(np.einsum('ki,dkj->dij', u, np.asarray(q)))
  return np.asarray(q), overlap


def _inclusion_probabilities(weights, rank):
  """P(i in sample) for successive sampling without replacement ∝ weights."""
  weights = np.asarray(weights, np.float64)
  inclusion = np.zeros(len(weights))
  for order in itertools.permutations(range(len(weights)), rank):
    probability, remaining = 1.0, weights.sum()
    for i in order:
      probability *= weights[i] / remaining
      remaining -= weights[i]
    inclusion[list(order)] += probability
  return inclusion


def test_sampling_frequencies_follow_the_singular_values():
  draws = 4000
  for rank in (1, 2):
    q, overlap = _sample(rank=rank, draws=draws, seed=rank)
    # Orthonormal singular vectors, distinct, in σ order.
    np.testing.assert_allclose(
        np.einsum('dki,dkj->dij', q, q),
        np.broadcast_to(np.eye(rank), (draws, rank, rank)), atol=1e-5)
    np.testing.assert_allclose(overlap.max(axis=1), 1.0, atol=1e-4)
    chosen = overlap.argmax(axis=1)  # (draws, rank) singular-vector indices
    assert np.all(np.diff(chosen, axis=1) > 0)
    frequencies = np.array([np.mean(np.any(chosen == i, axis=1))
                            for i in range(len(_SIGMA))])
    expected = _inclusion_probabilities(_SIGMA, rank)
    standard_error = np.sqrt(expected * np.abs(1 - expected) / draws)
    assert np.all(np.abs(frequencies - expected) < 4 * standard_error + 1e-3), (
        rank, frequencies, expected)
  # Not the top-r rule: the weakest direction does get picked.
  assert frequencies[-1] > 0.04


def test_i3s_state_bytes_match_galore_bytes():
  params = {'w': jnp.zeros((20, 12)), 'b': jnp.zeros((12,))}
  state = jax.eval_shape(so.i3s(1e-3, rank=4).init, params)
  assert so.state_bytes(state) == so.state_sizes.galore_bytes(params, 4)
