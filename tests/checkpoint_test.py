"""Checkpoint faults: corrupted or truncated steps, and a changed configuration.

``so.save_checkpoint`` / ``so.restore_checkpoint`` / ``so.restore_latest``
around an orbax ``CheckpointManager``. An unreadable step raises
``CheckpointCorruptError`` naming it, and ``restore_latest`` falls back to the
previous step (exactly as saved) with a warning naming the bad one. A step
saved with another rank, method, params tree, memory capacity or run config
raises ``CheckpointMismatchError`` naming what differs, without falling back.
(A process killed while saving: tests/checkpoint_faults_test.py.)
"""

import pathlib
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import subspace_optax as so
from subspace_optax import continual

PARAMS = {'w': jnp.linspace(-1.0, 1.0, 48).reshape(8, 6), 'b': jnp.ones(6)}
CONFIG = {'method': 'galore', 'rank': 2, 'tasks': 3}


def _galore(rank=2):
  return so.galore(1e-2, rank=rank, refresh=2)


def _states(tx, count, params=PARAMS):
  """``count`` distinct states: one per update on a fixed gradient."""
  state, states = tx.init(params), []
  grads = jax.tree.map(lambda p: jnp.cos(3.0 * p), params)
  for _ in range(count):
    _, state = tx.update(grads, state, params)
    states.append(state)
  return states


def _manager(directory):
  return ocp.CheckpointManager(
      directory, options=ocp.CheckpointManagerOptions(
          enable_async_checkpointing=False, create=True))


def _saved(directory, tx, steps=(1, 2, 3), config=CONFIG, params=PARAMS):
  manager = _manager(directory)
  states = dict(zip(steps, _states(tx, len(steps), params)))
  for step, state in states.items():
    so.save_checkpoint(manager, step, state, progress={'step': step},
                       config=config)
  return manager, states


def _bytes(tree):
  return [np.asarray(leaf).tobytes() for leaf in jax.tree.leaves(tree)]


def _truncate(path: pathlib.Path) -> None:
  data = path.read_bytes()
  path.write_bytes(data[:len(data) // 2])


def _flip(path: pathlib.Path) -> None:
  data = bytearray(path.read_bytes())
  data[len(data) // 2] ^= 0x10
  path.write_bytes(bytes(data))


def _array_file(directory, step) -> pathlib.Path:
  """The file holding the step's array data (orbax's OCDBT store)."""
  files = [p for p in (pathlib.Path(directory) / str(step) / 'state' / 'd')
           .iterdir() if p.is_file()]
  assert files
  return max(files, key=lambda p: p.stat().st_size)


@pytest.mark.parametrize('damage', [
    'truncate_arrays', 'flip_arrays', 'truncate_metadata',
    'delete_metadata', 'truncate_progress'])
def test_an_unreadable_step_is_named_and_the_previous_one_restored(
    tmp_path, damage):
  tx = _galore()
  manager, states = _saved(tmp_path, tx)
  step_dir = tmp_path / '3'
  if damage == 'truncate_arrays':
    _truncate(_array_file(tmp_path, 3))
  elif damage == 'flip_arrays':
    _flip(_array_file(tmp_path, 3))
  elif damage == 'truncate_metadata':
    _truncate(step_dir / 'state' / '_METADATA')
  elif damage == 'delete_metadata':
    (step_dir / 'state' / '_METADATA').unlink()
  else:
    _truncate(step_dir / 'progress' / 'metadata')
  target = jax.eval_shape(tx.init, PARAMS)
  manager = _manager(tmp_path)  # a fresh process's view

  with pytest.raises(so.CheckpointCorruptError) as error:
    so.restore_checkpoint(manager, 3, target, config=CONFIG)
  message = str(error.value)
  assert 'step 3' in message and str(step_dir) in message, message
  assert 'restore_latest' in message and 'delete' in message, message

  # The two good steps still restore exactly.
  assert _bytes(so.restore_checkpoint(manager, 2, target)[0]) == _bytes(
      states[2])
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter('always')
    step, state, progress = so.restore_latest(manager, target, config=CONFIG)
  assert (step, progress) == (2, {'step': 2})
  assert _bytes(state) == _bytes(states[2])
  assert _bytes(state) != _bytes(states[3])
  skipped = [w for w in caught
             if issubclass(w.category, so.CheckpointSkippedWarning)]
  assert len(skipped) == 1, [str(w.message) for w in caught]
  assert 'Skipping checkpoint step 3' in str(skipped[0].message)
  assert str(step_dir) in str(skipped[0].message)
  assert skipped[0].filename == __file__  # points at the caller's line


def test_a_step_another_process_cannot_read_is_skipped_by_all(
    tmp_path, monkeypatch):
  """Multi-process: every process reads its own shards; they skip together."""
  from subspace_optax._src.state import checkpoint as checkpoint_lib
  tx = _galore()
  _, states = _saved(tmp_path, tx)
  reads = []

  def every_process_read(read):  # process 1 cannot read step 3's shards
    reads.append(read)
    return read and len(reads) > 1

  monkeypatch.setattr(checkpoint_lib, '_read_by_every_process',
                      every_process_read)
  with pytest.warns(so.CheckpointSkippedWarning,
                    match='step 3.*another process could not read'):
    step, state, _ = so.restore_latest(
        _manager(tmp_path), jax.eval_shape(tx.init, PARAMS), config=CONFIG)
  assert reads == [True, True]  # this process read step 3, then step 2
  assert step == 2 and _bytes(state) == _bytes(states[2])


def test_no_readable_step_raises_naming_every_step(tmp_path):
  tx = _galore()
  manager, _ = _saved(tmp_path, tx, steps=(1, 2))
  for step in (1, 2):
    _truncate(_array_file(tmp_path, step))
  with warnings.catch_warnings():
    warnings.simplefilter('ignore', so.CheckpointSkippedWarning)
    with pytest.raises(so.CheckpointCorruptError) as error:
      so.restore_latest(_manager(tmp_path), jax.eval_shape(tx.init, PARAMS))
  message = str(error.value)
  assert 'No checkpoint' in message and 'step 1' in message, message
  assert 'step 2' in message, message


def test_an_empty_directory_restores_nothing(tmp_path):
  target = jax.eval_shape(_galore().init, PARAMS)
  assert so.restore_latest(_manager(tmp_path), target) == (None, None, None)


def _mismatch(tmp_path, saved_tx, tx, *, params=PARAMS, saved_params=PARAMS,
              config=CONFIG, saved_config=CONFIG) -> str:
  """The message of the mismatch; never a fallback to an earlier step."""
  _saved(tmp_path, saved_tx, steps=(1, 2), config=saved_config,
         params=saved_params)
  target = jax.eval_shape(tx.init, params)
  with warnings.catch_warnings():
    warnings.simplefilter('error', so.CheckpointSkippedWarning)
    with pytest.raises(so.CheckpointMismatchError) as error:
      so.restore_latest(_manager(tmp_path), target, config=config)
  assert isinstance(error.value, ValueError)
  message = str(error.value)
  assert 'step 2' in message, message  # the newest step, not a fallback
  return message


def test_another_rank_names_the_leaves(tmp_path):
  message = _mismatch(tmp_path, _galore(rank=3), _galore(rank=2))
  assert ("0/basis/w: checkpoint ((6, 3), 'float32'), this optimizer "
          "((6, 2), 'float32')") in message, message
  assert 'rank' in message and 'Do not disable' in message


def test_another_method_names_the_missing_leaves(tmp_path):
  message = _mismatch(tmp_path, _galore(), so.low_rank(
      optax.scale_by_adam(), rank=2, refresh=2))
  assert 'basis/w: missing from the checkpoint' in message, message
  assert '0/basis/w: in the checkpoint' in message, message


def test_another_params_tree_names_the_new_leaf(tmp_path):
  params = dict(PARAMS, v=jnp.ones((4, 5)))
  message = _mismatch(tmp_path, _galore(), _galore(), params=params)
  assert '0/basis/v: missing from the checkpoint' in message, message
  assert "0/inner_state/mu/v: missing" in message, message


def _gpm_ewc(capacity):
  return continual.gpm_ewc(1e-2, strength=1.0, capacity=capacity)


def test_another_memory_capacity_names_the_memory(tmp_path):
  # A memory sized for more tasks (more protected columns) than was saved.
  message = _mismatch(tmp_path, _gpm_ewc(capacity=2), _gpm_ewc(capacity=4))
  assert "memory/w/left: checkpoint ((8, 2), 'float32'), this optimizer " \
         "((8, 4), 'float32')" in message, message
  assert 'memory capacity' in message


def test_another_number_of_tasks_in_the_config_is_named(tmp_path):
  message = _mismatch(tmp_path, _gpm_ewc(2), _gpm_ewc(2),
                      config=dict(CONFIG, tasks=5))
  assert 'tasks: saved 3, now 5' in message, message
  assert str(tmp_path / '2') in message and 'another config' in message
  assert 'rank' not in message.split('another config')[1].split('.')[0]


def test_a_step_saved_without_config_is_refused_when_one_is_given(tmp_path):
  tx = _galore()
  _saved(tmp_path, tx, steps=(1,), config=None)
  target = jax.eval_shape(tx.init, PARAMS)
  with pytest.raises(so.CheckpointMismatchError, match='holds no config'):
    so.restore_checkpoint(_manager(tmp_path), 1, target, config=CONFIG)
  state, progress = so.restore_checkpoint(_manager(tmp_path), 1, target)
  assert progress == {'step': 1}
  assert _bytes(state) == _bytes(_states(tx, 1)[0])


def test_check_config_names_missing_and_changed_keys():
  so.check_config({'rank': 2, 'shape': (3, 4)}, {'rank': 2, 'shape': [3, 4]})
  with pytest.raises(so.CheckpointMismatchError) as error:
    so.check_config({'rank': 2, 'tasks': 3}, {'rank': 4, 'seed': 0},
                    where='run/7')
  message = str(error.value)
  for fragment in ('run/7 was saved with another config',
                   'rank: saved 2, now 4', 'seed: saved (absent), now 0',
                   'tasks: saved 3, now (absent)'):
    assert fragment in message, message


def test_step_directories_with_a_prefix_and_padding_are_found(tmp_path):
  manager = ocp.CheckpointManager(
      tmp_path, options=ocp.CheckpointManagerOptions(
          step_prefix='ckpt', step_format_fixed_length=4, create=True))
  tx = _galore()
  states = _states(tx, 2)
  for step, state in zip((1, 2), states):
    so.save_checkpoint(manager, step, state, config=CONFIG)
  assert (tmp_path / 'ckpt_0002').is_dir()
  _truncate(tmp_path / 'ckpt_0002' / 'state' / '_METADATA')
  target = jax.eval_shape(tx.init, PARAMS)
  with pytest.warns(so.CheckpointSkippedWarning, match='ckpt_0002'):
    step, state, _ = so.restore_latest(manager, target, config=CONFIG)
  assert step == 1 and _bytes(state) == _bytes(states[0])
