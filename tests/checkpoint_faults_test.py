"""A process killed (SIGKILL) in the middle of a checkpoint save.

A child process trains a small GaLore model and saves with
``so.save_checkpoint`` every ``EVERY`` steps. In the killed run, the save of
step ``HANG`` blocks once orbax has started writing it (its temporary
directory exists); the parent then kills the child with SIGKILL. A second
child resumes with ``so.restore_latest``: it must start from the last complete
step, restore exactly the state an uninterrupted run had there, and finish
with the uninterrupted run's final state, bit for bit. The steps saved before
the kill stay readable and exact.
"""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import subspace_optax as so

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)
STEPS, EVERY, HANG = 10, 2, 6  # the save of step 6 is killed
CONFIG = {'method': 'galore', 'rank': 2, 'refresh': 3}


def _optimizer():
  return so.galore(1e-2, rank=CONFIG['rank'], refresh=CONFIG['refresh'])


def _params():
  return {'w': jnp.linspace(-1.0, 1.0, 48).reshape(8, 6), 'b': jnp.zeros(6)}


def _step_fn(tx):
  @jax.jit
  def step(state, t):
    x = jax.random.normal(jax.random.fold_in(jax.random.PRNGKey(0), t), (16, 8))
    def loss(p):
      return jnp.mean((jnp.tanh(x @ p['w'] + p['b']) - 0.5) ** 2)
    grads = jax.grad(loss)(state['params'])
    updates, opt_state = tx.update(grads, state['opt_state'], state['params'])
    return {'params': optax.apply_updates(state['params'], updates),
            'opt_state': opt_state}
  return step


def _fresh_state(tx):
  params = _params()
  return {'params': params, 'opt_state': tx.init(params)}


def _flat(state) -> list[np.ndarray]:
  return [np.asarray(leaf) for leaf in jax.tree.leaves(state)]


def _hang_at(step: int, marker: pathlib.Path) -> None:
  """Make the save whose progress record is ``{'step': step}`` block forever,
  after writing ``marker``: the parent kills the process then."""
  original = ocp.JsonCheckpointHandler.async_save

  async def async_save(self, directory, item=None, args=None):
    record = args.item if args is not None else item
    if isinstance(record, dict) and record.get('step') == step:
      marker.write_text(str(directory))
      while True:
        time.sleep(1.0)
    return await original(self, directory, item=item, args=args)

  ocp.JsonCheckpointHandler.async_save = async_save


def child(run_dir: str, hang: int) -> None:
  """Train to ``STEPS``, resuming from the latest checkpoint in ``run_dir``;
  write the restored and final states to ``run_dir``."""
  run = pathlib.Path(run_dir)
  if hang:
    _hang_at(hang, run / 'saving')
  tx = _optimizer()
  step_fn = _step_fn(tx)
  manager = ocp.CheckpointManager(
      run / 'checkpoints', options=ocp.CheckpointManagerOptions(
          enable_async_checkpointing=False, create=True))
  target = jax.eval_shape(lambda: _fresh_state(tx))
  start, state, progress = so.restore_latest(manager, target, config=CONFIG)
  if start is None:
    start, state = 0, _fresh_state(tx)
  else:
    assert progress == {'step': start}, progress
    np.savez(run / f'restored_{start}.npz', *_flat(state))
  for t in range(start, STEPS):
    state = step_fn(state, t)
    if (t + 1) % EVERY == 0:
      so.save_checkpoint(manager, t + 1, state, progress={'step': t + 1},
                         config=CONFIG)
  np.savez(run / 'final.npz', *_flat(state))
  (run / 'started_at').write_text(json.dumps(start))


def _spawn(run_dir, hang=0):
  env = dict(os.environ)
  env['PYTHONPATH'] = os.pathsep.join(
      [TESTS, ROOT] + [p for p in [env.get('PYTHONPATH')] if p])
  code = ('import sys, checkpoint_faults_test as t; '
          't.child(sys.argv[1], int(sys.argv[2]))')
  return subprocess.Popen(
      [sys.executable, '-c', code, str(run_dir), str(hang)], env=env,
      cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _load(path) -> list[np.ndarray]:
  with np.load(path) as saved:
    return [saved[f'arr_{i}'] for i in range(len(saved.files))]


def _equal(a, b) -> bool:
  return len(a) == len(b) and all(
      x.dtype == y.dtype and np.array_equal(x, y) for x, y in zip(a, b))


@pytest.mark.slow  # two Python processes that import JAX and orbax
def test_sigkill_during_a_save_resumes_from_the_last_complete_step(tmp_path):
  # The uninterrupted run, in this process: the state after every step.
  tx = _optimizer()
  step_fn = _step_fn(tx)
  state, reference = _fresh_state(tx), {}
  for t in range(STEPS):
    state = step_fn(state, t)
    reference[t + 1] = _flat(state)

  # Killed while saving step HANG: orbax has begun writing it.
  process = _spawn(tmp_path, hang=HANG)
  deadline = time.monotonic() + 240
  while not (tmp_path / 'saving').exists():
    if process.poll() is not None:
      pytest.fail('the child ended before the hung save:\n'
                  + process.stdout.read()[-3000:])
    assert time.monotonic() < deadline, 'the child never reached the save'
    time.sleep(0.05)
  in_progress = [p.name for p in (tmp_path / 'checkpoints').iterdir()
                 if p.name.startswith(f'{HANG}.') or p.name == str(HANG)]
  process.send_signal(signal.SIGKILL)
  process.communicate(timeout=60)
  assert process.returncode == -signal.SIGKILL
  assert in_progress and all('tmp' in name for name in in_progress), (
      f'expected only a temporary directory of step {HANG}: {in_progress}')
  assert not (tmp_path / 'final.npz').exists()

  # Every complete step is still there and exact; the killed one is not a step.
  manager = ocp.CheckpointManager(
      tmp_path / 'checkpoints',
      options=ocp.CheckpointManagerOptions(enable_async_checkpointing=False))
  complete = list(range(EVERY, HANG, EVERY))
  assert manager.all_steps() == complete
  target = jax.eval_shape(lambda: _fresh_state(tx))
  for step in complete:
    restored, progress = so.restore_checkpoint(manager, step, target,
                                               config=CONFIG)
    assert progress == {'step': step}
    assert _equal(_flat(restored), reference[step]), f'step {step} changed'

  # The restart resumes from the last complete step and ends bit-exactly.
  process = _spawn(tmp_path)
  output, _ = process.communicate(timeout=300)
  assert process.returncode == 0, output[-5000:]
  last = complete[-1]
  assert json.loads((tmp_path / 'started_at').read_text()) == last
  assert _equal(_load(tmp_path / f'restored_{last}.npz'), reference[last])
  assert _equal(_load(tmp_path / 'final.npz'), reference[STEPS])
  # The step that was killed is saved again, complete, by the resumed run.
  manager = ocp.CheckpointManager(
      tmp_path / 'checkpoints',
      options=ocp.CheckpointManagerOptions(enable_async_checkpointing=False))
  assert manager.all_steps() == list(range(EVERY, STEPS + 1, EVERY))
  restored, _ = so.restore_checkpoint(manager, HANG, target)
  assert _equal(_flat(restored), reference[HANG])
