"""Storage dtypes (``mu_dtype``, ``basis_dtype``) and projection precision."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import subspace_optax as so
from subspace_optax._src.bases import base as bases_lib
from subspace_optax._src.bases import singular
from subspace_optax._src.pipeline import precision as precision_lib

BF16 = jnp.bfloat16
# bfloat16 keeps 8 bits of mantissa: relative rounding 2⁻⁹ ≈ 2e-3.
BF16_RTOL = 2e-2
PRESETS = (so.galore, so.golore, so.i3s, so.fira, so.frugal)


def _params():
  return {'w': jnp.zeros((16, 8)), 'b': jnp.zeros(8)}


def _gapped_gradient(shape=(16, 8), rank=2, seed=0):
  """``U diag(σ) Vᵀ`` with σ = (8, 6, 0.1, 0.09, ...): a gap after ``rank``."""
  m, n = shape
  rng = np.random.default_rng(seed)
  u = np.linalg.qr(rng.standard_normal((m, n)))[0]
  v = np.linalg.qr(rng.standard_normal((n, n)))[0]
  sigma = np.concatenate([[8.0, 6.0], 0.1 * 0.9 ** np.arange(n - rank)])
  return jnp.asarray((u * sigma) @ v.T, jnp.float32), u[:, :rank]


def _gradients(steps=3, seed=0):
  rng = np.random.default_rng(seed)
  return [{'w': jnp.asarray(_gapped_gradient(seed=seed + t)[0]
                            + 0.01 * rng.standard_normal((16, 8)),
                            jnp.float32),
           'b': jnp.asarray(rng.standard_normal(8), jnp.float32)}
          for t in range(steps)]


def _run(tx, grads):
  state = tx.init(_params())
  update = jax.jit(tx.update)
  outs = []
  for g in grads:
    u, state = update(g, state, _params())
    outs.append(u)
  return outs, state


def _subspace_state(state):
  """The :class:`SubspaceState` at the head of a preset's chain."""
  return state[0]


def _cosines(a, b):
  """Cosines of the principal angles between ``span(a)`` and ``span(b)``."""
  qa = np.linalg.qr(np.asarray(a, np.float64))[0]
  qb = np.linalg.qr(np.asarray(b, np.float64))[0]
  return np.linalg.svd(qa.T @ qb, compute_uv=False)


# ----------------------------------------------------------------- mu_dtype


@pytest.mark.parametrize('torch_formula', [True, False])
def test_mu_dtype_stores_the_first_moment_only(torch_formula):
  grads = _gradients()
  kwargs = dict(rank=2, refresh=2, eps_before_bias_correction=torch_formula)
  ref, ref_state = _run(so.galore(1e-2, **kwargs), grads)
  low, state = _run(so.galore(1e-2, mu_dtype=BF16, **kwargs), grads)
  inner = _subspace_state(state).inner_state
  assert {x.dtype for x in jax.tree.leaves(inner.mu)} == {jnp.dtype(BF16)}
  assert {x.dtype for x in jax.tree.leaves(inner.nu)} == {
      jnp.dtype(jnp.float32)}
  # Resume: the state has the float32 state's structure and shapes.
  assert jax.tree.structure(state) == jax.tree.structure(ref_state)
  assert [x.shape for x in jax.tree.leaves(state)] == [
      x.shape for x in jax.tree.leaves(ref_state)]
  for a, b in zip(jax.tree.leaves(low), jax.tree.leaves(ref)):
    np.testing.assert_allclose(a, b, rtol=BF16_RTOL, atol=1e-5)


@pytest.mark.parametrize('adam', [
    so.transforms.scale_by_torch_adam, so.transforms.scale_by_adam_moments,
    so.transforms.scale_by_resettable_adam])
def test_mu_dtype_takes_the_step_from_the_float32_moment(adam):
  """As optax: the moment is rounded on store, not before the step, so the
  first update equals the float32 one exactly."""
  g = jnp.asarray(np.random.default_rng(0).standard_normal((4, 3)) / 3,
                  jnp.float32)
  ref, low = adam(), adam(mu_dtype=BF16)
  u_ref, s_ref = ref.update(g, ref.init(g))
  u_low, s_low = low.update(g, low.init(g))
  np.testing.assert_array_equal(u_low, u_ref)
  np.testing.assert_array_equal(s_low.mu, s_ref.mu.astype(BF16))
  assert s_low.nu.dtype == jnp.float32
  with pytest.raises(ValueError, match='`mu_dtype`'):
    adam(mu_dtype=jnp.int8)


@pytest.mark.parametrize('factory, options', [
    (so.fira, {}),
    # The sign residual is discontinuous: a bf16 basis flips the sign of
    # near-zero residual entries, so compare the continuous SGD residual.
    (so.frugal, {'residual': 'sgd'}),
])
def test_bf16_state_of_fira_and_frugal_matches_float32(factory, options):
  grads = _gradients()
  ref, _ = _run(factory(1e-2, 2, refresh=2, **options), grads)
  low, _ = _run(factory(1e-2, 2, refresh=2, mu_dtype=BF16, basis_dtype=BF16,
                        **options), grads)
  for a, b in zip(jax.tree.leaves(low), jax.tree.leaves(ref)):
    np.testing.assert_allclose(a, b, rtol=5e-2, atol=1e-4)


# -------------------------------------------------------------- basis_dtype


@pytest.mark.parametrize('basis', ['svd', 'randomized'])
def test_bf16_basis_is_stored_in_bf16_and_spans_the_top_subspace(basis):
  g, top = _gapped_gradient()
  grads = {'w': g, 'b': jnp.ones(8)}
  tx = so.low_rank(so.transforms.scale_by_torch_adam(), rank=2, refresh=5,
                   basis=basis, basis_dtype=BF16, side='compact')
  updates, state = tx.update(grads, tx.init(_params()))
  q = state.basis['w']
  assert q.dtype == BF16 and q.shape == (16, 2)
  assert state.basis['b'] == optax.MaskedNode()
  # The top-2 subspace: principal angles with the exact one are small.
  assert np.min(_cosines(q.astype(jnp.float32), top)) > 1 - 1e-3
  # The update lies in span(Q): U = QN with the stored (rounded) Q.
  q64 = np.asarray(q, np.float64)
  u = np.asarray(updates['w'], np.float64)
  outside = u - q64 @ np.linalg.lstsq(q64, u, rcond=None)[0]
  assert np.linalg.norm(outside) < 1e-5 * np.linalg.norm(u)
  # The same basis as in float32, to bfloat16 rounding.
  ref = so.low_rank(so.transforms.scale_by_torch_adam(), rank=2, refresh=5,
                    basis=basis, side='compact')
  _, ref_state = ref.update(grads, ref.init(_params()))
  np.testing.assert_allclose(q.astype(jnp.float32), ref_state.basis['w'],
                             atol=1e-2)


def test_bf16_basis_refresh_aligns_signs_and_transitions_in_float32():
  g, _ = _gapped_gradient()
  method = precision_lib.with_precision(singular.svd(), basis_dtype=BF16)
  fresh = method.refresh(g, method.init(16, 8, 2), jax.random.key(0), False)
  old = -fresh  # the same subspace, every column flipped
  new = method.refresh(g, old, jax.random.key(0), True)
  assert new.dtype == BF16
  np.testing.assert_array_equal(new, old)  # flipped back to agree with old
  transition = method.transition(old, new)
  assert transition.dtype == jnp.float32
  np.testing.assert_allclose(transition, np.eye(2), atol=1e-2)
  # Without alignment the flip shows in the transition.
  np.testing.assert_allclose(method.transition(fresh, old), -np.eye(2),
                             atol=1e-2)


def test_bf16_basis_with_transport_matches_float32():
  grads = _gradients(4)
  kwargs = dict(rank=2, refresh=1, on_refresh='transport')
  ref, _ = _run(so.galore(1e-2, **kwargs), grads)
  low, _ = _run(so.galore(1e-2, basis_dtype=BF16, **kwargs), grads)
  for a, b in zip(jax.tree.leaves(low), jax.tree.leaves(ref)):
    np.testing.assert_allclose(a, b, rtol=5e-2, atol=1e-4)


def test_integer_basis_states_are_untouched():
  tx = so.low_rank(optax.identity(), rank=2, basis='random_columns',
                   basis_dtype=BF16, side='compact')
  state = tx.init(_params())
  plain = so.low_rank(optax.identity(), rank=2, basis='random_columns', side='compact')
  g = _gradients(1)[0]
  updates, state = tx.update(g, state)
  expected, plain_state = plain.update(g, plain.init(_params()))
  assert [x.dtype for x in jax.tree.leaves(state.basis['w'])] == [jnp.int32]
  np.testing.assert_array_equal(state.basis['w'].indices,
                                plain_state.basis['w'].indices)
  np.testing.assert_array_equal(updates['w'], expected['w'])


def test_state_bytes_of_bf16_galore_match_the_formula():
  params = {'w': jnp.zeros((8, 6)), 'stack': jnp.zeros((3, 12, 4)),
            'b': jnp.zeros(6)}
  dimension_numbers = so.last_two_axes  # stack: 3 matrices of 12 x 4
  tx = so.galore(1e-3, 2, mu_dtype=BF16, basis_dtype=BF16,
                 dimension_numbers=dimension_numbers, side='compact')
  measured = so.state_bytes(tx.init(params))
  # w: basis 8·2, mu and nu 2·6 each; stack: 3 x (basis 12·2, mu and nu 2·4
  # each); b: mu and nu 6 each. Basis and mu take 2 bytes an entry, nu 4;
  # plus two refresh schedules (2 int32 each) and two int32 counts.
  bf16_entries = (8 * 2 + 2 * 6) + 3 * (12 * 2 + 2 * 4) + 6
  f32_entries = 2 * 6 + 3 * 2 * 4 + 6
  expected = 2 * bf16_entries + 4 * f32_entries + 2 * 8 + 2 * 4
  assert measured == expected
  assert so.state_sizes.galore_bytes(
      params, 2, dimension_numbers=dimension_numbers, mu_bytes=2,
      basis_bytes=2, side='compact') == expected


@pytest.mark.parametrize('factory, formula, options', [
    (so.fira, so.state_sizes.fira_bytes, {}),
    (so.frugal, so.state_sizes.frugal_bytes, {}),
    (so.frugal, so.state_sizes.frugal_bytes, {'basis': 'columns'}),
])
def test_state_bytes_of_bf16_fira_and_frugal_match_their_formulas(
    factory, formula, options):
  params = {'w': jnp.zeros((8, 6)), 'stack': jnp.zeros((3, 12, 4)),
            'b': jnp.zeros(6)}
  kwargs = dict(dimension_numbers=so.last_two_axes, **options)
  state = factory(1e-3, 2, mu_dtype=BF16, basis_dtype=BF16, **kwargs).init(
      params)
  plain = factory(1e-3, 2, **kwargs).init(params)
  assert so.state_bytes(state) == formula(
      params, 2, mu_bytes=2, basis_bytes=2, **kwargs)
  assert so.state_bytes(plain) == formula(params, 2, **kwargs)
  assert so.state_bytes(state) < so.state_bytes(plain)


# ---------------------------------------------------------------- precision


def test_highest_precision_matches_the_default_on_cpu():
  grads = _gradients()
  ref, _ = _run(so.galore(1e-2, rank=2, refresh=2, side='compact'), grads)
  for precision in ('highest', jax.lax.Precision.HIGHEST, 'default'):
    out, _ = _run(so.galore(1e-2, rank=2, refresh=2, precision=precision, side='compact'),
                  grads)
    for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(ref)):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_precision_reaches_the_projections_only():
  """``'high'`` appears on the projection matmuls; refresh keeps HIGHEST."""
  grads = _gradients(1)[0]

  def dot_precisions(precision):
    tx = so.low_rank(optax.identity(), rank=2, basis='randomized',
                     precision=precision, side='compact')
    text = str(jax.make_jaxpr(tx.update)(grads, tx.init(_params())))
    return text.count('Precision.HIGH,'), text.count('Precision.HIGHEST,')

  high, highest = dot_precisions('high')
  assert high == 2  # C = QᵀG and QN
  assert highest == dot_precisions(None)[1] > 0
  assert dot_precisions(None)[0] == 0


def test_precision_does_not_retrace():
  traces = []
  tx = so.galore(1e-2, rank=2, refresh=1, precision='highest',
                 basis_dtype=BF16, mu_dtype=BF16, side='compact')

  @jax.jit
  def step(g, state):
    traces.append(1)
    return tx.update(g, state, _params())

  state = tx.init(_params())
  for g in _gradients(3):
    _, state = step(g, state)
  assert len(traces) == 1


# ------------------------------------------------------------------- errors


@pytest.mark.parametrize('name, value', [
    ('mu_dtype', jnp.int8), ('mu_dtype', 'not a dtype'),
    ('basis_dtype', jnp.int32), ('basis_dtype', jnp.bool_),
    ('precision', 'fastest'), ('precision', 3),
])
@pytest.mark.parametrize('factory', PRESETS)
def test_invalid_values_name_the_argument(factory, name, value):
  with pytest.raises(ValueError, match=f'`{name}`'):
    factory(1e-3, 2, **{name: value})


def test_low_rank_invalid_values_name_the_argument():
  with pytest.raises(ValueError, match='`basis_dtype`'):
    so.low_rank(optax.identity(), rank=2, basis_dtype=jnp.int8, side='compact')
  with pytest.raises(ValueError, match='`precision`'):
    so.low_rank(optax.identity(), rank=2, precision='HIGHEST!', side='compact')
  with pytest.raises(ValueError, match='`mu_dtype`'):
    so.transforms.scale_by_torch_adam(mu_dtype=jnp.uint8)


# ---------------------------------------------------------- static args


@pytest.mark.parametrize('factory', PRESETS)
def test_new_arguments_are_static_under_inject_hyperparams(factory):
  static = so.static_args(factory)
  assert {'mu_dtype', 'basis_dtype', 'precision'} <= set(static)
  tx = optax.inject_hyperparams(factory, static_args=static)(
      learning_rate=1e-2, rank=2, mu_dtype=BF16, basis_dtype=BF16,
      precision='highest')
  state = tx.init(_params())
  _, state = tx.update(_gradients(1)[0], state, _params())
  subspace = state.inner_state[0]
  assert subspace.basis['w'].dtype == BF16
  assert subspace.inner_state.mu['w'].dtype == BF16
  assert set(so.static_args(so.low_rank)) >= {'basis_dtype', 'precision'}


def test_dense_projections_accumulate_bf16_operands_in_float32():
  rng = np.random.default_rng(0)
  q = jnp.asarray(rng.standard_normal((64, 3)), BF16)
  g = jnp.asarray(rng.standard_normal((64, 5)), BF16)  # exact in bf16
  c = bases_lib.dense_project(g.astype(jnp.float32), q)
  assert c.dtype == jnp.float32
  exact = np.asarray(q, np.float64).T @ np.asarray(g, np.float64)
  np.testing.assert_allclose(c, exact, rtol=1e-5, atol=1e-5)
  back = bases_lib.dense_unproject(c.astype(BF16).astype(jnp.float32), q)
  assert back.dtype == jnp.float32
