"""Tests of the low_rank combinator: the pipeline's defining properties."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import subspace_optax as so
from subspace_optax._src.bases import base as bases_lib
from subspace_optax._src.bases import registry
from subspace_optax._src.bases import singular
from subspace_optax._src.pipeline import layer_index
from subspace_optax._src.pipeline import layout as layout_lib
from subspace_optax._src.pipeline import per_matrix
from subspace_optax._src.pipeline import stages


def _params():
  return {
      'w': jnp.ones((24, 12)),  # compact side: rows (k = 24)
      'v': jnp.ones((8, 20)),  # compact side: columns (k = 20)
      'stack': jnp.ones((3, 10, 16)),  # stacked layers
      'b': jnp.ones((12,)),  # not projected
  }


def _gradients(seed, params):
  keys = jax.random.split(jax.random.key(seed), len(jax.tree.leaves(params)))
  leaves, treedef = jax.tree.flatten(params)
  return treedef.unflatten(
      [jax.random.normal(k, p.shape) for k, p in zip(keys, leaves)])


def _run(tx, params, steps, seed=0):
  state = tx.init(params)
  update = jax.jit(tx.update)
  outs = []
  for t in range(steps):
    u, state = update(_gradients(seed + t, params), state, params)
    outs.append(u)
  return outs, state


def test_inner_state_has_low_rank_shapes_and_masked_basis():
  tx = so.low_rank(optax.scale_by_adam(), rank=4, refresh=5,
                   dimension_numbers=so.last_two_axes, side='compact')
  state = tx.init(_params())
  mu = jax.tree.map(jnp.shape, state.inner_state.mu)
  assert mu == {'w': (4, 12), 'v': (4, 8), 'stack': (3, 4, 10), 'b': (12,)}
  assert jax.tree.map(jnp.shape, state.basis) == {
      'w': (24, 4), 'v': (20, 4), 'stack': (3, 16, 4), 'b': optax.MaskedNode()}


@pytest.mark.parametrize('basis', ['svd', 'randomized'])
@pytest.mark.parametrize('side', ['compact', 'reference'])
def test_update_lies_in_span_of_basis(basis, side):
  params = _params()
  tx = so.low_rank(optax.scale_by_adam(), rank=3, refresh=2, basis=basis,
                   side=side, dimension_numbers=so.last_two_axes)
  outs, state = _run(tx, params, 3)
  layouts = layout_lib.leaf_layouts(params, so.last_two_axes, side, 3)
  for name in ('w', 'v', 'stack'):
    lay = layouts[name]
    u = layout_lib.matrix_view(outs[-1][name], lay)
    q = state.basis[name]
    inside = jnp.einsum('...kr,...rl->...kl', q, jnp.einsum('...kr,...kl->...rl', q, u))
    assert float(jnp.abs(u - inside).max()) <= 1e-5 * float(jnp.abs(u).max())
    gram = jnp.einsum('...kr,...ks->...rs', q, q)
    np.testing.assert_allclose(gram, np.broadcast_to(np.eye(3), gram.shape), atol=1e-5)


def test_full_rank_identity_basis_equals_inner():
  """With rank = full and a fixed identity basis, low_rank(inner) == inner."""
  identity = bases_lib.BasisMethod(
      'identity', bases_lib.dense_init, lambda g, old, key, align: old,
      bases_lib.dense_project, bases_lib.dense_unproject,
      bases_lib.dense_transition)
  params = {'w': jnp.ones((6, 5)), 'b': jnp.ones((5,))}
  inner = optax.scale_by_adam()
  tx = so.low_rank(inner, rank=5, refresh=3, basis=identity, side='right')
  ours, _ = _run(tx, params, 5)
  theirs, _ = _run(inner, params, 5)
  for a, b in zip(ours, theirs):
    np.testing.assert_allclose(a['w'], b['w'], rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(a['b'], b['b'])


def test_full_rank_any_orthonormal_basis_equals_rotation_invariant_inner():
  """SGD with momentum is rotation invariant: any full-rank basis gives it."""
  params = {'w': jnp.ones((7, 5))}
  inner = optax.trace(decay=0.9)
  tx = so.low_rank(inner, rank=5, refresh=1000, basis='svd', side='right')
  ours, _ = _run(tx, params, 4)
  theirs, _ = _run(inner, params, 4)
  for a, b in zip(ours, theirs):
    np.testing.assert_allclose(a['w'], b['w'], rtol=1e-5, atol=1e-5)


def test_state_bytes_equal_analytic_size():
  params = _params()
  for side in ('compact', 'reference'):
    tx = so.galore(1e-3, rank=4, side=side, dimension_numbers=so.last_two_axes)
    state = tx.init(params)
    expected = so.state_sizes.galore_bytes(params, 4, side=side,
                               dimension_numbers=so.last_two_axes)
    assert so.state_bytes(state) == expected
    assert so.state_bytes(jax.eval_shape(tx.init, params)) == expected
  # The compact side holds strictly smaller moments than the reference side.
  assert so.state_sizes.galore_bytes(
      params, 4, side='compact', dimension_numbers=so.last_two_axes) < (
          so.state_sizes.galore_bytes(params, 4, side='reference',
                                 dimension_numbers=so.last_two_axes))


def test_staggered_refreshes_spread_over_the_period():
  """At most ceil(n / T) leaves refresh on one step after the first."""
  params = {f'w{i}': jnp.ones((16, 8)) for i in range(8)}
  tx = so.low_rank(optax.scale_by_adam(), rank=2, refresh=4, basis='svd', side='compact')
  state = tx.init(params)
  update = jax.jit(tx.update)
  previous = state.basis
  for t in range(12):
    _, state = update(_gradients(t, params), state)
    changed = sum(
        not np.array_equal(previous[k], state.basis[k]) for k in params)
    if t == 0:
      assert changed == 8
    else:
      assert changed <= 2, (t, changed)
    previous = state.basis
  # Without stagger every leaf refreshes on the same step.
  tx = so.low_rank(optax.scale_by_adam(), rank=2,
                   refresh=so.refresh.every(4, stagger=False), basis='svd', side='compact')
  state = tx.init(params)
  update_once = jax.jit(tx.update)
  for t in range(4):
    _, state = update_once(_gradients(t, params), state)
  before = state.basis
  _, state = update_once(_gradients(4, params), state)
  assert all(not np.array_equal(before[k], state.basis[k]) for k in params)


def _sub_jaxprs(eqn):
  for value in eqn.params.values():
    for item in value if isinstance(value, (list, tuple)) else (value,):
      if hasattr(item, 'eqns'):  # Jaxpr
        yield item
      elif hasattr(getattr(item, 'jaxpr', None), 'eqns'):  # ClosedJaxpr
        yield item.jaxpr


def _outermost(jaxpr, name: str, stop: str = '') -> list:
  """Equations of primitive ``name`` not nested inside another one (nor in a
  ``stop`` primitive). A ``cond`` on ``lax.platform_dependent``'s platform
  index is skipped: it is resolved when the program is lowered."""
  found = []
  platform = {v for e in jaxpr.eqns if e.primitive.name == 'platform_index'
              for v in e.outvars}
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == 'cond' and eqn.invars[0] in platform:
      continue
    if eqn.primitive.name == name:
      found.append(eqn)
    elif eqn.primitive.name != stop:
      for sub in _sub_jaxprs(eqn):
        found += _outermost(sub, name, stop)
  return found


def _staged_jaxpr(tx, params):
  """The jaxpr of ``tx.update`` with the staged schedule (the GPU's) traced:
  the CPU's layer loop runs it on one-layer trees."""
  original = per_matrix.on_platform
  per_matrix.on_platform = lambda *args, cpu, gpu: gpu(*args)
  try:
    return jax.make_jaxpr(tx.update)(params, tx.init(params), params).jaxpr
  finally:
    per_matrix.on_platform = original


def test_stacked_leaves_share_one_conditional_around_their_refreshes():
  """The scheduled refreshes of stacked leaves (one backward scan makes them
  together) sit under one outer ``cond``: a GPU conditional waits for its
  predicate on the host, so a step without a refresh pays one sync for all
  of them; inside it each leaf keeps its own ``cond``, so a staggered step
  refreshes only the leaves that are due."""
  params = {f'w{i}': jnp.ones((3, 16, 8)) for i in range(5)}
  params['bias'] = jnp.ones((8,))
  tx = so.galore(1e-3, rank=2, refresh=4, side='compact',
                 dimension_numbers=so.last_two_axes)
  jaxpr = _staged_jaxpr(tx, params)
  outer = _outermost(jaxpr, 'cond')
  assert len(outer) == 1
  inner = _outermost(outer[0].params['branches'][1].jaxpr, 'cond')
  assert len(inner) == 5
  # Each leaf's SVD runs only inside its own inner conditional.
  assert not _outermost(jaxpr, 'svd', stop='cond')
  assert [len(_outermost(e.params['branches'][1].jaxpr, 'svd'))
          for e in inner] == [1] * 5


def test_each_unstacked_leaf_refreshes_in_its_own_conditional():
  """A leaf without batch axes (one leaf per layer) has its refresh in a
  ``cond`` whose only gradient operand is its own: a conditional over every
  leaf would need the whole gradient tree first, where XLA can otherwise
  update each leaf, and free its gradient, as soon as the backward pass has
  made it."""
  shapes = [(16, 8), (8, 12), (16, 12), (12, 8), (8, 16)]
  params = {f'w{i}': jnp.ones(shape) for i, shape in enumerate(shapes)}
  params['bias'] = jnp.ones((8,))
  tx = so.galore(1e-3, rank=2, refresh=4, side='compact')
  jaxpr = _staged_jaxpr(tx, params)
  conds = _outermost(jaxpr, 'cond')
  assert len(conds) == 5
  operand_shapes = [[v.aval.shape for v in e.invars] for e in conds]
  for shape in shapes:
    assert sum(shape in shapes_of for shapes_of in operand_shapes) == 1
  for shapes_of in operand_shapes:
    assert len([s for s in shapes_of if s in shapes]) == 1
  assert not _outermost(jaxpr, 'svd', stop='cond')
  assert [len(_outermost(e.params['branches'][1].jaxpr, 'svd'))
          for e in conds] == [1] * 5


@pytest.mark.parametrize('one_layer', [True, False])
@pytest.mark.parametrize('basis, reads', [('svd', True), ('random', False)])
def test_a_one_layer_refresh_conditional_returns_the_gradient_it_reads(
    basis, reads, one_layer):
  """In a one-layer update (layer loop, per-layer step) the projection reads
  the gradient as the refresh's ``cond`` returns it: XLA would otherwise give
  the refresh and the projection a copy each of the layer's gradient slice.
  Not elsewhere (XLA:GPU copies a whole stack's gradient through its
  conditional), nor for a refresh that does not read it (random bases)."""
  shapes = [(16, 8), (8, 12)]
  params = {f'w{i}': jnp.ones(shape) for i, shape in enumerate(shapes)}
  tx = so.low_rank(optax.scale_by_adam(), rank=2, refresh=4, basis=basis,
                   side='compact')
  if one_layer:
    with layer_index.layer(jnp.int32(0), 1):
      jaxpr = _staged_jaxpr(tx, params)
  else:
    jaxpr = _staged_jaxpr(tx, params)
  # The top-level equations that hold a refresh's cond (batching.cond's
  # custom_vmap call, whose outputs JAX cannot forward from its operands).
  refreshes = [e for e in jaxpr.eqns if e.primitive.name == 'cond' or any(
      _outermost(sub, 'cond') for sub in _sub_jaxprs(e))]
  assert len(refreshes) == len(shapes)
  gradients = [v for v in jaxpr.invars if v.aval.shape in shapes]
  outputs = [v for e in refreshes for v in e.outvars
             if v.aval.shape in shapes]
  returned = reads and one_layer
  assert len(outputs) == (len(shapes) if returned else 0)
  # After the conditionals, the stages read their outputs, not the inputs.
  after = jaxpr.eqns[max(jaxpr.eqns.index(e) for e in refreshes) + 1:]
  read = {id(v) for e in after for v in e.invars if hasattr(v, 'aval')}
  assert all(id(v) in read for v in outputs)
  if returned:
    assert not any(id(v) in read for v in gradients)


def test_reads_gradient_tells_a_random_basis_from_an_svd():
  layout = layout_lib.MatrixLayout(
      path='w', shape=(6, 4), batch_axes=(), reduction_axes=(0,),
      output_axes=(1,), rows=6, columns=4, project_rows=True, rank=2)
  leaf = stages.Leaf(0, layout, jnp.zeros((6, 2)), None, jax.random.key(0),
                     jnp.zeros((6, 4)))
  assert stages.reads_gradient(so.bases.svd().refresh, leaf)
  assert stages.reads_gradient(so.bases.randomized().refresh, leaf)
  assert not stages.reads_gradient(
      so.bases.random_orthonormal().refresh, leaf)
  assert not stages.reads_gradient(so.bases.gaussian().refresh, leaf)


def _flip_signs_svd():
  """An SVD basis whose column signs change arbitrarily from refresh to refresh,
  as LAPACK/cuSOLVER signs do when the gradient changes."""

  def refresh(g, old, key, align):
    u, _, _ = jnp.linalg.svd(g.astype(jnp.float32), full_matrices=False)
    u = u[:, : old.shape[1]] * jax.random.rademacher(key, (old.shape[1],), jnp.float32)
    return bases_lib.align_signs(u, old) if align else u

  return bases_lib.BasisMethod(
      'svd_flipped', bases_lib.dense_init, refresh, bases_lib.dense_project,
      bases_lib.dense_unproject, bases_lib.dense_transition)


def test_sign_alignment_makes_updates_independent_of_svd_sign_convention():
  params = {'w': jnp.ones((12, 9))}
  differences = {}
  for align in (False, True):
    runs = []
    for basis in (singular.svd(), _flip_signs_svd()):
      tx = so.low_rank(optax.scale_by_adam(), rank=3, refresh=3, basis=basis,
                       align_signs=align, side='compact')
      outs, _ = _run(tx, params, 8)
      runs.append(outs)
    differences[align] = max(
        float(jnp.abs(a['w'] - b['w']).max()) for a, b in zip(*runs))
  assert differences[True] < 1e-4
  assert differences[False] > 1e-1


def test_transport_and_reset_on_refresh():
  params = {'w': jnp.ones((10, 6))}
  g = _gradients(0, params)
  # With a gradient that never changes and transport, the moments expressed in
  # the new basis equal those that a run without refresh would hold.
  base = so.low_rank(optax.trace(0.9), rank=6, refresh=1000, basis='svd', side='right')
  moved = so.low_rank(optax.trace(0.9), rank=6, refresh=2, basis='randomized',
                      side='right', on_refresh='transport')
  s1, s2 = base.init(params), moved.init(params)
  for _ in range(5):
    u1, s1 = base.update(g, s1)
    u2, s2 = moved.update(g, s2)
  np.testing.assert_allclose(u1['w'], u2['w'], rtol=1e-4, atol=1e-5)
  # Reset zeroes the moments of a refreshed leaf: the first step after a refresh
  # equals a fresh momentum step.
  reset = so.low_rank(optax.trace(0.5), rank=3, refresh=2, basis='svd',
                      on_refresh='reset', side='compact')
  state = reset.init(params)
  for t in range(3):
    u, state = reset.update(_gradients(t, params), state)
  c = jnp.einsum('kr,kl->rl', state.basis['w'], _gradients(2, params)['w'])
  np.testing.assert_allclose(state.inner_state.trace['w'], c, rtol=1e-5, atol=1e-6)


def test_residual_path_completes_the_gradient():
  """Identity inner + identity residual reproduce the gradient exactly."""
  params = _params()
  tx = so.low_rank(optax.identity(), rank=2, refresh=3, residual=optax.identity(),
                   dimension_numbers=so.last_two_axes, side='compact')
  g = _gradients(1, params)
  u, _ = tx.update(g, tx.init(params))
  for k in params:
    np.testing.assert_allclose(u[k], g[k], rtol=1e-5, atol=1e-5)


@pytest.mark.slow  # about 15 s; tests/vmap_test.py covers vmap in the subset
def test_vmap_over_an_ensemble():
  params = {'w': jnp.ones((4, 12, 6))}  # 4 ensemble members of a 12x6 matrix
  tx = so.low_rank(optax.scale_by_adam(), rank=2, refresh=3, side='compact')
  inner_params = {'w': params['w'][0]}
  state = jax.vmap(tx.init)({'w': params['w']})
  grads = {'w': jax.random.normal(jax.random.key(0), (4, 12, 6))}
  update = jax.jit(jax.vmap(tx.update))
  u, state = update(grads, state)
  for member in range(4):
    single, _ = tx.update({'w': grads['w'][member]}, tx.init(inner_params))
    np.testing.assert_allclose(u['w'][member], single['w'], rtol=1e-4, atol=1e-5)


def test_composes_with_masked_and_partition():
  params = {'w': jnp.ones((12, 6)), 'emb': jnp.ones((20, 6)), 'b': jnp.ones((6,))}
  low = so.low_rank(optax.scale_by_adam(), rank=2, refresh=3, side='compact')
  labels = {'w': 'low', 'emb': 'adam', 'b': 'adam'}
  tx = optax.partition({'low': low, 'adam': optax.scale_by_adam()}, labels)
  state = tx.init(params)
  u, state = jax.jit(tx.update)(_gradients(0, params), state, params)
  assert jax.tree.map(jnp.shape, u) == jax.tree.map(jnp.shape, params)
  masked = optax.masked(low, {'w': True, 'emb': False, 'b': False})
  state = masked.init(params)
  u, _ = jax.jit(masked.update)(_gradients(0, params), state, params)
  np.testing.assert_array_equal(u['emb'], _gradients(0, params)['emb'])


def test_galore_chain_is_a_drop_in_optax_optimizer():
  params = {'w': jnp.zeros((16, 8))}
  target = jax.random.normal(jax.random.key(3), (16, 8))
  tx = so.galore(0.1, rank=8, refresh=10, scale=1.0, side='compact')
  state = tx.init(params)
  loss = lambda p: jnp.sum((p['w'] - target) ** 2)

  @jax.jit
  def step(p, s):
    g = jax.grad(loss)(p)
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  start = float(loss(params))
  for _ in range(100):
    params, state = step(params, state)
  assert float(loss(params)) < 1e-2 * start


# ------------------------------------------------- leaves the pipeline skips


def _with_empty_leaves():
  return {'w': jnp.ones((6, 4)), 'none': None, 'empty_rows': jnp.ones((0, 5)),
          'empty_columns': jnp.ones((3, 0)),
          'empty_stack': jnp.ones((0, 4, 5)), 'b': jnp.ones((4,))}


@pytest.mark.parametrize('basis', ['svd', 'randomized'])
@pytest.mark.parametrize('on_refresh', ['keep', 'reset', 'transport'])
def test_none_and_zero_size_leaves_pass_through(basis, on_refresh):
  params = _with_empty_leaves()
  tx = so.low_rank(optax.scale_by_adam(), rank=2, refresh=1, basis=basis,
                   on_refresh=on_refresh, dimension_numbers=so.last_two_axes, side='compact')
  state = tx.init(params)
  empty = ('empty_rows', 'empty_columns', 'empty_stack')
  assert state.basis['w'].shape == (6, 2)  # a None leaf shifts nothing
  for name in empty:
    assert state.basis[name] == optax.MaskedNode()
    assert state.inner_state.mu[name] == optax.MaskedNode()
  w_grads = [jax.random.normal(jax.random.key(t), (6, 4)) for t in range(2)]
  update = jax.jit(tx.update)
  for w in w_grads:
    u, state = update(dict(params, w=w), state)
  assert u['none'] is None
  for name in empty:
    assert u[name].shape == params[name].shape
    assert u[name].dtype == params[name].dtype
  # The projected leaf is updated as if the skipped leaves were not there.
  if basis == 'svd':
    alone = {'w': params['w'], 'b': params['b']}
    tx_alone = so.low_rank(optax.scale_by_adam(), rank=2, refresh=1,
                           basis=basis, on_refresh=on_refresh, side='compact')
    state_alone = tx_alone.init(alone)
    for w in w_grads:
      expected, state_alone = tx_alone.update(dict(alone, w=w), state_alone)
    np.testing.assert_allclose(u['w'], expected['w'], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(state.inner_state.mu['w'],
                               state_alone.inner_state.mu['w'], rtol=1e-5,
                               atol=1e-7)


def test_complex_projected_leaf_is_a_named_error_at_init():
  params = {'layer': {'w': jnp.ones((6, 4), jnp.complex64)}}
  tx = so.low_rank(optax.scale_by_adam(), rank=2, side='compact')
  with pytest.raises(ValueError, match=r"\['layer'\]\['w'\].*complex64.*"
                     'dimension_numbers'):
    tx.init(params)
  # Excluded from projection, the inner optimizer runs on it at full size.
  tx = so.low_rank(optax.scale_by_adam(), rank=2,
                   dimension_numbers={'layer': {'w': None}}, side='compact')
  u, _ = tx.update(params, tx.init(params))
  assert u['layer']['w'].shape == (6, 4)


def test_other_dimension_change_is_a_named_error():
  """The basis fixes k (6 rows); l lives only in the inner state (rank x l)."""
  tx = so.low_rank(optax.scale_by_adam(), rank=2, side='compact')
  state = tx.init({'w': jnp.ones((6, 4))})
  with pytest.raises(ValueError, match=r"\['w'\].*\(6, 5\).*inner optimizer"):
    tx.update({'w': jnp.ones((6, 5))}, state)
  with pytest.raises(ValueError, match=r"\['w'\].*needs a basis"):
    tx.update({'w': jnp.ones((7, 4))}, state)


def test_no_deprecation_warning_on_abstract_params():
  params = {'w': jax.ShapeDtypeStruct((6, 4), jnp.float32),
            'stack': jax.ShapeDtypeStruct((2, 5, 3), jnp.float32),
            'b': jax.ShapeDtypeStruct((4,), jnp.float32)}
  with warnings.catch_warnings():
    warnings.simplefilter('error', DeprecationWarning)
    for side in layout_lib.SIDES:
      tx = so.low_rank(optax.scale_by_adam(), rank=2, side=side,
                       residual=optax.scale_by_sign(),
                       dimension_numbers=so.last_two_axes)
      state = jax.eval_shape(tx.init, params)
      jax.eval_shape(tx.update, params, state)


def test_every_built_in_basis_name_resolves_and_errors_list_them():
  for name in registry.BUILT_IN:
    method = registry.resolve(name)
    assert method.name == name
    blocks = name == 'blocks'  # its coefficients are the whole matrix
    tx = so.low_rank(optax.scale_by_adam(), rank=1.0 if blocks else 2,
                     side='reference' if blocks else 'compact', basis=name)
    params = {'w': jnp.ones((8, 6))}
    u, _ = tx.update(_gradients(0, params), tx.init(params))
    assert bool(jnp.all(jnp.isfinite(u['w'])))
  with pytest.raises(ValueError) as error:
    so.low_rank(optax.scale_by_adam(), rank=2, basis='nope', side='compact')
  for name in registry.BUILT_IN:
    assert name in str(error.value)
