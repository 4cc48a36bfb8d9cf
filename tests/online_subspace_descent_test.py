"""Online Subspace Descent: the online-PCA basis and the preset."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import subspace_optax as so
from subspace_optax._src.bases import online_pca as online_pca_lib

# What an SVD or a symmetric eigendecomposition lowers to (jaxpr primitives,
# LAPACK/cuSOLVER custom calls).
_SVD_LIKE = re.compile(r'svd|gesdd|gesvd|syev|heev|eigh', re.IGNORECASE)


def _planted(k, r, seed=0):
  return np.linalg.qr(np.random.RandomState(seed).randn(k, r))[0].astype(
      np.float32)


def _low_rank_stream(u, l, key, noise=0.05):
  r = u.shape[1]
  spread = jnp.arange(r, 0, -1, dtype=jnp.float32)[:, None]

  def gradient(i):
    z = jax.random.normal(jax.random.fold_in(key, i), (r, l)) * spread
    n = jax.random.normal(jax.random.fold_in(key, 1_000_000 + i), (u.shape[0], l))
    return u @ z + noise * n

  return gradient


def _min_cosine(p, u):
  """Cosine of the largest principal angle between span(p) and span(u)."""
  q = np.linalg.qr(np.asarray(p, np.float64))[0]
  return np.linalg.svd(q.T @ u, compute_uv=False).min()


def test_closed_form_gradient_matches_autodiff():
  key = jax.random.key(0)
  p = jax.random.normal(key, (10, 3)) * 0.5  # deliberately not orthonormal
  g = jax.random.normal(jax.random.fold_in(key, 1), (10, 7))
  weight = 0.3

  def loss(p):
    gt = g / jnp.linalg.norm(g)
    e = p @ p.T @ gt - gt
    d = p.T @ p - jnp.eye(3)
    return jnp.sum(e * e) + weight * jnp.sum(d * d)

  closed, autodiff = jax.jit(lambda p: (
      online_pca_lib.online_pca_gradient(p, g, weight), jax.grad(loss)(p)))(p)
  np.testing.assert_allclose(closed, autodiff, rtol=1e-4, atol=1e-5)


def _primitives(jaxpr) -> set[str]:
  """Names of every primitive in a jaxpr, sub-jaxprs (cond, scan, pjit) included."""
  names = set()
  for eqn in jaxpr.eqns:
    names.add(eqn.primitive.name)
    for param in eqn.params.values():
      for sub in param if isinstance(param, (list, tuple)) else [param]:
        inner = getattr(sub, 'jaxpr', sub)
        if hasattr(inner, 'eqns'):
          names |= _primitives(inner)
  return names


def _compiled_step(tx, params):
  """The compiled update (one program serves every step), its jaxpr primitives
  and its HLO custom-call targets."""
  state = jax.eval_shape(tx.init, params)
  primitives = _primitives(jax.make_jaxpr(tx.update)(params, state, params).jaxpr)
  compiled = jax.jit(tx.update).lower(params, state, params).compile()
  targets = set(re.findall(r'custom_call_target="([^"]+)"', compiled.as_text()))
  return compiled, ' '.join(sorted(primitives)), ' '.join(sorted(targets))


def test_no_svd_in_the_step_and_the_first_step_spans_the_gradient():
  params = {'w': jnp.zeros((16, 12))}
  tx = so.online_subspace_descent(1e-3, rank=2, side='compact')
  compiled, primitives, targets = _compiled_step(tx, params)
  assert 'cholesky' in primitives  # the SVD-free initialisation is there
  assert not _SVD_LIKE.search(primitives), primitives
  assert not _SVD_LIKE.search(targets), targets
  # Update 0: a range finder of the first gradient; later: online steps.
  u = _planted(16, 2, seed=3)
  gradient = _low_rank_stream(u, 12, jax.random.key(4), noise=0.0)
  state = tx.init(params)
  _, state = compiled({'w': gradient(0)}, state, params)
  first = np.asarray(state[0].basis['w'].basis)
  assert _min_cosine(first, u) > 0.999
  np.testing.assert_allclose(first.T @ first, np.eye(2), atol=1e-5)
  _, state = compiled({'w': gradient(1)}, state, params)
  second = np.asarray(state[0].basis['w'].basis)
  assert 0 < np.abs(second - first).max() < 0.1  # moved a little, no restart
  # The detector is not vacuous: the reference's SVD initialisation shows up.
  _, primitives, targets = _compiled_step(
      so.online_subspace_descent(1e-3, rank=2, initial='svd', side='compact'), params)
  assert _SVD_LIKE.search(primitives) and _SVD_LIKE.search(targets)


def test_basis_tracks_a_planted_subspace_from_a_random_start():
  k, l, r = 32, 24, 3
  u = _planted(k, r)
  gradient = _low_rank_stream(u, l, jax.random.key(1))
  method = so.bases.online_pca(learning_rate=0.02, initial='random')

  @jax.jit
  def run(steps_key):
    state = method.init(k, l, r)
    state = method.first_refresh(gradient(0), state, steps_key, False)
    start = state.basis

    def body(s, i):
      return method.refresh(gradient(i), s, None, False), None

    state, _ = jax.lax.scan(body, state, jnp.arange(1, 150))
    return start, state.basis

  start, basis = run(jax.random.key(2))
  assert _min_cosine(start, u) < 0.9  # the random start is not the answer
  assert _min_cosine(basis, u) > 0.99
  gram = np.asarray(basis).T @ np.asarray(basis)
  np.testing.assert_allclose(gram, np.eye(r), atol=0.02)  # λ keeps PᵀP ≈ I


def _reference_projections(grads, rank, learning_rate, lagged):
  """numpy: SVD init, λ = 0, SGD on P; the basis that projects each gradient."""
  p = np.linalg.svd(grads[0].astype(np.float64))[0][:, :rank]
  used = []
  for t, g in enumerate(grads):
    if t > 0:
      gt = g / np.linalg.norm(g)
      e = p @ p.T @ gt - gt
      stepped = p - learning_rate * 2 * (e @ gt.T @ p + gt @ e.T @ p)
      if lagged:
        used.append(p)
        p = stepped
        continue
      p = stepped
    used.append(p)
  return used


@pytest.mark.parametrize('lagged', [False, True])
def test_reference_options_reproduce_the_reference_order(lagged):
  rank, lr, scale = 2, 0.5, 0.5
  rng = np.random.RandomState(0)
  grads = [rng.randn(12, 8).astype(np.float32) for _ in range(4)]
  basis = so.bases.online_pca(
      learning_rate=lr, orthogonality_weight=0.0, optimizer='sgd',
      initial='svd', lagged=lagged)
  tx = so.low_rank(optax.identity(), rank=rank, basis=basis, scale=scale, side='compact')
  params = {'w': jnp.zeros((12, 8))}
  state = tx.init(params)
  update = jax.jit(tx.update)
  for g, p in zip(grads, _reference_projections(grads, rank, lr, lagged)):
    u, state = update({'w': jnp.asarray(g)}, state, params)
    np.testing.assert_allclose(u['w'], scale * p @ p.T @ g, rtol=2e-4,
                               atol=2e-5)


def test_lion_update_lies_in_the_span_and_reference_sign_is_dense():
  params = {'w': jnp.zeros((16, 10)), 'b': jnp.zeros((10,))}
  rng = np.random.RandomState(1)
  lr = 0.01
  for after in (False, True):
    tx = so.online_subspace_descent(
        lr, rank=3, inner='lion', sign_after_unproject=after, scale=1.0,
        initial='random', side='compact')
    state = tx.init(params)
    update = jax.jit(tx.update)
    for _ in range(2):
      grads = jax.tree.map(
          lambda p: jnp.asarray(rng.randn(*p.shape), jnp.float32), params)
      u, state = update(grads, state, params)
    w = np.asarray(u['w'])
    if after:  # reference: sign(P(...)) is a dense ±lr step
      np.testing.assert_allclose(np.abs(w), lr, rtol=1e-6)
    else:
      q = np.linalg.qr(np.asarray(state[0].basis['w'].basis))[0]
      assert np.linalg.norm(w - q @ q.T @ w) <= 1e-5 * np.linalg.norm(w)
      assert np.linalg.matrix_rank(w, tol=1e-6) == 3
    np.testing.assert_allclose(np.abs(u['b']), lr, rtol=1e-6)  # plain Lion


def test_reorthonormalize_keeps_an_orthonormal_basis():
  u = _planted(16, 3, seed=2)
  gradient = _low_rank_stream(u, 12, jax.random.key(0))
  method = so.bases.online_pca(
      learning_rate=0.05, orthogonality_weight=0.0, reorthonormalize=True)

  @jax.jit
  def run():
    state = method.init(16, 12, 3)  # I[:, :3], orthonormal
    for i in range(2):
      state = method.refresh(gradient(i), state, None, False)
    return state

  state = run()
  np.testing.assert_allclose(
      state.basis.T @ state.basis, np.eye(3), atol=1e-5)


@pytest.mark.parametrize('inner,basis_optimizer,lagged', [
    ('adam', 'adam', False), ('adam', 'sgd', True), ('lion', 'adam', False)])
def test_state_bytes_match_the_analytic_size(inner, basis_optimizer, lagged):
  params = {'w': jnp.zeros((20, 12)), 'v': jnp.zeros((6, 14)),
            'stack': jnp.zeros((2, 8, 10)), 'b': jnp.zeros((12,))}
  tx = so.online_subspace_descent(
      1e-3, rank=4, inner=inner, basis_optimizer=basis_optimizer,
      lagged=lagged, dimension_numbers=so.last_two_axes, side='compact')
  state = jax.eval_shape(tx.init, params)
  assert so.state_bytes(state) == so.state_sizes.online_subspace_descent_bytes(
      params, 4, inner=inner, basis_optimizer=basis_optimizer, lagged=lagged,
      dimension_numbers=so.last_two_axes, side='compact')


def test_bad_arguments_are_rejected():
  with pytest.raises(ValueError, match='initial'):
    so.bases.online_pca(initial='qr')
  with pytest.raises(ValueError, match='optimizer'):
    so.bases.online_pca(optimizer='rmsprop')
  with pytest.raises(ValueError, match='inner'):
    so.online_subspace_descent(1e-3, inner='sgd', side='compact')
  with pytest.raises(ValueError, match='sign_after_unproject'):
    so.online_subspace_descent(1e-3, sign_after_unproject=True, side='compact')
