"""Exact resume with orbax: train, save, restore in a fresh process, continue.

For every registered method: ``K`` updates, an orbax save of the optimizer
state, ``M`` more updates in this process (the uninterrupted run); a fresh
Python process restores the checkpoint into ``jax.eval_shape(tx.init, params)``
and makes the same ``M`` updates. Updates and final states must agree bit for
bit. All methods share one subprocess to pay its start-up once.
"""

import os
import subprocess
import sys

import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import registry
import subspace_optax as so

K, M = 4, 3  # updates before and after the checkpoint (REFRESH = 3: crosses one)
TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)

CHILD = r'''
import sys
import jax
import numpy as np
import orbax.checkpoint as ocp
import registry

root, before, after, names = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4:]
checkpointer = ocp.StandardCheckpointer()
for name in names:
  tx, step, _, params = registry.compiled(name)
  abstract = jax.eval_shape(tx.init, params)
  state = checkpointer.restore(f'{root}/{name}', abstract)
  outputs = []
  for t in range(before, before + after):
    updates, state = step(registry.gradients(params, t), state, params,
                          **registry.EXTRA_ARGS)
    outputs.append(updates)
  np.savez(f'{root}/{name}.npz', *registry.as_bytes((outputs, state)))
'''


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  """``{name: (uninterrupted bytes, resumed bytes)}`` for every method."""
  root = tmp_path_factory.mktemp('resume')
  checkpointer = ocp.StandardCheckpointer()
  uninterrupted = {}
  for name in registry.NAMES:
    tx, step, _, params = registry.compiled(name)
    state = tx.init(params)
    for t in range(K):
      _, state = step(registry.gradients(params, t), state, params,
                      **registry.EXTRA_ARGS)
    checkpointer.save(root / name, state)
    outputs = []
    for t in range(K, K + M):
      updates, state = step(registry.gradients(params, t), state, params,
                            **registry.EXTRA_ARGS)
      outputs.append(updates)
    uninterrupted[name] = registry.as_bytes((outputs, state))
  checkpointer.wait_until_finished()
  env = dict(os.environ)
  env['PYTHONPATH'] = os.pathsep.join(
      [TESTS, ROOT] + [p for p in [env.get('PYTHONPATH')] if p])
  result = subprocess.run(
      [sys.executable, '-c', CHILD, str(root), str(K), str(M), *registry.NAMES],
      env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
  assert result.returncode == 0, result.stderr[-5000:]
  resumed = {}
  for name in registry.NAMES:
    with np.load(root / f'{name}.npz') as saved:
      resumed[name] = [saved[f'arr_{i}'] for i in range(len(saved.files))]
  return {name: (uninterrupted[name], resumed[name]) for name in registry.NAMES}


@pytest.mark.slow  # one subprocess that saves and restores every method
@pytest.mark.parametrize('name', registry.NAMES)
def test_resume_in_a_fresh_process_is_bit_exact(runs, name):
  uninterrupted, resumed = runs[name]
  assert len(uninterrupted) == len(resumed)
  for i, (a, b) in enumerate(zip(uninterrupted, resumed)):
    assert np.array_equal(a, b), f'{name}: leaf {i} differs after resume'


# Key paths are what orbax stores: renaming a state field or reordering chain
# stages breaks every saved checkpoint. Change these only with a migration note.
GALORE_STATE = [
    ("[0].count", (), 'int32'),
    ("[0].basis['stack']", (2, 9, 2), 'float32'),
    ("[0].basis['w']", (8, 2), 'float32'),
    ("[0].refresh['stack'].next_refresh", (), 'int32'),
    ("[0].refresh['stack'].offset", (), 'int32'),
    ("[0].refresh['w'].next_refresh", (), 'int32'),
    ("[0].refresh['w'].offset", (), 'int32'),
    ("[0].inner_state.count", (), 'int32'),
    ("[0].inner_state.mu['b']", (4,), 'float32'),
    ("[0].inner_state.mu['stack']", (2, 2, 5), 'float32'),
    ("[0].inner_state.mu['w']", (2, 6), 'float32'),
    ("[0].inner_state.nu['b']", (4,), 'float32'),
    ("[0].inner_state.nu['stack']", (2, 2, 5), 'float32'),
    ("[0].inner_state.nu['w']", (2, 6), 'float32'),
]


def _layout(tx):
  state = jax.eval_shape(tx.init, registry.make_params())
  return [(jax.tree_util.keystr(path), tuple(leaf.shape), str(leaf.dtype))
          for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]]


def test_golden_state_structure_of_galore_and_low_rank():
  galore = so.galore(1e-3, rank=2, refresh=3,
                     dimension_numbers=so.last_two_axes, side='compact')
  assert _layout(galore) == GALORE_STATE
  low_rank = so.low_rank(optax.scale_by_adam(), rank=2, refresh=3,
                         dimension_numbers=so.last_two_axes, side='compact')
  assert _layout(low_rank) == [
      (path[len('[0]'):], shape, dtype) for path, shape, dtype in GALORE_STATE]


def _galore(rank):
  return so.galore(1e-3, rank=rank, refresh=3,
                   dimension_numbers=so.last_two_axes, side='compact')


def test_checkpoint_from_another_config_is_refused_clearly(tmp_path):
  params = registry.make_params()
  saved_tx = _galore(rank=3)
  state = saved_tx.init(params)
  _, state = saved_tx.update(registry.gradients(params, 0), state, params)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(tmp_path / 'ckpt', state)
  checkpointer.wait_until_finished()
  metadata = checkpointer.metadata(tmp_path / 'ckpt')

  # The configuration it was saved with fits, and restores bit-exactly.
  same = jax.eval_shape(_galore(rank=3).init, params)
  so.check_compatible(same, metadata)
  restored = checkpointer.restore(tmp_path / 'ckpt', same)
  assert all(np.array_equal(a, b) for a, b in zip(
      registry.as_bytes(restored), registry.as_bytes(state), strict=True))

  # Another rank: every basis and moment is named, with the cause.
  other = jax.eval_shape(_galore(rank=2).init, params)
  with pytest.raises(ValueError) as error:
    so.check_compatible(other, metadata)
  message = str(error.value)
  for fragment in ('0/basis/w: checkpoint ((8, 3), \'float32\'), this '
                   'optimizer ((8, 2), \'float32\')', '0/inner_state/mu/stack',
                   'another configuration (rank', 'Do not disable'):
    assert fragment in message, message
  # orbax itself refuses too (no silent truncation of the basis). Shown on one
  # basis alone: refusing one leaf of many, orbax 0.12.8 closes its event loop
  # while the other leaves' reads are in flight, and those print pages of
  # "Event loop is closed" and "Exception ignored" when they finish.
  checkpointer.save(tmp_path / 'basis', {'w': state[0].basis['w']})
  checkpointer.wait_until_finished()
  with pytest.raises(ValueError, match='not compatible with the stored shape'):
    checkpointer.restore(tmp_path / 'basis', {'w': other[0].basis['w']})

  # Another method (no chain around low_rank): the missing paths are named.
  bare = jax.eval_shape(
      so.low_rank(optax.scale_by_adam(), rank=3, refresh=3,
                  dimension_numbers=so.last_two_axes, side='compact').init, params)
  with pytest.raises(ValueError, match='basis/w: missing from the checkpoint'):
    so.check_compatible(bare, metadata)
  # Restored states and abstract trees are accepted as well as metadata.
  so.check_compatible(same, restored)
  with pytest.raises(ValueError, match='0/basis/w'):
    so.check_compatible(other, restored)
