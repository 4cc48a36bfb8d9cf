"""One process of the multi-process tests (tests/multiprocess_test.py).

Not a test module: ``tests/multiprocess_test.py`` starts it as ``python
tests/multiprocess_worker.py OUT PORT NUM_PROCESSES PROCESS_ID STAGE``, with
``XLA_FLAGS=--xla_force_host_platform_device_count=N`` in its environment, once
per process. With more than one process it joins the others through
``jax.distributed`` (gloo collectives on CPU); every process then sees the
global mesh of all devices and feeds its own shards of the global arrays.

Every stage trains the same small FSDP model (the style of
``tests/sharding_test.py``: a sharded matrix, a stacked ``(L, m, n)`` leaf,
a sharded vector) on batches that are a pure function of the step, so a run on
1 process x 8 devices, 2 processes x 4 devices or 1 process x 4 devices must
give the same numbers. Stages:

* ``reference`` (1 process): every method for ``STEPS`` updates, and an orbax
  checkpoint after ``SAVE_AT`` of them (the uninterrupted run continues);
  galore by ``so.per_layer_train_step`` on a small scanned stack and by the
  whole-tree step;
* ``distributed`` (2 processes): the same runs (per-layer: that step
  only), the faults (a NaN gradient on one process's shard only, a refresh
  whose basis is NaN on one shard only), a deliberately diverged process,
  and the checkpoint restored onto 2 x 4 devices and continued;
* ``resume4`` (1 process, 4 devices): the checkpoint restored and continued.

Each process writes ``OUT/<stage>.p<id>.npz``: the shards that its own
devices hold of every leaf of every run (:func:`shards`). The test puts the
whole values together and compares every copy of a replicated part across
devices and processes (counters, refresh schedules, skip counters, seeds),
which must agree bit for bit.
"""

from __future__ import annotations

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import subspace_optax as so
from subspace_optax import continual

STEPS = 4  # updates per run; refresh=2 refreshes at updates 0 and 2
SAVE_AT = 2  # the checkpoint of the resume runs
NAN_STEP = 1  # the update whose gradient is NaN on one process only
SHAPES = {'w': (32, 16), 's': (2, 16, 8), 'b': (16,)}
SPECS = {'w': P('fsdp', None), 's': P(None, 'fsdp', None), 'b': P('fsdp')}
BATCH = 16
RESUMED = ('galore', 'q_galore', 'gpm_ewc')  # runs restored on other topologies


def methods() -> dict[str, optax.GradientTransformation]:
  """The methods under test, each inside ``optax.apply_if_finite`` (its skip
  counters are replicated state that every process must agree on)."""
  last_two = so.last_two_axes
  txs = {
      'galore': so.galore(1e-2, rank=4, refresh=2, dimension_numbers=last_two),
      'q_galore': so.q_galore(1e-2, rank=4, refresh=2, group_size=16,
                              dimension_numbers=last_two),
      'apollo_mini': so.apollo_mini(1e-2, refresh=2,
                                    dimension_numbers=last_two),
      'frugal': so.frugal(1e-2, rank=4, refresh=2, dimension_numbers=last_two),
      'gpm_ewc': continual.gpm_ewc(1e-2, strength=10.0),
  }
  return {k: optax.apply_if_finite(tx, max_consecutive_errors=5)
          for k, tx in txs.items()}


# ----------------------------------------------------------------------------
# Global arrays: every process builds its own shards from the same numpy value.


def global_array(value: np.ndarray, sharding) -> jax.Array:
  value = np.asarray(value)
  return jax.make_array_from_callback(value.shape, sharding,
                                      lambda index: value[index])


def initial_params_numpy() -> dict[str, np.ndarray]:
  rng = np.random.default_rng(0)
  return {k: (rng.standard_normal(s) / np.sqrt(s[-1])).astype(np.float32)
          for k, s in SHAPES.items()}


def initial_params(mesh) -> dict[str, jax.Array]:
  return {k: global_array(v, NamedSharding(mesh, SPECS[k]))
          for k, v in initial_params_numpy().items()}


def batch(mesh, step: int, task: int = 0) -> jax.Array:
  """The global batch of ``step``: ``(BATCH, 32)``, split over the devices."""
  rng = np.random.default_rng(1000 * task + step + 1)
  x = rng.standard_normal((BATCH, SHAPES['w'][0])).astype(np.float32)
  x[:, : 4 * task] *= 0.1  # another input distribution for task 1
  return global_array(x, NamedSharding(mesh, P('fsdp')))


def loss_one(params, x):
  """The loss of one example ``x`` of shape ``(32,)`` (or of a batch)."""
  y = jnp.tanh(x @ params['w']) + params['b']
  z = jnp.einsum('...m,lmn->...ln', y, params['s'])
  return jnp.mean((z - 0.5) ** 2) + jnp.mean((y - 1.0) ** 2)


# ----------------------------------------------------------------------------
# Training.

# One compile for every method (the gradient keeps the params' shardings).
_GRAD = jax.jit(jax.grad(loss_one))


class Trainer:
  """One method on one mesh: jitted steps with the state's own shardings."""

  def __init__(self, mesh, tx):
    self.mesh, self.tx = mesh, tx
    self.param_shardings = {k: NamedSharding(mesh, s) for k, s in SPECS.items()}
    self.params = initial_params(mesh)
    self.state_shardings = so.state_shardings(tx, self.params,
                                              self.param_shardings)
    self.init = jax.jit(tx.init, out_shardings=self.state_shardings)

    def step(params, state, grads):
      updates, state = tx.update(grads, state, params)
      return optax.apply_updates(params, updates), state

    self.step = jax.jit(step, out_shardings=(self.param_shardings,
                                             self.state_shardings))
    self.grad = _GRAD
    self.boundary = jax.jit(task_boundary, out_shardings=self.state_shardings)

  def abstract(self):
    """``(params, state)`` as sharded ``ShapeDtypeStruct``s (restore target)."""
    state = jax.eval_shape(self.tx.init, self.params)
    typed = lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s)
    return (jax.tree.map(typed, self.params, self.param_shardings),
            jax.tree.map(typed, state, self.state_shardings))


def train(trainer: Trainer, params, state, steps, task: int = 0,
          poison=None):
  """``steps`` updates; ``poison(step, grads) -> grads`` alters gradients."""
  for t in steps:
    grads = trainer.grad(params, batch(trainer.mesh, t, task))
    if poison is not None:
      grads = poison(t, grads)
    params, state = trainer.step(params, state, grads)
  return params, state


def task_boundary(params, state, samples):
  """gpm_ewc's memory update after task 0 (as examples/continual_common.py):
  EWC's Fisher and anchor, then GPM's memory from the layer's inputs. Jitted
  by :class:`Trainer` (one compile instead of one per eager operation)."""
  inner = state.inner_state
  fisher = continual.fisher_diagonal(loss_one, params, samples)
  inner = continual.consolidate_ewc(inner, params, fisher)
  inputs = {'w': samples, 's': None, 'b': None}
  memory = continual.gpm_memory(inputs, 0.9, continual.get_memory(inner))
  return state._replace(inner_state=continual.set_memory(inner, memory))


def run(trainer: Trainer, name: str, steps=range(STEPS), poison=None,
        checkpoint=None):
  """``(params, state)`` after ``steps``; gpm_ewc crosses a task boundary
  halfway. ``checkpoint(params, state)`` is called after update ``SAVE_AT``."""
  params, state = trainer.params, trainer.init(trainer.params)
  for t in steps:
    task = int(name == 'gpm_ewc' and t >= STEPS // 2)
    if name == 'gpm_ewc' and t == STEPS // 2:
      state = trainer.boundary(params, state, batch(trainer.mesh, 0))
    params, state = train(trainer, params, state, [t], task, poison)
    if checkpoint is not None and t + 1 == SAVE_AT:
      checkpoint(params, state)
  return params, state


def resume(trainer: Trainer, name: str, directory: str):
  """Restore the checkpoint of ``name`` onto this topology and continue."""
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel

  checkpointer = ocp.StandardCheckpointer()
  params, state = checkpointer.restore(f'{directory}/{name}',
                                       trainer.abstract())
  for t in range(SAVE_AT, STEPS):
    task = int(name == 'gpm_ewc' and t >= STEPS // 2)
    if name == 'gpm_ewc' and t == STEPS // 2:
      state = trainer.boundary(params, state, batch(trainer.mesh, 0))
    params, state = train(trainer, params, state, [t], task)
  return params, state


# ----------------------------------------------------------------------------
# Faults on one process's shard only.


def shard_poison(mesh, value, rows: slice, leaf: str = 'w'):
  """``grads -> grads`` with ``value`` added to ``rows`` of ``leaf``'s
  gradient. ``rows`` lie on the last devices (process 1 of 2)."""
  delta = np.zeros(SHAPES[leaf], np.float32)
  delta[rows] = value
  delta = global_array(delta, NamedSharding(mesh, SPECS[leaf]))
  return lambda grads: {**grads, leaf: grads[leaf] + delta}


def nan_basis_method(trigger: float):
  """The SVD basis, NaN whenever the matrix holds an entry above
  ``trigger`` (a refresh that fails on the layer that holds it)."""
  svd = so.bases.svd()

  def refresh(g, old, key, align):
    new = svd.refresh(g, old, key, align)
    return jnp.where(jnp.max(jnp.abs(g)) > trigger, jnp.nan, new)

  return svd._replace(name='nan_on_large', refresh=refresh)


def failing_refresh(mesh):
  """A stacked leaf ``(8, 16, 8)`` sharded over its layers, one layer per
  device; a refresh whose basis is NaN on the last layer only (process 1),
  then a refresh that succeeds. Returns the states before, after the failed
  refresh and after the good one."""
  shape, spec = (8, 16, 8), NamedSharding(mesh, P('fsdp', None, None))
  tx = so.low_rank(optax.scale_by_adam(), rank=2, refresh=100,
                   basis=nan_basis_method(trigger=100.0), side='compact',
                   dimension_numbers=so.last_two_axes)
  rng = np.random.default_rng(7)
  params = {'s': global_array(np.zeros(shape, np.float32), spec)}
  good = rng.standard_normal(shape).astype(np.float32)
  bad = good.copy()
  bad[-1] *= 1e4  # finite, but the basis method fails on this layer
  shardings = so.state_shardings(tx, params, {'s': spec})
  update = jax.jit(lambda g, s: tx.update(g, s)[1], out_shardings=shardings)
  before = jax.jit(tx.init, out_shardings=shardings)(params)
  failed = update({'s': global_array(bad, spec)}, before)
  refreshed = update({'s': global_array(good, spec)}, failed)
  return {'before': before, 'failed': failed, 'refreshed': refreshed}


def diverge(state, process: int):
  """``state`` with this process's own copy of every refresh schedule one
  update later on process ``process`` only: a process that takes other
  refresh decisions than the rest."""

  def shift(path, x):
    name = jax.tree_util.keystr(path)
    if jax.process_index() != process or 'next_refresh' not in name:
      return x
    local = np.asarray(x.addressable_data(0)) + 1
    return jax.make_array_from_callback(x.shape, x.sharding,
                                        lambda index: local[index])

  return jax.tree_util.tree_map_with_path(shift, state)


# ----------------------------------------------------------------------------
# Per-layer updates: so.per_layer_train_step on a tiny scanned stack (the
# style of tests/per_layer_test.py). galore without apply_if_finite, which
# needs the whole gradient first (NotLayerSeparableError).

PER_LAYER_SHAPES = {'embed': (8, 16), 'head': (16, 8),
                    'blocks': {'up': (2, 16, 32), 'down': (2, 32, 16)}}
# The stacks sharded on their input dimension, the layer axis replicated.
PER_LAYER_SPECS = {'embed': P('fsdp', None), 'head': P('fsdp', None),
                   'blocks': {'up': P(None, 'fsdp', None),
                              'down': P(None, 'fsdp', None)}}


def pl_embed(rest, x):
  return x @ rest['embed']


def pl_layer(p, h):
  return h + jnp.tanh(h @ p['up']) @ p['down']


def pl_head_loss(rest, h, x):
  return jnp.mean((h @ rest['head'] - x) ** 2)


def pl_whole_loss(params, x):
  rest = {k: v for k, v in params.items() if k != 'blocks'}
  h, _ = jax.lax.scan(lambda h, p: (pl_layer(p, h), None),
                      pl_embed(rest, x), params['blocks'])
  return pl_head_loss(rest, h, x)


def per_layer_initial_numpy() -> dict:
  rng = np.random.default_rng(3)
  return jax.tree.map(
      lambda s: (0.5 * rng.standard_normal(s) / np.sqrt(s[-2])).astype(
          np.float32), PER_LAYER_SHAPES,
      is_leaf=lambda s: isinstance(s, tuple))


def per_layer_runs(mesh, whole: bool) -> dict:
  """galore (refresh=2: refreshes at updates 0 and 2) for ``STEPS`` updates
  by ``so.per_layer_train_step`` (``'per_layer/galore'``: params, state and
  losses; ``'per_layer/same'``: its separability check per update) and, if
  ``whole``, by the whole-tree step (``'whole/galore'``)."""
  tx = so.galore(1e-2, rank=4, refresh=2, dimension_numbers=so.last_two_axes)
  shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), PER_LAYER_SPECS,
                           is_leaf=lambda s: isinstance(s, P))
  params = jax.tree.map(global_array, per_layer_initial_numpy(), shardings)
  state_shardings = so.state_shardings(tx, params, shardings)
  init = jax.jit(tx.init, out_shardings=state_shardings)
  out_shardings = (shardings, state_shardings, None)
  per_layer = jax.jit(
      so.per_layer_train_step(tx, embed=pl_embed, layer=pl_layer,
                              head_loss=pl_head_loss, check_shared=True),
      out_shardings=out_shardings + (None,))

  def whole_step(params, state, x):
    loss, grads = jax.value_and_grad(pl_whole_loss)(params, x)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss

  steps = {'per_layer/galore': per_layer}
  if whole:
    steps['whole/galore'] = jax.jit(whole_step, out_shardings=out_shardings)
  out = {}
  for name, step in steps.items():
    p, s, losses, same = params, init(params), [], []
    for t in range(STEPS):
      rng = np.random.default_rng(2000 + t)
      x = rng.standard_normal((BATCH, 8)).astype(np.float32)
      p, s, loss, *check = step(p, s, global_array(
          x, NamedSharding(mesh, P('fsdp'))))
      losses.append(loss)
      same += check
    out[name] = {'params': p, 'state': s, 'loss': losses}
    if same:
      out['per_layer/same'] = same
  return out


# ----------------------------------------------------------------------------
# Outputs.


def shards(tree) -> dict[str, np.ndarray]:
  """This process's shards of every array leaf of ``tree``, by key path.

  ``shard|<path>|<device>`` holds the data of one device, ``index|<path>|
  <device>`` its ``(start, stop)`` per axis, ``shape|<path>`` the global
  shape. The test puts the whole arrays together from the shards of every
  process and checks that each copy of a replicated part (counters, refresh
  schedules, skip counters, seeds: the decisions) is the same on every device
  of every process. Nothing but the program itself makes the processes
  compute the same copies. No collective, nothing to compile.
  """
  out = {}
  for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
    if not isinstance(x, jax.Array):
      continue
    name = jax.tree_util.keystr(path)
    out[f'shape|{name}'] = np.asarray(x.shape, np.int64)
    for shard in x.addressable_shards:
      bounds = [index.indices(size)[:2]
                for index, size in zip(shard.index, x.shape)]
      device = shard.device.id
      out[f'shard|{name}|{device}'] = np.asarray(shard.data)
      out[f'index|{name}|{device}'] = np.asarray(bounds, np.int64).reshape(
          x.ndim, 2)
  return out


class Outputs:
  """The shards of every run, as ``<run>|<key>`` (see :func:`shards`)."""

  def __init__(self):
    self.arrays: dict[str, np.ndarray] = {}

  def add(self, run_name: str, tree) -> None:
    for key, value in shards(tree).items():
      self.arrays[f'{run_name}|{key}'] = value

  def save(self, out: str, stage: str) -> None:
    path = os.path.join(out, f'{stage}.p{jax.process_index()}.npz')
    np.savez(path, **self.arrays)


# ----------------------------------------------------------------------------
# Stages.


def stage_runs(mesh, outputs: Outputs, checkpoint_dir: str | None,
               save: bool, distributed: bool) -> dict[str, Trainer]:
  """Every method's run (and its checkpoint, or its resumed run); the
  NaN-gradient runs of galore; galore by ``so.per_layer_train_step`` (and,
  on 1 process, by the whole-tree step: :func:`per_layer_runs`). Returns
  the trainers (compiled steps)."""
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel

  checkpointer = ocp.StandardCheckpointer()
  trainers = {}
  for name, tx in methods().items():
    trainer = trainers[name] = Trainer(mesh, tx)
    save_fn = None
    if save and name in RESUMED:
      def save_fn(params, state, name=name):
        checkpointer.save(f'{checkpoint_dir}/{name}', (params, state))
        checkpointer.wait_until_finished()
    outputs.add(name, run(trainer, name, checkpoint=save_fn))
    if distributed and name in RESUMED:
      outputs.add(f'resumed/{name}', resume(trainer, name, checkpoint_dir))
    if name != 'galore':
      continue
    # A NaN in the gradient rows of process 1 only, at update NAN_STEP:
    # apply_if_finite must skip that update on every process, which equals
    # never seeing that batch.
    poison = shard_poison(mesh, np.nan, slice(-2, None))
    outputs.add('nan_step', run(
        trainer, name,
        poison=lambda t, g: poison(g) if t == NAN_STEP else g))
    outputs.add('nan_step_omitted', run(
        trainer, name, steps=[t for t in range(STEPS) if t != NAN_STEP]))
    if distributed:
      # The library's own check, without apply_if_finite: a NaN on process 1
      # at a due refresh keeps every basis and the refresh stays due.
      inner = Trainer(mesh, so.galore(1e-2, rank=4, refresh=2,
                                      dimension_numbers=so.last_two_axes))
      state = inner.init(inner.params)
      outputs.add('nan_refresh/before', state)
      _, state = train(inner, inner.params, state, [0],
                       poison=lambda t, g: poison(g))
      outputs.add('nan_refresh/after', state)
  for name, tree in per_layer_runs(mesh, whole=not distributed).items():
    outputs.add(name, tree)
  return trainers


def stage_distributed(mesh, outputs: Outputs, checkpoint_dir: str) -> None:
  trainers = stage_runs(mesh, outputs, checkpoint_dir, save=False,
                        distributed=True)
  for key, state in failing_refresh(mesh).items():
    outputs.add(f'failed_basis/{key}', state)
  # A process that takes its own refresh decisions (the negative test).
  trainer = trainers['apollo_mini']
  params = trainer.params
  state = diverge(trainer.init(params), process=1)
  outputs.add('diverged', train(trainer, params, state, range(STEPS)))


def main(argv: list[str]) -> None:
  out, port, num_processes, process_id, stage = argv
  num_processes, process_id = int(num_processes), int(process_id)
  if num_processes > 1:
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    jax.distributed.initialize(coordinator_address=f'127.0.0.1:{port}',
                               num_processes=num_processes,
                               process_id=process_id)
  mesh = jax.make_mesh((jax.device_count(),), ('fsdp',),
                       axis_types=(jax.sharding.AxisType.Auto,))
  outputs = Outputs()
  checkpoint_dir = os.path.join(out, 'checkpoints')
  if stage == 'reference':
    stage_runs(mesh, outputs, checkpoint_dir, save=True, distributed=False)
  elif stage == 'distributed':
    stage_distributed(mesh, outputs, checkpoint_dir)
  elif stage == 'resume4':
    for name in RESUMED:
      trainer = Trainer(mesh, methods()[name])
      outputs.add(f'resumed/{name}', resume(trainer, name, checkpoint_dir))
  else:
    raise ValueError(f'unknown stage {stage!r}')
  outputs.save(out, stage)
  if num_processes > 1:
    jax.distributed.shutdown()


if __name__ == '__main__':
  main(sys.argv[1:])
