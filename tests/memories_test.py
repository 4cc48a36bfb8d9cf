"""Tests of the memory builders: sculpt (weights' SVD), GPM (activations),
gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import subspace_optax as so
from subspace_optax import continual as cl


def _params():
  keys = jax.random.split(jax.random.key(0), 2)
  return {
      'w': jax.random.normal(keys[0], (12, 8)),  # d = 8
      'stack': jax.random.normal(keys[1], (2, 10, 6)),  # d = 6 per layer
      'b': jnp.ones((8,)),
  }


def _span_distance(basis, reference):
  """|(I - P_ref) basis| for orthonormal columns: 0 when span(basis) ⊆ ref."""
  basis, reference = np.asarray(basis, np.float64), np.asarray(reference, np.float64)
  return np.linalg.norm(basis - reference @ (reference.T @ basis))


def test_sculpt_memory_keeps_top_singular_directions():
  params = _params()
  memory = cl.sculpt_memory(params, min_fraction=0.25, max_fraction=0.5,
                            dimension_numbers=so.last_two_axes)
  assert isinstance(memory['b'], optax.MaskedNode)
  w = memory['w']
  assert w.left.shape == (12, 4) and w.right.shape == (8, 4)  # floor(0.5 * 8)
  assert int(w.left_count) == int(w.right_count) == 4  # I_n = 1: max_fraction
  u, _, vh = np.linalg.svd(np.asarray(params['w'], np.float64))
  assert _span_distance(w.left, u[:, :4]) < 1e-4
  assert _span_distance(w.right, vh[:4].T) < 1e-4
  for layer in range(2):
    u, _, vh = np.linalg.svd(np.asarray(params['stack'][layer], np.float64))
    assert _span_distance(memory['stack'].left[layer], u[:, :3]) < 1e-4
    assert _span_distance(memory['stack'].right[layer], vh[:3].T) < 1e-4


def test_sculpt_rank_follows_importance():
  params = _params()
  importance = {'w': 0.2, 'stack': jnp.array([0.8, 0.5]), 'b': None}
  memory = cl.sculpt_memory(params, importance, min_fraction=0.1,
                            max_fraction=0.8, dimension_numbers=so.last_two_axes)
  # 'max' normalisation: I_n = I / 0.8; k = floor(d (0.1 + 0.7 I_n)).
  assert int(memory['w'].left_count) == int(8 * (0.1 + 0.7 * 0.25))  # 2
  np.testing.assert_array_equal(memory['stack'].left_count, [
      int(6 * 0.8), int(6 * (0.1 + 0.7 * 0.625))])  # [4, 3]
  # Capacity depends on max_fraction only (static shapes whatever I is).
  assert memory['w'].left.shape == (12, 6)
  np.testing.assert_array_equal(memory['w'].left[:, 2:], 0)
  minmax = cl.sculpt_memory(params, importance, normalization='minmax',
                            dimension_numbers=so.last_two_axes)
  assert int(minmax['w'].left_count) == int(8 * 0.1)  # least important: mrr
  np.testing.assert_array_equal(minmax['stack'].left_count[0], int(6 * 0.8))


def test_sculpt_step_keeps_the_protected_singular_values():
  """With the two-sided mask U_hᵀ W V_h is unchanged by any AdamW step."""
  params = _params()
  tx = cl.sculpt(1e-1, weight_decay=0.5, max_fraction=0.5,
                 dimension_numbers=so.last_two_axes)
  state = tx.init(params)
  memory = cl.sculpt_memory(params, max_fraction=0.5,
                            dimension_numbers=so.last_two_axes)
  state = cl.set_memory(state, memory)
  new = params
  for step in range(3):
    grads = jax.tree.map(lambda p, s=step: jax.random.normal(
        jax.random.key(s), p.shape), params)
    updates, state = tx.update(grads, state, new)
    new = optax.apply_updates(new, updates)
  u, v = np.asarray(memory['w'].left), np.asarray(memory['w'].right)
  np.testing.assert_allclose(u.T @ np.asarray(new['w']) @ v,
                             u.T @ np.asarray(params['w']) @ v, atol=1e-5)
  assert np.abs(np.asarray(new['w'] - params['w'])).max() > 1e-2


def test_gpm_energy_threshold_picks_the_smallest_rank():
  # Inputs with energies 16, 8, 4, 2, 1, 0, ... along the axes of R^6.
  scales = jnp.array([4.0, 2 ** 1.5, 2.0, 2 ** 0.5, 1.0, 0.0])
  samples = jnp.concatenate([jnp.diag(scales), jnp.zeros((4, 6))])
  params = {'w': jnp.zeros((6, 3))}
  total = 31.0
  for threshold, want in ((16 / total, 1), (0.5, 1), (24 / total + 1e-3, 3),
                          (0.99, 5)):
    memory = cl.gpm_memory({'w': samples}, threshold, params=params)
    assert int(memory['w'].left_count) == want, threshold
    np.testing.assert_allclose(np.abs(memory['w'].left[:, :want]),
                               np.eye(6)[:, :want], atol=1e-6)
    assert isinstance(memory['w'].right, optax.MaskedNode)


def test_gpm_grows_incrementally():
  params = {'w': jnp.zeros((6, 3))}
  first = jnp.eye(6)[:2] * jnp.array([[3.0], [1.0]])  # span e0, e1
  memory = cl.gpm_memory({'w': first}, 0.99, params=params)
  assert int(memory['w'].left_count) == 2
  # Same span again: nothing new.
  again = cl.gpm_memory({'w': 2 * first}, 0.99, memory)
  assert int(again['w'].left_count) == 2
  # New inputs mostly in the memory plus e3: only e3 is added.
  second = jnp.stack([jnp.eye(6)[0] * 5, jnp.eye(6)[3]])
  grown = cl.gpm_memory({'w': second}, 0.99, memory)
  assert int(grown['w'].left_count) == 3
  np.testing.assert_allclose(np.abs(grown['w'].left[:, 2]), np.eye(6)[3],
                             atol=1e-6)
  # Protected inputs see no change: x Δ = 0 after a left projection.
  tx = optax.chain(optax.adam(0.1), cl.orthogonal_to(grown, mode='left'))
  update, _ = tx.update({'w': jnp.ones((6, 3))}, tx.init(params), params)
  np.testing.assert_allclose(second @ update['w'], 0, atol=1e-6)


def test_gpm_memory_checks_activation_shapes():
  params = {'w': jnp.zeros((6, 3))}
  with pytest.raises(ValueError, match=r"\['w'\].*activations"):
    cl.gpm_memory({'w': jnp.ones((4, 5))}, 0.9, params=params)


def test_gradient_memory_spans_the_gradients():
  params = {'w': jnp.zeros((8, 5)), 'b': jnp.zeros(5)}
  key = jax.random.key(3)
  left = jnp.linalg.qr(jax.random.normal(key, (8, 2)))[0]
  right = jnp.linalg.qr(jax.random.normal(jax.random.key(4), (5, 2)))[0]
  coefficients = jax.random.normal(jax.random.key(5), (3, 2, 2))
  gradients = {'w': jnp.einsum('mi,sij,nj->smn', left, coefficients, right),
               'b': jnp.ones((3, 5))}
  memory = cl.gradient_memory(gradients, 0.999)
  assert int(memory['w'].left_count) == 2 and int(memory['w'].right_count) == 2
  assert _span_distance(memory['w'].left[:, :2], left) < 1e-4
  assert _span_distance(memory['w'].right[:, :2], right) < 1e-4


def test_activation_importance():
  x = jax.random.normal(jax.random.key(0), (16, 4))
  np.testing.assert_allclose(cl.activation_importance(x, 3 * x), 1.0, rtol=1e-5)
  np.testing.assert_allclose(cl.activation_importance(x, -x), -1.0, rtol=1e-5)
  with pytest.raises(ValueError, match='same shape'):
    cl.activation_importance(x, jnp.ones((16, 5)))


# --------------------------------------------------- non-finite input, None


def _with_inf_at_origin(x, value=jnp.inf):
  # A 12 x 8 matrix with Inf at [0, 0] makes LAPACK's gesdd loop forever.
  return x.at[(0,) * x.ndim].set(value)


_BUILDERS = {
    'sculpt': ('weights', lambda bad: cl.sculpt_memory(
        {'w': _with_inf_at_origin(_params()['w'], bad), 'v': _params()['w']})),
    'gpm': ('activations', lambda bad: cl.gpm_memory(
        {'w': _with_inf_at_origin(jnp.ones((5, 12)), bad), 'v': None},
        params={'w': jnp.zeros((12, 8)), 'v': jnp.zeros((12, 8))})),
    'gradient': ('gradients', lambda bad: cl.gradient_memory(
        {'w': _with_inf_at_origin(jnp.ones((3, 12, 8)), bad),
         'v': jnp.ones((3, 12, 8))})),
}


@pytest.mark.parametrize('bad', [jnp.inf, -jnp.inf, jnp.nan])
@pytest.mark.parametrize('builder', sorted(_BUILDERS))
def test_builders_refuse_non_finite_input_naming_the_leaf(builder, bad):
  what, build = _BUILDERS[builder]
  counts = '1 NaN and 0 Inf' if np.isnan(bad) else '0 NaN and 1 Inf'
  with pytest.raises(ValueError, match=(
      rf"\['w'\]: the {what} hold {counts} entries.*protect nothing")):
    build(bad)


@pytest.mark.parametrize('builder', sorted(_BUILDERS))
def test_builders_under_jit_return_a_nan_memory_that_set_memory_refuses(
    builder):
  """Under jit a builder cannot raise: the bad leaf's memory is NaN (never a
  memory that silently protects nothing); set_memory then names the leaf."""
  _, build = _BUILDERS[builder]
  memory = jax.jit(build)(jnp.inf)
  assert np.all(np.isnan(memory['w'].left))
  if not isinstance(memory['v'], optax.MaskedNode) and builder != 'gpm':
    assert np.all(np.isfinite(memory['v'].left))
  tx = cl.orthogonal_to(capacity=1.0)
  state = tx.init({'w': jnp.zeros((12, 8)), 'v': jnp.zeros((12, 8))})
  with pytest.raises(ValueError, match=r"\['w'\]: the left basis.*non-finite"):
    cl.set_memory(state, memory)


_NEVER_HANGS = '''
import jax, jax.numpy as jnp, numpy as np
from subspace_optax import continual as cl
weights = {'w': jax.random.normal(jax.random.key(0), (12, 8)).at[0, 0].set(
    jnp.inf)}
try:
  cl.sculpt_memory(weights)
  raise SystemExit('no error')
except ValueError:
  pass
assert np.isnan(jax.jit(cl.sculpt_memory)(weights)['w'].left).all()
activations = {'w': jnp.ones((12, 12)).at[0, 0].set(jnp.inf)}
memory = jax.jit(lambda a: cl.gpm_memory(
    a, params={'w': jnp.zeros((12, 8))}))(activations)
assert np.isnan(memory['w'].left).all()
print('done')
'''


def test_builders_never_hang_on_inf(tmp_path):
  """LAPACK's SVD never returns on this matrix (Inf at [0, 0] of a 12 x 8);
  the builders must not hand it over, eagerly or under jit. A subprocess with
  a timeout makes a regression fail instead of hanging the suite."""
  import os
  import pathlib
  import subprocess
  import sys
  script = tmp_path / 'never_hangs.py'
  script.write_text(_NEVER_HANGS)
  root = pathlib.Path(__file__).resolve().parents[1]
  env = {**os.environ, 'PYTHONPATH': str(root), 'JAX_PLATFORMS': 'cpu'}
  try:
    result = subprocess.run([sys.executable, str(script)], env=env,
                            capture_output=True, text=True, timeout=240)
  except subprocess.TimeoutExpired:
    pytest.fail('a memory builder hung on a matrix holding Inf')
  assert result.returncode == 0 and 'done' in result.stdout, result.stderr


def test_none_params_leaves_are_left_alone():
  params = {'w': _params()['w'], 'b': None}
  memory = cl.sculpt_memory(params, max_fraction=0.5)
  assert memory['b'] is None and int(memory['w'].left_count) == 4
  grown = cl.gpm_memory({'w': jnp.eye(12)[:2], 'b': None}, 0.99,
                        params=params)
  assert grown['b'] is None and int(grown['w'].left_count) == 2
  grads = cl.gradient_memory({'w': jnp.ones((2, 12, 8)), 'b': None}, 0.99)
  assert grads['b'] is None and int(grads['w'].left_count) == 1


def test_released_rule_keeps_floor_max_dim_times_step_times_task():
  """k = floor(max(m, n) · 0.07 · t): the released code's rank."""
  params = {'w': jax.random.normal(jax.random.key(3), (20, 50))}
  u, _, vh = np.linalg.svd(np.asarray(params['w'], np.float64))
  for task, k in ((1, 3), (2, 7), (4, 14)):
    assert cl.released_rank(20, 50, task) == k
    memory = cl.sculpt_memory(params, rule='released', task=task,
                              max_fraction=1.0)
    assert int(memory['w'].left_count) == int(memory['w'].right_count) == k
    assert _span_distance(memory['w'].left[:, :k], u[:, :k]) < 1e-4
    assert _span_distance(memory['w'].right[:, :k], vh[:k].T) < 1e-4
  # Independent of the matrix's own importance: same k for a scaled copy.
  twice = cl.sculpt_memory({'w': 2 * params['w']}, rule='released', task=2,
                           max_fraction=1.0)
  assert int(twice['w'].left_count) == 7


def test_released_rule_warns_when_it_clamps():
  params = {'head': jnp.ones((64, 10)) + jnp.eye(64, 10)}
  clamped = r"\['head'\] \(64x10\): 13 -> 10"
  with pytest.warns(cl.RankClampedWarning, match=clamped):
    memory = cl.sculpt_memory(params, rule='released', task=3,
                              max_fraction=1.0)
  assert int(memory['head'].left_count) == 10
  with pytest.warns(cl.RankClampedWarning, match='4 -> 2'):
    cl.sculpt_memory(params, rule='released', task=1, max_fraction=0.25)


def test_released_rule_errors_are_named():
  params = {'w': jnp.ones((6, 4))}
  with pytest.raises(ValueError, match='`task`'):
    cl.sculpt_memory(params, rule='released')
  with pytest.raises(ValueError, match='importance=None'):
    cl.sculpt_memory(params, {'w': 0.5}, rule='released', task=1)
  with pytest.raises(ValueError, match='`rule`'):
    cl.sculpt_memory(params, rule='paper')
