"""Tests of orthogonal_to and its memory: the invariant on the applied update."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import subspace_optax as so
from subspace_optax._src.continual import protected
from subspace_optax import continual as cl


def _params():
  keys = jax.random.split(jax.random.key(0), 3)
  return {
      'w': jax.random.normal(keys[0], (12, 8)),
      'stack': jax.random.normal(keys[1], (2, 6, 10)),  # stacked layers
      'b': jnp.ones((8,)),  # not a matrix
  }


def _gradients(seed, params):
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return treedef.unflatten(
      [jax.random.normal(k, p.shape) for k, p in zip(keys, leaves)])


def _orthonormal(key, shape, count):
  """Orthonormal columns (..., k, count) zero-padded to shape[-1] columns."""
  q, _ = jnp.linalg.qr(jax.random.normal(key, shape[:-1] + (count,)))
  return jnp.concatenate(
      [q, jnp.zeros(shape[:-1] + (shape[-1] - count,))], axis=-1)


def _memory(params, mode='two_sided'):
  """A memory with 3 (w) / 2 (stack) random protected directions per side."""
  memory = cl.empty_memory(params, mode=mode, capacity=4,
                           dimension_numbers=so.last_two_axes)
  keys = iter(jax.random.split(jax.random.key(7), 8))
  new = {}
  for name, count in (('w', 3), ('stack', 2)):
    mem = memory[name]
    fields = {}
    for side in ('left', 'right'):
      basis = getattr(mem, side)
      if isinstance(basis, optax.MaskedNode):
        fields[side] = fields[side + '_count'] = optax.MaskedNode()
        continue
      fields[side] = _orthonormal(next(keys), basis.shape, count)
      fields[side + '_count'] = jnp.full(basis.shape[:-2], count, jnp.int32)
    new[name] = cl.ProtectedSubspace(**fields)
  new['b'] = optax.MaskedNode()
  return cl.add_directions(memory, new)


def _views(tree):
  """Leaf -> (batch, m, n) float64 numpy views."""
  return {'w': np.asarray(tree['w'], np.float64)[None],
          'stack': np.asarray(tree['stack'], np.float64)}


def _leaks(update, memory):
  """Largest relative |UᵀΔ|, |ΔV| and |UᵀΔV| over the matrix leaves."""
  out = {'left': 0.0, 'right': 0.0, 'block': 0.0}
  for name, delta in _views(update).items():
    mem = memory[name]
    norm = np.linalg.norm(delta)
    u = None if isinstance(mem.left, optax.MaskedNode) else np.asarray(
        mem.left, np.float64).reshape(delta.shape[:1] + mem.left.shape[-2:])
    v = None if isinstance(mem.right, optax.MaskedNode) else np.asarray(
        mem.right, np.float64).reshape(delta.shape[:1] + mem.right.shape[-2:])
    if u is not None:
      out['left'] = max(out['left'], np.linalg.norm(
          np.einsum('bmc,bmn->bcn', u, delta)) / norm)
    if v is not None:
      out['right'] = max(out['right'], np.linalg.norm(
          np.einsum('bmn,bnc->bmc', delta, v)) / norm)
    if u is not None and v is not None:
      out['block'] = max(out['block'], np.linalg.norm(
          np.einsum('bmc,bmn,bnd->bcd', u, delta, v)) / norm)
  return out


@pytest.mark.parametrize('inner', ['adam', 'adamw'])
@pytest.mark.parametrize('mode', ['two_sided', 'left', 'right', 'block'])
def test_final_update_is_orthogonal_after_adam_and_weight_decay(inner, mode):
  params = _params()
  memory = _memory(params, 'two_sided' if mode == 'block' else mode)
  base = (optax.adam(1e-2) if inner == 'adam'
          else optax.adamw(1e-2, weight_decay=0.5))
  tx = optax.chain(base, cl.orthogonal_to(
      memory, mode=mode, dimension_numbers=so.last_two_axes))
  state, base_state = tx.init(params), base.init(params)
  update = jax.jit(tx.update)
  for step in range(4):
    grads = _gradients(step, params)
    updates, state = update(grads, state, params)
    plain, base_state = base.update(grads, base_state, params)
    leaks = _leaks(updates, memory)
    if mode in ('two_sided', 'left'):
      assert leaks['left'] <= 1e-6
    if mode in ('two_sided', 'right'):
      assert leaks['right'] <= 1e-6
    if mode == 'block':
      assert leaks['block'] <= 1e-6
      assert leaks['left'] > 1e-2  # only the protected block is removed
    # Not trivially zero, and the non-matrix leaf passes through untouched.
    assert float(jnp.linalg.norm(updates['w'])) > 1e-3
    np.testing.assert_allclose(updates['b'], plain['b'], rtol=1e-5, atol=1e-8)
    params = optax.apply_updates(params, updates)


def test_masking_the_gradient_before_adam_leaks():
  """Why the stage goes last: Adam does not commute with the projection."""
  params = _params()
  memory = _memory(params)
  before = optax.chain(
      cl.orthogonal_to(memory, dimension_numbers=so.last_two_axes),
      optax.adamw(1e-2, weight_decay=0.5))
  after = optax.chain(
      optax.adamw(1e-2, weight_decay=0.5),
      cl.orthogonal_to(memory, dimension_numbers=so.last_two_axes))
  leak = {}
  for name, tx in (('before', before), ('after', after)):
    state = tx.init(params)
    for step in range(3):
      updates, state = tx.update(_gradients(step, params), state, params)
    leak[name] = max(_leaks(updates, memory)['left'],
                     _leaks(updates, memory)['right'])
  assert leak['before'] > 1e-2
  assert leak['after'] < 1e-6


@pytest.mark.parametrize('mode', ['two_sided', 'block'])
def test_projection_matches_the_formula(mode):
  params = _params()
  memory = _memory(params)
  grads = _gradients(3, params)
  tx = cl.orthogonal_to(memory, mode=mode, dimension_numbers=so.last_two_axes)
  out, _ = tx.update(grads, tx.init(params), params)
  for name, g in _views(grads).items():
    mem = memory[name]
    u = np.asarray(mem.left, np.float64).reshape(g.shape[:1] + mem.left.shape[-2:])
    v = np.asarray(mem.right, np.float64).reshape(
        g.shape[:1] + mem.right.shape[-2:])
    for b in range(g.shape[0]):
      pu, pv = u[b] @ u[b].T, v[b] @ v[b].T
      if mode == 'two_sided':
        want = (np.eye(len(pu)) - pu) @ g[b] @ (np.eye(len(pv)) - pv)
      else:
        want = g[b] - pu @ g[b] @ pv
      np.testing.assert_allclose(_views(out)[name][b], want, atol=1e-5)
  np.testing.assert_array_equal(out['b'], grads['b'])


def test_empty_memory_is_the_identity():
  params = _params()
  tx = cl.orthogonal_to(dimension_numbers=so.last_two_axes)
  grads = _gradients(1, params)
  out, _ = tx.update(grads, tx.init(params), params)
  chex.assert_trees_all_close(out, grads, atol=0)


def test_memory_that_does_not_fit_names_the_leaf():
  params = _params()
  wrong = cl.empty_memory({**params, 'w': jnp.ones((5, 8))}, capacity=2,
                          dimension_numbers=so.last_two_axes)
  with pytest.raises(ValueError, match=r"\['w'\].*left"):
    cl.orthogonal_to(wrong, dimension_numbers=so.last_two_axes).init(params)
  tx = cl.orthogonal_to(capacity=2, dimension_numbers=so.last_two_axes)
  state = tx.init(params)
  with pytest.raises(ValueError, match=r"\['w'\]"):
    cl.set_memory(state, wrong)
  with pytest.raises(ValueError, match='mode'):
    left_only = cl.orthogonal_to(
        mode='left', capacity=2, dimension_numbers=so.last_two_axes)
    cl.set_memory(left_only.init(params), cl.empty_memory(
        params, capacity=2, dimension_numbers=so.last_two_axes))


def test_add_directions_orthonormalises_drops_and_counts():
  params = {'w': jnp.zeros((6, 4))}
  memory = cl.empty_memory(params, mode='left', capacity=4)
  e = jnp.eye(6)
  candidates = jnp.stack([e[0], e[0] + e[1], 2 * e[0], e[2] + 1e-7 * e[3]], 1)
  new = {'w': cl.ProtectedSubspace(candidates, optax.MaskedNode(),
                                   jnp.array(4), optax.MaskedNode())}
  grown = cl.add_directions(memory, new)
  left = np.asarray(grown['w'].left)
  assert int(grown['w'].left_count) == 3  # 2*e0 is already protected
  np.testing.assert_allclose(left.T @ left, np.diag([1, 1, 1, 0]), atol=1e-6)
  np.testing.assert_allclose(np.abs(left[:, :3]), np.eye(6)[:, :3], atol=1e-6)
  # Adding the same directions again changes nothing.
  again = cl.add_directions(grown, new)
  np.testing.assert_array_equal(again['w'].left, grown['w'].left)
  assert int(again['w'].left_count) == 3


def test_add_directions_reports_overflow():
  params = {'w': jnp.zeros((6, 4))}
  memory = cl.empty_memory(params, mode='left', capacity=2)
  new = {'w': cl.ProtectedSubspace(jnp.eye(6)[:, :3], optax.MaskedNode(),
                                   jnp.array(3), optax.MaskedNode())}
  with pytest.raises(ValueError, match=r"\['w'\].*needs 3 directions.*capacity is 2"):
    cl.add_directions(memory, new)
  with pytest.warns(RuntimeWarning, match='capacity'):
    kept = cl.add_directions(memory, new, on_overflow='warn')
  assert int(kept['w'].left_count) == 2
  np.testing.assert_allclose(np.abs(kept['w'].left), np.eye(6)[:, :2], atol=1e-6)


def test_set_memory_fits_a_compact_memory_and_replaces():
  params = _params()
  tx = cl.orthogonal_to(capacity=5, dimension_numbers=so.last_two_axes)
  state = tx.init(params)
  compact = _memory(params)
  state = cl.set_memory(state, compact)
  stored = cl.get_memory(state)
  assert stored['w'].left.shape == (12, 5)
  assert int(stored['w'].left_count) == 3
  np.testing.assert_allclose(stored['w'].left[:, :3], compact['w'].left[:, :3],
                             atol=1e-6)
  # Replacing with an empty memory clears it.
  state = cl.set_memory(state, protected.clear(compact))
  assert int(cl.get_memory(state)['w'].left_count) == 0


def test_no_retrace_when_the_memory_changes():
  params = _params()
  tx = optax.chain(optax.adam(1e-2), cl.orthogonal_to(
      capacity=4, dimension_numbers=so.last_two_axes))
  state = tx.init(params)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def step(grads, state, params):
    return tx.update(grads, state, params)

  first, state = step(_gradients(0, params), state, params)
  state = cl.set_memory(state, _memory(params))
  second, state = step(_gradients(0, params), state, params)
  assert _leaks(second, cl.get_memory(state))['left'] < 1e-6
  assert _leaks(first, cl.get_memory(state))['left'] > 1e-2
  # optax.tree.set also works when the shapes are identical.
  state = optax.tree.set(state, memory=protected.clear(cl.get_memory(state)))
  step(_gradients(0, params), state, params)


def test_orbax_round_trip_is_exact(tmp_path):
  ocp = pytest.importorskip('orbax.checkpoint')
  params = _params()
  tx = cl.sculpt(1e-2, weight_decay=0.1, dimension_numbers=so.last_two_axes)
  state = tx.init(params)
  state = cl.set_memory(state, cl.sculpt_memory(
      params, dimension_numbers=so.last_two_axes))
  state = tx.update(_gradients(0, params), state, params)[1]
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(tmp_path / 'state', state)
    checkpointer.wait_until_finished()
    restored = checkpointer.restore(
        tmp_path / 'state', jax.eval_shape(tx.init, params))
  assert jax.tree.structure(restored) == jax.tree.structure(state)
  chex.assert_trees_all_equal(restored, state)


def test_works_inside_nnx_optimizer():
  nnx = pytest.importorskip('flax.nnx')
  model = nnx.Linear(6, 4, use_bias=True, rngs=nnx.Rngs(0))
  optimizer = nnx.Optimizer(
      model, optax.chain(optax.adam(1e-1), cl.orthogonal_to(mode='left',
                                                            capacity=3)),
      wrt=nnx.Param)
  memory = cl.get_memory(optimizer.opt_state)
  protected = jnp.eye(6)[:, :2]
  new = jax.tree.map(
      lambda m: cl.ProtectedSubspace(protected, optax.MaskedNode(),
                                     jnp.array(2), optax.MaskedNode())
      if isinstance(m, cl.ProtectedSubspace) else m,
      memory, is_leaf=lambda m: isinstance(m, (cl.ProtectedSubspace,
                                              optax.MaskedNode)))
  optimizer.opt_state = cl.set_memory(optimizer.opt_state, new)
  before = model.kernel[...]
  grads = nnx.grad(lambda m: jnp.sum(m(jnp.ones((3, 6))) ** 2))(model)
  optimizer.update(model, grads)
  change = np.asarray(model.kernel[...] - before)
  assert np.abs(change[:2]).max() < 1e-7  # protected input rows unchanged
  assert np.abs(change[2:]).max() > 1e-3


# ------------------------------------- memories that are not orthonormal / NaN


def _edit_left(memory, name, edit):
  mem = memory[name]
  return {**memory, name: mem._replace(left=edit(mem.left))}


_NOT_ORTHONORMAL = {
    # |QᵀQ - I| measured on the first filled column: 2² - 1.
    'scaled': (lambda q: q.at[:, 0].multiply(2.0), '3'),
    # Column 1 repeats column 0: QᵀQ[0, 1] = 1.
    'duplicated': (lambda q: q.at[:, 1].set(q[:, 0]), '1'),
    # Count 3 but a fourth (unused) column is not zero.
    'beyond_count': (lambda q: q.at[:, 3].set(jnp.eye(12)[0]), '1'),
}


@pytest.mark.parametrize('kind', sorted(_NOT_ORTHONORMAL))
def test_memory_that_is_not_orthonormal_is_refused(kind):
  params = _params()
  edit, deviation = _NOT_ORTHONORMAL[kind]
  bad = _edit_left(_memory(params), 'w', edit)
  numbers = so.last_two_axes
  message = (rf"\['w'\]: the left basis of the memory is not orthonormal: "
             rf"max \|QᵀQ - I\| = {deviation}.*tolerance 0.0001"
             r".*add_directions\(continual.clear\(memory\), memory\)")
  tx = cl.orthogonal_to(capacity=4, dimension_numbers=numbers)
  state = tx.init(params)
  with pytest.raises(ValueError, match=message):
    cl.set_memory(state, bad)
  with pytest.raises(ValueError, match=message):
    cl.orthogonal_to(bad, dimension_numbers=numbers).init(params)
  # Such a memory leaks: the projection misses part of the protected span.
  delta = _gradients(3, params)['w']
  u = np.asarray(_memory(params)['w'].left)
  leaked = cl.project_out(delta, bad['w'], 'left')
  assert np.linalg.norm(u.T @ np.asarray(leaked)) > 0.1 * np.linalg.norm(
      np.asarray(delta))
  # The documented fix re-orthonormalises (and drops the duplicate).
  fixed = cl.add_directions(protected.clear(bad), bad)
  out, _ = tx.update(_gradients(3, params), cl.set_memory(state, fixed),
                     params)
  assert _leaks(out, fixed)['left'] < 1e-6


def test_memory_holding_nan_is_refused_everywhere():
  params = _params()
  bad = _edit_left(_memory(params), 'stack', lambda q: q.at[1, 0, 0].set(
      jnp.nan))
  numbers = so.last_two_axes
  message = r"\['stack'\]: the left basis of the .* 1 non-finite"
  state = cl.orthogonal_to(capacity=4, dimension_numbers=numbers).init(params)
  with pytest.raises(ValueError, match=message):
    cl.set_memory(state, bad)
  with pytest.raises(ValueError, match=message):
    cl.orthogonal_to(bad, dimension_numbers=numbers).init(params)
  # Memories re-orthonormalised into another capacity: Gram–Schmidt would
  # silently drop the NaN columns.
  new_directions = r"\['stack'\]: the left basis of the new directions"
  with pytest.raises(ValueError, match=new_directions):
    cl.add_directions(protected.clear(bad), bad)
  with pytest.raises(ValueError, match=new_directions):
    cl.set_memory(cl.orthogonal_to(
        capacity=5, dimension_numbers=numbers).init(params), bad)
  with pytest.raises(ValueError, match=new_directions):
    cl.orthogonal_to(bad, capacity=5, dimension_numbers=numbers).init(params)


def test_none_params_leaves_pass_through():
  params = {'w': _params()['w'], 'b': None}
  grads = {'w': _gradients(0, {'w': params['w']})['w'], 'b': None}
  memory = cl.empty_memory(params, capacity=3)
  assert memory['b'] is None
  for tx in (cl.orthogonal_to(), cl.sculpt(1e-2), cl.gpm(1e-2)):
    state = tx.init(params)
    out, _ = tx.update(grads, state, params)
    assert out['b'] is None and out['w'].shape == (12, 8)
  memory = cl.sculpt_memory(params, max_fraction=0.5)
  state = cl.set_memory(cl.sculpt(1e-2).init(params), memory)
  out, _ = cl.sculpt(1e-2).update(grads, state, params)
  u = np.asarray(memory['w'].left)
  assert np.linalg.norm(u.T @ np.asarray(out['w'])) < 1e-6 * np.linalg.norm(
      np.asarray(out['w']))


def test_unprotected_leaves_freeze_once_a_direction_is_protected():
  params = _params()
  grads = _gradients(1, params)
  tx = cl.orthogonal_to(mode='two_sided', capacity=4, unprotected='freeze',
                        dimension_numbers=so.last_two_axes)
  state = tx.init(params)
  updates, _ = tx.update(grads, state, params)  # nothing protected yet
  chex.assert_trees_all_close(updates, grads)
  state = cl.set_memory(state, _memory(params))
  updates, _ = tx.update(grads, state, params)
  np.testing.assert_array_equal(updates['b'], 0)
  assert float(jnp.max(jnp.abs(updates['w']))) > 0
  trained = cl.orthogonal_to(mode='two_sided', capacity=4,
                             dimension_numbers=so.last_two_axes)
  updates, _ = trained.update(grads, cl.set_memory(
      trained.init(params), _memory(params)), params)
  np.testing.assert_array_equal(updates['b'], grads['b'])


def test_unprotected_is_checked():
  with pytest.raises(ValueError, match='unprotected'):
    cl.orthogonal_to(unprotected='frozen')


def test_inner_sees_the_projected_gradient_and_its_step_is_projected():
  """orthogonal_to(inner=...): Δ = P inner(P g), one memory, inner's state
  inside; the stage also works without params-shaped extras."""
  params = _params()
  memory = _memory(params, mode='left')
  lr = 0.1
  tx = cl.orthogonal_to(memory, mode='left', inner=optax.adam(lr),
                        dimension_numbers=so.last_two_axes)
  state = tx.init(params)
  reference = optax.adam(lr)
  reference_state = reference.init(params)
  projected = lambda tree: jax.tree.map(
      lambda x, m: x if isinstance(m, optax.MaskedNode) else np.asarray(
          protected_project(x, m)), tree, memory,
      is_leaf=lambda m: isinstance(m, (cl.ProtectedSubspace,
                                       optax.MaskedNode)))
  for seed in range(3):
    grads = _gradients(seed, params)
    updates, state = tx.update(grads, state, params)
    step, reference_state = reference.update(projected(grads),
                                             reference_state, params)
    chex.assert_trees_all_close(updates, projected(step), atol=1e-6)
  # The inner moments hold only free-subspace statistics.
  chex.assert_trees_all_close(state.inner[0].mu, reference_state[0].mu,
                              atol=1e-6)
  # get/set_memory keep the inner state.
  new_state = cl.set_memory(state, cl.get_memory(state))
  chex.assert_trees_all_close(new_state.inner, state.inner)


def protected_project(x, memory):
  """(I - UUᵀ) x on the last two axes, in float64."""
  u = np.asarray(memory.left, np.float64)
  x = np.asarray(x, np.float64)
  return x - u @ (np.swapaxes(u, -1, -2) @ x)
