"""Tests of the residual paths: the maths of G - QQᵀG and what is done to it."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import subspace_optax as so
from subspace_optax._src.pipeline import residual as residual_lib

RANK = 2


def _gradient(shape=(6, 4), seed=0):
  return jax.random.normal(jax.random.key(seed), shape)


def _capture():
  """A residual path that returns its input and records its inputs."""
  seen = []

  def update_fn(updates, state, params=None, **extra_args):
    del params
    seen.append((updates, extra_args))
    return updates, state

  return optax.GradientTransformationExtraArgs(
      lambda params: optax.EmptyState(), update_fn), seen


def _step(residual, inner=optax.identity(), scale=1.0, gradient=None):
  """One update of one (6, 4) matrix (basis on its 6 rows); returns the
  update, the basis Q and the gradient G."""
  gradient = _gradient() if gradient is None else gradient
  tx = so.low_rank(inner, rank=RANK, refresh=1, basis='svd', side='left',
                   residual=residual, scale=scale)
  params = {'w': jnp.zeros(gradient.shape)}
  update, state = tx.update({'w': gradient}, tx.init(params), params)
  return update['w'], state.basis['w'], gradient


def test_residual_is_the_gradient_outside_the_subspace():
  capture, seen = _capture()
  _, q, g = _step(capture)
  residual, extra_args = seen[-1]  # (init traces it abstractly first)
  inside = q @ (q.T @ g)
  # Orthogonal to span Q, and residual + QQᵀG == G.
  np.testing.assert_allclose(q.T @ residual, 0.0, atol=1e-5)
  np.testing.assert_allclose(residual + inside, g, atol=1e-5)
  assert float(jnp.linalg.norm(inside)) > 0.3 * float(jnp.linalg.norm(g))
  np.testing.assert_allclose(extra_args['coefficients'], q.T @ g, atol=1e-5)
  np.testing.assert_allclose(extra_args['gradients'], g)


def test_identity_inner_and_residual_give_back_the_gradient():
  update, _, g = _step(optax.identity())
  np.testing.assert_allclose(update, g, atol=1e-5)


def test_scale_zero_leaves_only_the_residual():
  update, q, g = _step(optax.identity(), scale=0.0)
  np.testing.assert_allclose(update, g - q @ (q.T @ g), atol=1e-5)


def test_subspace_norm_ratio_is_per_column_of_the_coefficients():
  # C: (rank 2, l 3) with column norms 1, 2, 4; N with column norms 3, 1, 8.
  c = jnp.array([[0.6, 0.0, 4.0], [0.8, 2.0, 0.0]])
  n = jnp.array([[3.0, 0.6, 0.0], [0.0, 0.8, -8.0]])
  np.testing.assert_allclose(
      residual_lib.subspace_norm_ratio(c, n, 'channel'), [[3.0, 0.5, 2.0]],
      rtol=1e-6)
  np.testing.assert_allclose(
      residual_lib.subspace_norm_ratio(c, n, 'tensor'),
      [[np.sqrt(9 + 1 + 64) / np.sqrt(1 + 4 + 16)]], rtol=1e-6)
  with pytest.raises(ValueError, match='granularity'):
    residual_lib.subspace_norm_ratio(c, n, 'row')


def test_fira_scales_each_residual_column_by_the_inner_norm_ratio():
  """Fira (Chen et al. 2024, §3.2): S_j = ‖N_j‖/‖C_j‖ · (G - QQᵀG)_j."""
  g = _gradient()
  tx = so.low_rank(optax.identity(), rank=RANK, refresh=1, basis='svd',
                   side='left', residual=optax.identity())
  params = {'w': jnp.zeros(g.shape)}
  _, state = tx.update({'w': g}, tx.init(params), params)
  q = state.basis['w']
  c = q.T @ g
  column_scale = jnp.array([0.5, 2.0, 3.0, 0.25])
  n = c * column_scale  # an inner update with known column norm ratios
  residual = g - q @ c
  out, _ = so.fira_residual(limiter=None).update(
      residual, optax.EmptyState(), coefficients=c, subspace_updates=n)
  np.testing.assert_allclose(out, residual * column_scale, rtol=1e-5,
                             atol=1e-6)


@pytest.mark.parametrize('alpha', [1.0, 0.25])
def test_fira_pipeline_update(alpha):
  """With N = 2C: U = α Q (2C) + 2 (G - QQᵀG)."""
  update, q, g = _step(so.fira_residual(limiter=None), inner=optax.scale(2.0),
                       scale=alpha)
  inside = q @ (q.T @ g)
  np.testing.assert_allclose(update, 2 * alpha * inside + 2 * (g - inside),
                             atol=1e-5)


def test_fira_reference_residual_leaks_one_minus_alpha_of_the_subspace():
  """The reference code's residual is G - α QQᵀG."""
  update, q, g = _step(
      so.fira_residual(limiter=None, reference_residual=True,
                       subspace_scale=0.25),
      inner=optax.scale(2.0), scale=0.25)
  inside = q @ (q.T @ g)
  np.testing.assert_allclose(
      update, 0.5 * inside + 2 * (g - 0.25 * inside), atol=1e-5)


def test_frugal_sign_residual():
  """FRUGAL (Zmushko et al. 2024): U = QQᵀG + s · sign(G - QQᵀG)."""
  update, q, g = _step(residual_lib.frugal_residual('sign', 0.5))
  inside = q @ (q.T @ g)
  np.testing.assert_allclose(
      update, inside + 0.5 * jnp.sign(g - inside), atol=1e-5)


def test_frugal_sgd_and_custom_residuals():
  update, q, g = _step(residual_lib.frugal_residual('sgd', 0.5))
  inside = q @ (q.T @ g)
  np.testing.assert_allclose(update, inside + 0.5 * (g - inside), atol=1e-5)
  update, _, _ = _step(
      residual_lib.frugal_residual(optax.scale(-1.0), 0.5))
  np.testing.assert_allclose(update, inside - 0.5 * (g - inside), atol=1e-5)
  assert residual_lib.frugal_residual(None, 0.5) is None
  with pytest.raises(ValueError, match='residual'):
    residual_lib.frugal_residual('adam', 1.0)


@pytest.mark.parametrize('path', [
    so.scale_residual_by_subspace(), so.fira_residual(),
    so.scale_gradient_by_subspace()])
def test_residual_paths_outside_low_rank_say_where_they_belong(path):
  g = {'w': jnp.ones((4, 3))}
  with pytest.raises(ValueError, match='low_rank'):
    path.update(g, path.init(g))


def test_residual_runs_on_each_matrix_with_its_own_state():
  """A stacked leaf's residual path is that of each of its matrices alone:
  Fira's limiter (a state per matrix: the previous residual norm) on a
  (3, 6, 4) stack gives the updates and states of the same three matrices
  as separate leaves, over two steps (the limiter acts from the second)."""
  stack = jax.random.normal(jax.random.key(1), (3, 6, 4))
  grads = [stack, 3.0 * stack[::-1]]
  tx = so.low_rank(optax.scale_by_adam(), rank=RANK, refresh=1, basis='svd',
                   residual=so.fira_residual(limiter=1.01),
                   dimension_numbers=so.last_two_axes)
  split = lambda x: {str(i): x[i] for i in range(3)}
  stacked_state = tx.init({'w': stack})
  split_state = tx.init(split(stack))
  for g in grads:
    stacked_update, stacked_state = tx.update({'w': g}, stacked_state)
    split_update, split_state = tx.update(split(g), split_state)
    for i in range(3):
      np.testing.assert_allclose(stacked_update['w'][i], split_update[str(i)],
                                 rtol=1e-5, atol=1e-6)
  norms = stacked_state.residual_state['w'][1].norm
  assert norms.shape == (3,)
  for i in range(3):
    np.testing.assert_allclose(
        norms[i], split_state.residual_state[str(i)][1].norm, rtol=1e-5)
  # The limiter bit on the second step (3x the gradient): the norms are
  # at most 1.01x the first step's, not 3x.
  first = tx.update({'w': grads[0]}, tx.init({'w': stack}))[1]
  np.testing.assert_array_less(
      norms, 1.0101 * first.residual_state['w'][1].norm)


@pytest.mark.parametrize('residual, name', [
    (optax.clip_by_global_norm(1.0), 'clip_by_global_norm'),
    (optax.apply_if_finite(optax.identity(), 3), 'apply_if_finite'),
])
def test_a_whole_tree_residual_is_refused_by_name(residual, name):
  tx = so.low_rank(optax.identity(), rank=RANK, residual=residual)
  with pytest.raises(ValueError, match=f'{name}.*each matrix on its own'):
    tx.init({'w': jnp.zeros((6, 4))})
