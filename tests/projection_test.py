"""The pipeline's algebra, per matrix ``G`` with the basis ``Q`` it holds:
``U = α Q inner(QᵀG) + residual(G - QQᵀG)``, on the documented axis."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import spectra
import subspace_optax as so
from subspace_optax._src.bases import registry

RANK = 2
SHAPE = (9, 5)  # rows > columns


def _gradient(seed=0, shape=SHAPE):
  return spectra.normal(shape, seed)


def _step(tx, g, steps=1):
  params = {'w': jnp.zeros(g.shape, g.dtype)}
  state = tx.init(params)
  update = jax.jit(tx.update)
  for _ in range(steps):
    out, state = update({'w': g}, state)
  return np.asarray(out['w'], np.float64), state


def _basis(state):
  return np.asarray(state.basis['w'], np.float64)


@pytest.mark.parametrize('basis', ['svd', 'randomized', 'random_orthonormal'])
def test_residual_is_exactly_the_part_outside_the_subspace(basis):
  """With ``scale=0`` the update is the residual path's input, ``G - QQᵀG``."""
  g = _gradient()
  tx = so.low_rank(optax.identity(), rank=RANK, basis=basis, scale=0.0,
                   residual=optax.identity(), side='compact')
  out, state = _step(tx, g)
  q = _basis(state)
  want = np.asarray(g) - q @ (q.T @ np.asarray(g))
  np.testing.assert_allclose(out, want, atol=1e-5)
  assert np.linalg.norm(want) > 0.5 * np.linalg.norm(g)


@pytest.mark.parametrize('scale', [0.25, 3.0])
def test_scale_multiplies_exactly_the_subspace_part(scale):
  g = _gradient(1)
  tx = so.low_rank(optax.identity(), rank=RANK, basis='svd', scale=scale,
                   residual=optax.identity(), side='compact')
  out, state = _step(tx, g)
  q = _basis(state)
  inside = q @ (q.T @ np.asarray(g))
  np.testing.assert_allclose(out, scale * inside + (np.asarray(g) - inside),
                             atol=1e-5)


@pytest.mark.parametrize('basis', ['svd', 'randomized', 'dct', 'gaussian'])
def test_unprojected_update_is_q_times_the_inner_update(basis):
  """``U = α Q adam(QᵀG)``: in ``span(Q)``; equal to numpy Adam's first step."""
  g = _gradient(2)
  tx = so.low_rank(optax.scale_by_adam(), rank=RANK, basis=basis, scale=0.5, side='compact')
  out, state = _step(tx, g)
  method = registry.resolve(basis)
  q = np.asarray(method.unproject(jnp.eye(RANK, dtype=jnp.float32),
                                  state.basis['w']), np.float64)  # Q itself
  c = q.T @ np.asarray(g)
  np.testing.assert_allclose(out, 0.5 * q @ (c / (np.abs(c) + 1e-8)),
                             rtol=1e-4, atol=1e-5)
  if basis != 'gaussian':  # orthonormal bases: an exact projector
    orthonormal = np.linalg.qr(q)[0]
    leak = out - orthonormal @ (orthonormal.T @ out)
    assert np.linalg.norm(leak) < 1e-5 * np.linalg.norm(out)


@pytest.mark.parametrize('side, rows', [
    ('left', True), ('right', False), ('compact', True), ('reference', False)])
@pytest.mark.parametrize('shape', [(9, 5), (5, 9)])
def test_side_puts_the_basis_on_the_documented_axis(side, rows, shape):
  """left: ``QQᵀG`` (Q on rows); right: ``G QQᵀ``; compact: the larger
  dimension; reference: the smaller one."""
  if side in ('compact', 'reference') and shape[0] < shape[1]:
    rows = not rows
  g = np.asarray(_gradient(3, shape), np.float64)
  tx = so.low_rank(optax.identity(), rank=RANK, basis='svd', side=side)
  out, state = _step(tx, jnp.asarray(g, jnp.float32))
  q = _basis(state)
  assert q.shape == ((shape[0] if rows else shape[1]), RANK)
  want = q @ (q.T @ g) if rows else (g @ q) @ q.T
  np.testing.assert_allclose(out, want, atol=1e-5)
  # The SVD basis is the top singular subspace on that side.
  u, _, vt = np.linalg.svd(g)
  top = u[:, :RANK] if rows else vt[:RANK].T
  np.testing.assert_allclose(np.abs(top.T @ q), np.eye(RANK), atol=1e-4)


def test_stacked_layers_get_one_basis_each():
  g = jnp.stack([_gradient(4), _gradient(5)])
  tx = so.low_rank(optax.identity(), rank=RANK, basis='svd',
                   dimension_numbers=so.last_two_axes, side='compact')
  out, state = _step(tx, g)
  q = _basis(state)
  assert q.shape == (2,) + (SHAPE[0], RANK)
  for layer in range(2):
    gl = np.asarray(g[layer], np.float64)
    np.testing.assert_allclose(out[layer], q[layer] @ (q[layer].T @ gl),
                               atol=1e-5)
  assert np.abs(q[0].T @ q[1]).max() < 0.99  # not one shared basis


def test_update_descends_and_recovers_g_at_full_rank():
  """Full rank, identity inner: ``QQᵀG = G`` (nothing lost, no sign flip)."""
  g = _gradient(6)
  tx = so.low_rank(optax.identity(), rank=1.0, basis='svd', side='compact')
  out, _ = _step(tx, g)
  np.testing.assert_allclose(out, np.asarray(g), atol=1e-5)


def test_random_bases_differ_per_leaf_step_and_seed_and_repeat_per_seed():
  """Keys are ``fold_in(fold_in(key(seed), count), leaf)``: two leaves of one
  shape, two refreshes and two seeds all get different bases; a seed repeats."""

  def bases_of(seed):
    tx = so.low_rank(optax.identity(), rank=RANK, refresh=1, seed=seed,
                     basis='random_orthonormal', side='compact')
    params = {'a': jnp.zeros(SHAPE), 'b': jnp.zeros(SHAPE)}
    state = tx.init(params)
    update = jax.jit(tx.update)
    out = []
    for t in range(2):
      _, state = update({'a': _gradient(t), 'b': _gradient(t)}, state)
      out.append({k: np.asarray(v) for k, v in state.basis.items()})
    return out

  first, again, other = bases_of(0), bases_of(0), bases_of(1)
  distinct = [first[0]['a'], first[0]['b'], first[1]['a'], other[0]['a']]
  for i, x in enumerate(distinct):
    for y in distinct[i + 1:]:
      assert np.abs(x - y).max() > 0.1
  for t in range(2):
    for name in 'ab':
      np.testing.assert_array_equal(first[t][name], again[t][name])
