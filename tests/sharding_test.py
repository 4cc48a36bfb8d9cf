"""Sharded params (FSDP over 8 simulated CPU devices) keep their sharding.

conftest.py (repository root) sets
``--xla_force_host_platform_device_count=8`` before jax is imported. One
parameter tree covers both orientations and a stacked leaf:

* ``w`` ``(256, 64)`` ``P('fsdp', None)``: the sharded dim is projected, so
  the basis is ``(256@fsdp, r)`` and the moments ``(r, 64)`` are replicated;
* ``v`` ``(64, 256)`` ``P('fsdp', None)``: the unsharded dim is projected, so
  the basis is replicated and the moments are ``(r, 64@fsdp)``;
* ``s`` ``(4, 64, 32)`` ``P(None, 'fsdp', None)``: stacked layers;
* ``b`` ``(64,)`` ``P('fsdp')``: not projected, full-size moments.

Compilations are shared through module-level caches (CI runs on 2 cores).
LAPACK runs with one OpenBLAS thread here: eight simulated devices each
calling a multi-threaded OpenBLAS (the SVD path) oversubscribe the cores and
one 256 x 64 SVD then takes seconds instead of milliseconds.
"""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import AxisType
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import registry
import subspace_optax as so

pytestmark = pytest.mark.slow

threadpoolctl = pytest.importorskip('threadpoolctl')

RANK = 4
SHAPES = {'w': (256, 64), 'v': (64, 256), 's': (4, 64, 32), 'b': (64,)}
SPECS = {'w': P('fsdp', None), 'v': P('fsdp', None), 's': P(None, 'fsdp', None),
         'b': P('fsdp')}
# Expected shapes and specs of the low-rank state (side='compact' projects the
# larger dim; the specs follow the rule in sharding.py).
BASIS_SHAPES = {'w': (256, RANK), 'v': (256, RANK), 's': (4, 64, RANK)}
BASIS_SPECS = {'w': P('fsdp', None), 'v': P(None, None), 's': P(None, 'fsdp', None)}
MOMENT_SPECS = {'w': P(None, None), 'v': P(None, 'fsdp'), 's': P(None, None, None),
                'b': P('fsdp')}

# low_rank with the SVD basis, and galore (low_rank with the randomized basis
# inside a chain with weight decay, which reads the params). The randomized
# update is the most expensive program to compile here, so it is built once
# per mesh type.
TRANSFORMS = {
    'svd': lambda: so.low_rank(
        optax.scale_by_adam(), rank=RANK, refresh=2, basis='svd',
        dimension_numbers=so.last_two_axes, side='compact'),
    'galore_randomized': lambda: so.galore(
        1e-2, rank=RANK, refresh=2, basis='randomized',
        weight_decay=0.1, dimension_numbers=so.last_two_axes, side='compact'),
}
# Online Subspace Descent (basis moved every step by online PCA; the first
# update's range finder sits in the other branch of the same lax.cond). Only
# its compiled update is checked (HLO and shardings), on the unstacked leaves
# (the stacked one triples its compile time), to keep the file cheap.
ONLINE_LEAVES = ('b', 'v', 'w')
ONLINE = {
    'online_subspace_descent': lambda: so.online_subspace_descent(
        1e-2, rank=RANK, dimension_numbers=so.last_two_axes, side='compact'),
}
# Eager (no-jit) updates dispatch op by op on 8 devices; the SVD path has few.
EAGER_UPDATE = ('svd',)
AXIS_TYPES = {'explicit': AxisType.Explicit, 'auto': AxisType.Auto}


@pytest.fixture(autouse=True, scope='module')
def _one_blas_thread():
  import scipy.linalg  # pylint: disable=import-outside-toplevel,unused-import
  with threadpoolctl.threadpool_limits(limits=1, user_api='blas'):
    yield


@functools.cache
def _mesh(axis_type: str):
  return jax.make_mesh((8,), ('fsdp',), axis_types=(AXIS_TYPES[axis_type],))


def _shardings(mesh):
  return {k: NamedSharding(mesh, s) for k, s in SPECS.items()}


def _tree(mesh, seed, leaves=tuple(sorted(SHAPES))):
  keys = dict(zip(sorted(SHAPES), jax.random.split(jax.random.key(seed), 4)))
  return {k: jax.device_put(jax.random.normal(keys[k], SHAPES[k]),
                            NamedSharding(mesh, SPECS[k])) for k in leaves}


def _spec(x):
  return getattr(x.sharding, 'spec', P())


def _same_sharding(a, b) -> bool:
  return a.sharding.is_equivalent_to(b.sharding, a.ndim)


@functools.cache
def _compiled(name: str, axis_type: str, leaves=tuple(sorted(SHAPES))):
  """(params, grads, jit-initialised state, compiled update) for one case."""
  mesh = _mesh(axis_type)
  tx = {**TRANSFORMS, **ONLINE}[name]()
  with jax.set_mesh(mesh):
    params, grads = _tree(mesh, 0, leaves), _tree(mesh, 1, leaves)
    if axis_type == 'auto':
      shardings = {k: s for k, s in _shardings(mesh).items() if k in leaves}
      shardings = so.state_shardings(tx, params, shardings)
      state = jax.jit(tx.init, out_shardings=shardings)(params)
    else:
      state = jax.jit(tx.init)(params)
    update = jax.jit(tx.update).lower(grads, state, params).compile()
  return params, grads, state, update


def _low_rank_state(state):
  return state if isinstance(state, so.SubspaceState) else state[0]


def _all_gathers(hlo_text: str) -> list[tuple[int, ...]]:
  """Result shapes of every all-gather in compiled HLO text."""
  shapes = []
  for dims in re.findall(r'= \w+\[([\d,]*)\][^ ]* all-gather(?:-start)?\(', hlo_text):
    shapes.append(tuple(int(d) for d in dims.split(',') if d))
  return shapes


@pytest.mark.parametrize('name', sorted(TRANSFORMS))
def test_init_with_shape_dtype_structs(name):
  """init accepts ShapeDtypeStructs, concretely and under eval_shape, and
  derives the low-rank shardings from them."""
  mesh = _mesh('explicit')
  tx = TRANSFORMS[name]()
  abstract = {k: jax.ShapeDtypeStruct(SHAPES[k], jnp.float32,
                                      sharding=NamedSharding(mesh, SPECS[k]))
              for k in SHAPES}
  with jax.set_mesh(mesh):
    concrete = _low_rank_state(tx.init(abstract))
    shapes = _low_rank_state(jax.eval_shape(tx.init, abstract))
  for state in (concrete, shapes):
    for k, spec in BASIS_SPECS.items():
      assert state.basis[k].shape == BASIS_SHAPES[k]
      assert _spec(state.basis[k]) == spec, (k, state.basis[k])
    moments = state.inner_state.mu
    for k, spec in MOMENT_SPECS.items():
      assert _spec(moments[k]) == spec, (k, moments[k])


@pytest.mark.parametrize('axis_type', sorted(AXIS_TYPES))
@pytest.mark.parametrize('name', sorted(TRANSFORMS))
def test_state_keeps_its_sharding(name, axis_type):
  """Every state leaf has the same sharding after init and after updates (jit
  and eager), the low-rank leaves follow the rule, and updates are sharded
  like the params. Explicit meshes: the sharding *types* match, the optax
  contract (jax.typeof(init state) == jax.typeof(update state))."""
  mesh = _mesh(axis_type)
  params, grads, state, update = _compiled(name, axis_type)
  tx = TRANSFORMS[name]()
  with jax.set_mesh(mesh):
    jit_updates, jit_state = update(grads, state, params)
    _, jit_state = update(grads, jit_state, params)  # a refresh and a normal step
    eager_state = tx.init(params)
    eager_updates = jit_updates
    if name in EAGER_UPDATE:
      eager_updates, eager_state = tx.update(grads, eager_state, params)

  for leaf, after, eager in zip(
      jax.tree.leaves(state), jax.tree.leaves(jit_state),
      jax.tree.leaves(eager_state)):
    assert _same_sharding(leaf, after), (leaf.shape, leaf.sharding, after.sharding)
    if leaf.ndim:  # eager scalars (counts) live on one device, as in optax
      assert _same_sharding(leaf, eager), (leaf.shape, leaf.sharding, eager.sharding)
  if axis_type == 'explicit':
    assert jax.tree.map(jax.typeof, state) == jax.tree.map(jax.typeof, jit_state)
  low = _low_rank_state(state)
  for k, spec in BASIS_SPECS.items():
    assert _spec(low.basis[k]) == spec, k
  for k, spec in MOMENT_SPECS.items():
    assert _spec(low.inner_state.mu[k]) == spec, k
  for updates in (jit_updates, eager_updates):
    for k in SHAPES:
      assert _same_sharding(updates[k], params[k]), (k, updates[k].sharding)
      assert np.isfinite(np.asarray(updates[k])).all()


def _assert_no_gradient_matrix_gathered(hlo_text: str) -> None:
  """No all-gather of a full gradient matrix; any gather is at most k x p
  (sketch-sized), and the small contractions are all-reduced instead."""
  largest_sketch = 256 * (RANK + 8)  # k x (rank + oversample)
  matrices = {tuple(s[-2:]) for s in SHAPES.values() if len(s) >= 2}
  for shape in _all_gathers(hlo_text):
    assert tuple(shape[-2:]) not in matrices and tuple(
        shape[-2:][::-1]) not in matrices, shape
    assert int(np.prod(shape)) <= largest_sketch, shape
  assert ' all-reduce' in hlo_text  # Gram matrices and C = QᵀG are summed


@pytest.mark.parametrize('axis_type', sorted(AXIS_TYPES))
def test_randomized_basis_gathers_no_gradient_matrix(axis_type):
  """The compiled update (a refresh is due: count 0) has no all-gather of a
  full gradient matrix."""
  _, _, _, update = _compiled('galore_randomized', axis_type)
  _assert_no_gradient_matrix_gathered(update.as_text())


@pytest.mark.parametrize('axis_type', sorted(AXIS_TYPES))
def test_online_basis_gathers_no_gradient_matrix(axis_type):
  """Online Subspace Descent's compiled update (both branches: the first
  update's range finder and the online-PCA step) gathers no gradient matrix,
  its state keeps its sharding over two updates, and its basis and moments
  follow the same rule as the other bases."""
  params, grads, state, update = _compiled(
      'online_subspace_descent', axis_type, ONLINE_LEAVES)
  _assert_no_gradient_matrix_gathered(update.as_text())
  with jax.set_mesh(_mesh(axis_type)):
    _, first = update(grads, state, params)  # range finder
    updates, after = update(grads, first, params)  # online-PCA step
  for leaf, later in zip(jax.tree.leaves(state), jax.tree.leaves(after)):
    assert _same_sharding(leaf, later), (leaf.shape, leaf.sharding, later.sharding)
  low = _low_rank_state(state)
  for k in ('v', 'w'):
    assert low.basis[k].basis.shape == BASIS_SHAPES[k]
    assert _spec(low.basis[k].basis) == BASIS_SPECS[k], k
  for k in ONLINE_LEAVES:
    assert _spec(low.inner_state.mu[k]) == MOMENT_SPECS[k], k
  first_basis = _low_rank_state(first).basis['w'].basis
  moved_basis = _low_rank_state(after).basis['w'].basis
  assert float(jnp.max(jnp.abs(moved_basis - first_basis))) > 0  # every step
  for k in ONLINE_LEAVES:
    assert _same_sharding(updates[k], params[k]), (k, updates[k].sharding)
    assert np.isfinite(np.asarray(updates[k])).all()


@pytest.mark.parametrize('axis_type', sorted(AXIS_TYPES))
def test_svd_basis_gathers_the_gradient_deliberately(axis_type):
  """The exact SVD needs the whole matrix: its refresh all-gathers the
  sharded gradient (documented in bases.svd). This pins that behaviour."""
  _, _, _, update = _compiled('svd', axis_type)
  gathered = {tuple(s) for s in _all_gathers(update.as_text())}
  assert (256, 64) in gathered, gathered  # 'w' (rows sharded) is gathered


def test_state_shardings_helper():
  """state_shardings gives parameter-shaped moments the param's spec and the
  low-rank leaves the rule's specs, on the original (Auto) mesh."""
  mesh = _mesh('auto')
  shardings = _shardings(mesh)
  params = {k: jax.ShapeDtypeStruct(SHAPES[k], jnp.float32) for k in SHAPES}
  adam = so.state_shardings(optax.adam(1e-3), params, shardings)
  assert adam[0].mu == shardings and adam[0].nu == shardings
  assert adam[0].count == NamedSharding(mesh, P())
  low = so.state_shardings(TRANSFORMS['galore_randomized'](), params,
                           shardings)[0]
  for k, spec in BASIS_SPECS.items():
    assert low.basis[k] == NamedSharding(mesh, spec), k
  for k, spec in MOMENT_SPECS.items():
    assert low.inner_state.nu[k] == NamedSharding(mesh, spec), k
  assert low.count.mesh is mesh and low.count.spec == P()
  with pytest.raises(ValueError, match='one mesh'):
    other = jax.make_mesh((8,), ('data',), axis_types=(AxisType.Auto,))
    so.state_shardings(optax.adam(1e-3), params,
                       {**shardings, 'b': NamedSharding(other, P())})


class _Mlp(nnx.Module):

  def __init__(self, rngs):
    init = nnx.with_partitioning(nnx.initializers.lecun_normal(), ('fsdp', None))
    self.up = nnx.Linear(64, 32, kernel_init=init, rngs=rngs)
    self.down = nnx.Linear(32, 64, kernel_init=init, use_bias=False, rngs=rngs)

  def __call__(self, x):
    return self.down(jax.nn.relu(self.up(x)))


def test_nnx_optimizer_on_fsdp_mesh():
  """nnx.Optimizer(model, so.galore(rank=4, side='compact')) on an 8-way FSDP mesh: init and
  a jitted step work and keep the kernels' sharding (optax.contrib.galore
  fails here, see the next test)."""
  mesh = _mesh('auto')
  with jax.set_mesh(mesh):
    model = _Mlp(nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, so.galore(1e-2, rank=RANK, side='compact'), wrt=nnx.Param)
    state = optimizer.opt_state[0]
    assert _spec(state.basis['up']['kernel'][...]) == P('fsdp', None)
    assert state.inner_state.mu['down']['kernel'][...].shape == (RANK, 32)
    assert _spec(state.inner_state.mu['down']['kernel'][...]) == P(None, 'fsdp')

    @nnx.jit
    def step(model, optimizer, x):
      loss, grads = nnx.value_and_grad(lambda m: jnp.mean(m(x) ** 2))(model)
      optimizer.update(model, grads)
      return loss

    x = jax.device_put(jax.random.normal(jax.random.key(0), (16, 64)),
                       NamedSharding(mesh, P('fsdp', None)))
    losses = [float(step(model, optimizer, x)) for _ in range(3)]
  assert losses[-1] < losses[0]
  for kernel in (model.up.kernel, model.down.kernel):
    assert _spec(kernel[...]) in (P('fsdp', None), P('fsdp'))


@pytest.mark.parametrize('axis_type', sorted(AXIS_TYPES))
def test_contrib_galore_fails_on_fsdp_mesh(axis_type):
  """Documents optax.contrib.galore's weakness: its (rank, n) moments inherit
  the kernel's P('fsdp', None), which rank 4 cannot take on 8 devices."""
  mesh = _mesh(axis_type)
  with jax.set_mesh(mesh):
    model = _Mlp(nnx.Rngs(0))
    try:
      nnx.Optimizer(model, optax.contrib.galore(1e-2, rank=RANK), wrt=nnx.Param)
    except Exception as error:  # pylint: disable=broad-except
      assert 'IndivisibleError' in type(error).__name__ or 'divid' in str(error)
      return
  pytest.skip('optax.contrib.galore now works on this mesh (behaviour changed).')


# Every preset of tests/registry.py, on the registry's leaf names with shapes
# the 8-device mesh divides (rank 2 < 8: no state leaf is sharded on the rank).
REGISTRY_LEAVES = {'w': ((16, 8), P('fsdp', None)),
                   'stack': ((2, 8, 16), P(None, 'fsdp', None)),
                   'b': ((8,), P('fsdp'))}
# Known gaps (the state part of the test still runs for them).
UPDATES_NOT_SHARDED_LIKE_PARAMS = {
    # dct.unproject builds the DCT columns from indices, with no sharding on
    # the projected axis, so the update comes out replicated.
    'dct_adamw',
}
_COMPILE_EVENT = '/jax/core/compile/backend_compile_duration'
_events = []
jax.monitoring.register_event_duration_secs_listener(
    lambda name, *_, **__: _events.append(name))


def _registry_tree(mesh, seed):
  keys = jax.random.split(jax.random.key(seed), len(REGISTRY_LEAVES))
  return {name: jax.device_put(jax.random.normal(key, shape),
                               NamedSharding(mesh, spec))
          for key, (name, (shape, spec)) in zip(
              keys, sorted(REGISTRY_LEAVES.items()))}


@pytest.mark.parametrize('axis_type', sorted(AXIS_TYPES))
@pytest.mark.parametrize('name', registry.NAMES)
def test_every_method_compiles_its_update_once(name, axis_type):
  """Two jitted steps from a sharded init: one trace, no compilation at the
  second step, and the state's shardings after a step equal those of init
  (a moment started unsharded and sharded by its first update would compile
  the step twice)."""
  mesh = _mesh(axis_type)
  with jax.set_mesh(mesh):
    params, grads = _registry_tree(mesh, 0), _registry_tree(mesh, 1)
    tx = registry.REGISTRY[name].make(params)
    if axis_type == 'auto':
      shardings = so.state_shardings(tx, params, {
          k: NamedSharding(mesh, spec) for k, (_, spec) in
          REGISTRY_LEAVES.items()})
      state = jax.jit(tx.init, out_shardings=shardings)(params)
    else:
      state = jax.jit(tx.init)(params)
    traces = [0]

    def update(grads, state, params):
      traces[0] += 1
      return tx.update(grads, state, params)

    update = jax.jit(update)
    updates, stepped = update(grads, state, params)
    _events.clear()
    _, stepped_twice = update(grads, stepped, params)
    compiles = _events.count(_COMPILE_EVENT)
  assert traces[0] == 1 and compiles == 0, (traces[0], compiles)
  if axis_type == 'explicit':
    assert jax.tree.map(jax.typeof, state) == jax.tree.map(jax.typeof, stepped)
  for (path, before), after, later in zip(
      jax.tree_util.tree_leaves_with_path(state), jax.tree.leaves(stepped),
      jax.tree.leaves(stepped_twice)):
    for leaf in (after, later):
      assert _same_sharding(before, leaf), (
          jax.tree_util.keystr(path), before.sharding, leaf.sharding)
  if name in UPDATES_NOT_SHARDED_LIKE_PARAMS:
    return
  for k in params:
    assert _same_sharding(updates[k], params[k]), (k, updates[k].sharding)
