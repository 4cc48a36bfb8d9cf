"""Tests of the weight-SVD fine-tuning presets: SVFit, SALT, Effort, MiLoRA,
PiSSA and LoRA, as exact transforms on the dense weights."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import subspace_optax as so
from subspace_optax._src.methods import effort as effort_lib
from subspace_optax._src.methods import lora as lora_lib
from subspace_optax._src.methods import milora as milora_lib
from subspace_optax._src.methods import salt as salt_lib
from subspace_optax._src.methods import svfit as svfit_lib

LR, WD, STEPS = 1e-2, 0.05, 50
MATRICES = ('w1', 'w2')


def _problem(dtype=jnp.float32):
  keys = jax.random.split(jax.random.key(0), 5)
  params = {
      'w1': jax.random.normal(keys[0], (12, 8), dtype) / 3,
      'w2': jax.random.normal(keys[1], (8, 6), dtype) / 3,
      'b': jnp.zeros((6,), dtype),
  }
  x = jax.random.normal(keys[2], (32, 12), dtype)
  y = jax.random.normal(keys[3], (32, 6), dtype)

  def loss(p):
    return jnp.mean((x @ p['w1'] @ p['w2'] + p['b'] - y) ** 2)

  return params, loss


def _run(tx, params, loss, steps=STEPS):
  state = tx.init(params)
  first = state

  @jax.jit
  def step(p, s):
    u, s = tx.update(jax.grad(loss)(p), s, p)
    return optax.apply_updates(p, u), s

  trajectory = []
  for _ in range(steps):
    params, state = step(params, state)
    trajectory.append(params)
  return trajectory, first, state


def _run_direct(weights, factors, params, loss, steps=STEPS,
                penalty=lambda f: 0.0):
  """AdamW on the factors of the reparameterised model ``weights(factors)``."""
  opt = optax.adamw(LR, weight_decay=WD)
  state = opt.init(factors)

  @jax.jit
  def step(f, s):
    g = jax.grad(lambda f: loss(weights(f)) + penalty(f))(f)
    u, s = opt.update(g, s, f)
    return optax.apply_updates(f, u), s

  trajectory = []
  for _ in range(steps):
    factors, state = step(factors, state)
    trajectory.append(weights(factors))
  return trajectory


# The reparameterised weight of each method, written from its paper's formula
# as a function of the factors of one matrix and the constants of the state.
def _svfit_weight(f, c):
  return c['u'] @ jnp.diag(f['s']) @ c['v'].T


def _salt_weight(f, c):
  s, r = c['s'], f['scale'].shape[0]
  rest = s.shape[0] - r
  m = jnp.block([
      [jnp.diag(f['scale'] * s[:r] + f['shift']), jnp.zeros((r, rest))],
      [jnp.zeros((rest, r)), jnp.diag(s[r:]) + f['x'] @ f['y']]])
  # ReLU with a zero derivative at 0, as torch.relu.
  return c['u'] @ jnp.where(m > 0, m, 0.0) @ c['v'].T


def _effort_weight(f, c):
  del c
  return f['u'] @ jnp.diag(f['s']) @ f['v'].T


def _effort_penalty(f, c):
  """Effort's Eqs. 5-6 written densely: orthogonality of [U_r, U_res] and
  [V_r, V_res], and |‖W'‖² - ‖W‖²|."""
  u = jnp.concatenate([c['u'], f['u']], axis=1)
  v = jnp.concatenate([c['v'], f['v']], axis=1)
  eye = jnp.eye(u.shape[1])
  weight = c['u'] @ jnp.diag(c['s']) @ c['v'].T + _effort_weight(f, c)
  return (jnp.sum((u.T @ u - eye) ** 2) + jnp.sum((v.T @ v - eye) ** 2)
          + jnp.abs(jnp.sum(weight ** 2) - c['norm_sq']))


def _lora_weight(f, c):
  del c
  return f['down'] @ f['up']


PRESETS = {
    'svfit': (lambda: svfit_lib.svfit(LR, 3, weight_decay=WD), _svfit_weight),
    'svfit_energy': (lambda: svfit_lib.svfit(LR, weight_decay=WD),
                     _svfit_weight),
    'salt': (lambda: salt_lib.salt(LR, 0.25, 3, weight_decay=WD),
             _salt_weight),
    'effort': (lambda: effort_lib.effort(LR, 2, weight_decay=WD),
               _effort_weight),
    'effort_orthogonal': (
        lambda: effort_lib.effort(LR, 2, constraint='orthogonal',
                                  weight_decay=WD),
        _effort_weight, _effort_penalty),
    'milora': (lambda: milora_lib.milora(LR, 3, weight_decay=WD),
               _lora_weight),
    'pissa': (lambda: milora_lib.pissa(LR, 3, weight_decay=WD), _lora_weight),
    'lora': (lambda: lora_lib.lora(LR, 3, weight_decay=WD), _lora_weight),
}


@pytest.mark.parametrize('name', sorted(PRESETS))
def test_trajectory_equals_training_the_reparameterised_model(name):
  with jax.enable_x64(True):
    params, loss = _problem(jnp.float64)
    make, weight, *penalty = PRESETS[name]
    trajectory, first, _ = _run(make(), params, loss)
    factors = {k: first.factors[k] for k in MATRICES}
    frozen = {k: first.frozen[k] for k in MATRICES}

    def weights(f):
      out = dict(params)
      for k in MATRICES:
        out[k] = (params[k] - weight(factors[k], frozen[k])
                  + weight(f[k], frozen[k]))
      return out

    def extra(f):
      return sum(penalty[0](f[k], frozen[k]) for k in MATRICES) if (
          penalty) else 0.0

    direct = _run_direct(weights, factors, params, loss, penalty=extra)
    for got, want in zip(trajectory, direct):
      for k in params:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-9, atol=1e-11)
    moved = max(float(jnp.max(jnp.abs(trajectory[-1][k] - params[k])))
                for k in MATRICES)
    assert moved > 1e-3  # the test trains something
    np.testing.assert_array_equal(trajectory[-1]['b'], params['b'])


def _svd(w):
  u, s, vt = np.linalg.svd(np.asarray(w, np.float64), full_matrices=True)
  return u, s, vt.T


def test_svfit_update_is_diagonal_in_the_top_singular_vectors():
  params, loss = _problem()
  trajectory, _, _ = _run(svfit_lib.svfit(LR, 3), params, loss, steps=10)
  for k in MATRICES:
    u, _, v = _svd(params[k])
    delta = np.asarray(trajectory[-1][k] - params[k], np.float64)
    core = u.T @ delta @ v  # m x n in the full singular bases
    diagonal = np.diag(np.diag(core[:3, :3]))
    assert np.min(np.abs(np.diag(core[:3, :3]))) > 1e-4
    off = core.copy()
    off[:3, :3] -= diagonal
    assert np.max(np.abs(off)) < 1e-5 * np.max(np.abs(core))


def test_svfit_energy_rank_keeps_99_percent_of_the_squared_spectrum():
  s = np.array([10.0, 5.0, 1.0, 0.5, 0.1])
  w = jnp.asarray(np.diag(s))
  state = svfit_lib.svfit(LR).init({'w': w})
  share = np.cumsum(s ** 2) / np.sum(s ** 2)
  want = int(np.argmax(share >= 0.99)) + 1
  assert state.factors['w']['s'].shape == (want,)
  assert svfit_lib.svfit(LR, energy=0.5).init({'w': w}).factors['w'][
      's'].shape == (1,)


def test_svfit_energy_rank_needs_concrete_weights():
  tx = svfit_lib.svfit(LR)
  with pytest.raises(ValueError, match=r"\['w'\].*rank='energy'.*jit"):
    jax.jit(tx.init)({'w': jnp.eye(4)})


def test_salt_relu_zeroes_an_entry_driven_negative():
  w = jnp.asarray(np.diag([4.0, 3.0, 2.0, 1.0]))
  factorization = salt_lib.salt_factorization(2, 1)
  factors, frozen = factorization.init(w, jax.random.key(0), 'w')
  factors['shift'] = factors['shift'].at[0].set(-10.0)  # 4·1 - 10 < 0
  rebuilt = factorization.reconstruct(factors, frozen)
  u, v = frozen['u'], frozen['v']
  assert abs(float(u[:, 0] @ rebuilt @ v[:, 0])) == 0.0
  np.testing.assert_allclose(u[:, 1] @ rebuilt @ v[:, 1], 3.0, rtol=1e-6)
  # No gradient reaches the clipped entry; the other one gets its own.
  g = jax.grad(lambda f: jnp.sum(factorization.reconstruct(f, frozen) * w))(
      factors)
  assert float(g['shift'][0]) == 0.0 and float(g['shift'][1]) != 0.0


def test_salt_top_block_stays_diagonal_and_split_from_the_rest():
  params, loss = _problem()
  trajectory, first, _ = _run(salt_lib.salt(LR, 0.25, 3), params, loss, 20)
  for k in MATRICES:
    u, v = first.frozen[k]['u'], first.frozen[k]['v']
    r = first.factors[k]['scale'].shape[0]
    core = np.asarray(u.T @ trajectory[-1][k] @ v, np.float64)
    base = np.asarray(u.T @ params[k] @ v, np.float64)
    top = core[:r, :r]
    scale = np.max(np.abs(core))
    assert np.max(np.abs(top - np.diag(np.diag(top)))) < 1e-5 * scale
    assert np.max(np.abs(core[:r, r:])) < 1e-5 * scale
    assert np.max(np.abs(core[r:, :r])) < 1e-5 * scale
    rest = core[r:, r:] - base[r:, r:]
    assert np.max(np.abs(rest - np.diag(np.diag(rest)))) > 1e-5  # XY moved


def test_salt_clamps_the_lora_rank_with_a_warning_naming_the_leaf():
  with pytest.warns(so.continual.RankClampedWarning, match=r"\[.w2.\].*lora_rank=256.*clamped"):
    state = salt_lib.salt(LR).init(_problem()[0])
  assert state.factors['w2']['x'].shape == (5, 5)  # k=6, r=round(0.6)=1


@pytest.mark.parametrize('constraint', [None, 'orthogonal'])
def test_effort_keeps_the_principal_part(constraint):
  params, loss = _problem()
  trajectory, first, last = _run(
      effort_lib.effort(LR, 2, constraint=constraint), params, loss, 20)
  for k in MATRICES:
    u, s, v = _svd(params[k])
    kk = min(params[k].shape)
    main = u[:, :kk - 2] @ np.diag(s[:kk - 2]) @ v[:, :kk - 2].T
    f = last.factors[k]
    residual = np.asarray(f['u'] @ jnp.diag(f['s']) @ f['v'].T, np.float64)
    np.testing.assert_allclose(
        np.asarray(trajectory[-1][k], np.float64) - main, residual, atol=1e-5)
    assert np.max(np.abs(residual - (
        np.asarray(params[k], np.float64) - main))) > 1e-3
    for a, b in zip(jax.tree.leaves(first.frozen[k]),
                    jax.tree.leaves(last.frozen[k])):
      np.testing.assert_array_equal(a, b)  # bit-identical
  if constraint is not None:
    assert first.frozen['w1']['u'].shape == (12, 6)


def test_effort_penalty_is_zero_at_init_and_grows_off_orthonormal():
  params, _ = _problem()
  factorization = effort_lib.effort_factorization(
      1, constraint='orthogonal')
  f, c = factorization.init(params['w1'], jax.random.key(0), 'w1')
  assert float(factorization.penalty(f, c)) < 1e-4
  moved = dict(f, u=f['u'] * 1.5)
  assert float(factorization.penalty(moved, c)) > 1.0
  rebuilt = c['u'] @ jnp.diag(c['s']) @ c['v'].T + f['u'] @ jnp.diag(
      f['s']) @ f['v'].T
  np.testing.assert_allclose(jnp.sum(rebuilt ** 2), c['norm_sq'], rtol=1e-5)


@pytest.mark.parametrize('name,end', [('milora', 'bottom'), ('pissa', 'top')])
def test_svd_lora_factors_span_their_end_of_the_spectrum(name, end):
  params, _ = _problem()
  tx = getattr(milora_lib, name)(LR, 3)
  state = tx.init(params)
  for k in MATRICES:
    u, s, v = _svd(params[k])
    kk = min(params[k].shape)
    part = slice(0, 3) if end == 'top' else slice(kk - 3, kk)
    other = slice(3, None) if end == 'top' else slice(0, kk - 3)
    down = np.asarray(state.factors[k]['down'], np.float64)
    up = np.asarray(state.factors[k]['up'], np.float64)
    # Columns of `down` lie in span(U_part), none in the other end.
    assert np.linalg.norm(u[:, other].T @ down) < 1e-5
    assert np.linalg.norm(up @ v[:, other]) < 1e-5
    want = u[:, part] @ np.diag(s[part]) @ v[:, part].T
    np.testing.assert_allclose(down @ up, want, atol=1e-5)
    # Balanced: both factors carry Σ^½.
    np.testing.assert_allclose(np.linalg.norm(down, axis=0),
                               np.sqrt(s[part]), rtol=1e-5)


def test_lora_starts_at_zero_adapter_with_kaiming_down():
  params, _ = _problem()
  state = lora_lib.lora(LR, 4, alpha=8.0).init(params)
  for k in MATRICES:
    m = params[k].shape[0]
    down, up = state.factors[k]['down'], state.factors[k]['up']
    assert float(jnp.max(jnp.abs(up))) == 0.0
    assert 0.5 / np.sqrt(m) < float(jnp.max(jnp.abs(down))) <= 1 / np.sqrt(m)
  factorization = lora_lib.lora_factorization(4, alpha=8.0)
  f = {'down': jnp.ones((5, 4)), 'up': jnp.ones((4, 3))}
  np.testing.assert_allclose(factorization.reconstruct(f, {}), 8.0 * jnp.ones(
      (5, 3)))  # (α/r) · 4


def _state_bytes(state):
  return sum(x.nbytes for x in jax.tree.leaves(state))


def test_state_sizes_are_analytic():
  params, _ = _problem()
  shapes = [(12, 8), (8, 6)]
  count = 4  # AdamW's int32 step count
  r = 3
  # SVFit: s and two moments (3r), frozen U_r (m r) and V_r (n r).
  want = sum(3 * r + (m + n) * r for m, n in shapes)
  assert _state_bytes(svfit_lib.svfit(LR, r).init(params)) == 4 * want + count
  # SALT: α, β (2r) and X, Y (2 (k-r) q), times three with the moments;
  # frozen U (m k), σ (k), V (n k).
  want = 0
  for m, n in shapes:
    k = min(m, n)
    rr, q = round(0.25 * k), 3
    want += 3 * (2 * rr + 2 * (k - rr) * q) + m * k + k + n * k
  tx = salt_lib.salt(LR, 0.25, 3)
  assert _state_bytes(tx.init(params)) == 4 * want + count
  # Effort: U_res, s, V_res and two moments; nothing frozen.
  want = sum(3 * (m + n + 1) * 2 for m, n in shapes)
  assert _state_bytes(effort_lib.effort(LR, 2).init(params)) == (
      4 * want + count)
  # MiLoRA, PiSSA, LoRA: down (m r) and up (r n), three times.
  want = sum(3 * (m + n) * r for m, n in shapes)
  for tx in (milora_lib.milora(LR, r), milora_lib.pissa(LR, r),
             lora_lib.lora(LR, r)):
    assert _state_bytes(tx.init(params)) == 4 * want + count


@pytest.mark.parametrize('make', [
    lambda: svfit_lib.svfit(LR, 9),
    lambda: salt_lib.salt(LR, 9),
    lambda: effort_lib.effort(LR, 9),
    lambda: milora_lib.milora(LR, 9),
    lambda: milora_lib.pissa(LR, 9),
    lambda: lora_lib.lora(LR, 9),
])
def test_rank_above_the_matrix_names_the_leaf(make):
  with pytest.raises(ValueError, match=r"\['w1'\].*`rank`=9.*min\(m, n\)=8"):
    make().init(_problem()[0])


def test_non_finite_weight_names_the_leaf():
  params, _ = _problem()
  params['w2'] = params['w2'].at[1, 2].set(jnp.nan)
  with pytest.raises(ValueError, match=r"\['w2'\].*1 non-finite"):
    milora_lib.milora(LR, 2).init(params)
