"""What a refresh does to the inner moments (keep, reset, transport) and to the
signs of the basis, checked against numpy on the pipeline's own bases."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

import spectra
import subspace_optax as so

B1, B2, RANK = 0.9, 0.99, 3


def _gradient(step, shape=(10, 6)):
  return spectra.normal(shape, step)


def _run(on_refresh, names=('w',), refresh=2, steps=3, basis='svd'):
  """Per step, ``(basis, mu, nu, coefficients)`` of every leaf, as numpy."""
  tx = so.low_rank(optax.scale_by_adam(B1, B2), rank=RANK, refresh=refresh,
                   basis=basis, on_refresh=on_refresh, side='compact')
  params = {name: jnp.zeros((10, 6)) for name in names}
  state = tx.init(params)
  update = jax.jit(tx.update)
  history = []
  for t in range(steps):
    grads = {name: _gradient(10 * t + i) for i, name in enumerate(names)}
    _, state = update(grads, state)
    adam = state.inner_state
    record = {}
    for name in names:
      q = np.asarray(state.basis[name], np.float64)
      record[name] = dict(q=q, mu=np.asarray(adam.mu[name], np.float64),
                          nu=np.asarray(adam.nu[name], np.float64),
                          c=q.T @ np.asarray(grads[name], np.float64))
    history.append(record)
  return history


def _adam_moments(mu, nu, c):
  return B1 * mu + (1 - B1) * c, B2 * nu + (1 - B2) * c * c


def test_transport_maps_first_moments_by_r_and_second_by_r_squared():
  """m ← R m, v ← (R∘R) v with R = Q_newᵀ Q_old, then Adam's moment update."""
  history = _run('transport')
  before, after = history[1]['w'], history[2]['w']
  r = after['q'].T @ before['q']
  assert np.abs(r - np.diag(np.diag(r))).max() > 0.05  # a real rotation
  mu, nu = _adam_moments(r @ before['mu'], (r * r) @ before['nu'], after['c'])
  np.testing.assert_allclose(after['mu'], mu, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(after['nu'], nu, rtol=1e-4, atol=1e-7)


def test_keep_leaves_moments_in_their_slots():
  history = _run('keep')
  before, after = history[1]['w'], history[2]['w']
  assert not np.allclose(before['q'], after['q'], atol=1e-2)  # refreshed
  mu, nu = _adam_moments(before['mu'], before['nu'], after['c'])
  np.testing.assert_allclose(after['mu'], mu, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(after['nu'], nu, rtol=1e-4, atol=1e-7)


def test_no_transport_between_refreshes():
  history = _run('transport')
  before, after = history[0]['w'], history[1]['w']
  np.testing.assert_array_equal(before['q'], after['q'])
  mu, nu = _adam_moments(before['mu'], before['nu'], after['c'])
  np.testing.assert_allclose(after['mu'], mu, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(after['nu'], nu, rtol=1e-5, atol=1e-8)


def test_reset_zeroes_exactly_the_refreshed_leaves_moments():
  """Period 4, two leaves staggered: at update 2 only leaf 'b' refreshes."""
  history = _run('reset', names=('a', 'b'), refresh=4, steps=3)
  before, after = history[1], history[2]
  np.testing.assert_array_equal(before['a']['q'], after['a']['q'])
  assert not np.allclose(before['b']['q'], after['b']['q'], atol=1e-2)
  mu, nu = _adam_moments(before['a']['mu'], before['a']['nu'], after['a']['c'])
  np.testing.assert_allclose(after['a']['mu'], mu, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(after['a']['nu'], nu, rtol=1e-5, atol=1e-8)
  mu, nu = _adam_moments(0.0, 0.0, after['b']['c'])
  np.testing.assert_allclose(after['b']['mu'], mu, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(after['b']['nu'], nu, rtol=1e-5, atol=1e-8)


def test_transport_of_index_bases_moves_moments_of_kept_coordinates():
  """Random columns: R is the partial permutation [S_new[a] = S_old[b]]."""
  tx = so.low_rank(optax.scale_by_adam(B1, B2), rank=4, refresh=2,
                   basis='random_columns', on_refresh='transport', side='compact')
  state = tx.init({'w': jnp.zeros((10, 6))})
  update = jax.jit(tx.update)
  history = []
  for t in range(3):
    _, state = update({'w': _gradient(t)}, state)
    history.append((np.asarray(state.basis['w'].indices),
                    np.asarray(state.inner_state.mu['w']),
                    np.asarray(state.inner_state.nu['w'])))
  (old, mu_old, nu_old), (new, mu_new, nu_new) = history[1], history[2]
  kept = [a for a in range(4) if new[a] in old]
  assert 0 < len(kept) < 4, (old, new)  # seed chosen so both cases occur
  c = np.asarray(_gradient(2))[new]
  for a in range(4):
    carried = [b for b in range(4) if old[b] == new[a]]
    m = mu_old[carried[0]] if carried else 0.0
    v = nu_old[carried[0]] if carried else 0.0
    np.testing.assert_allclose(mu_new[a], B1 * m + (1 - B1) * c[a], rtol=1e-5)
    np.testing.assert_allclose(nu_new[a], B2 * v + (1 - B2) * c[a] ** 2,
                               rtol=1e-5)


def _basis_signs(align):
  """Column dots of successive bases of slowly drifting gradients."""
  tx = so.low_rank(optax.identity(), rank=RANK, refresh=1, basis='svd',
                   align_signs=align, side='compact')
  params = {'w': jnp.zeros((10, 6))}
  state = tx.init(params)
  update = jax.jit(tx.update)
  base = _gradient(0)
  dots = []
  previous = None
  for t in range(8):
    noise = 0.01 * _gradient(100 + t)
    _, state = update({'w': base + noise}, state)
    q = np.asarray(state.basis['w'])
    if previous is not None:
      dots.append(np.sum(q * previous, axis=0))
    previous = q
  return np.array(dots)


def test_aligned_refreshes_never_flip_a_column():
  dots = _basis_signs(True)
  assert np.all(dots > 0.99)


def test_without_alignment_the_svd_sign_flips_show_up():
  """The same drifting gradients: LAPACK flips some column's sign."""
  dots = _basis_signs(False)
  assert np.all(np.abs(dots) > 0.99)
  assert np.any(dots < 0)
