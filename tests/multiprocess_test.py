"""Several processes: ``jax.distributed`` on CPU, 2 processes x 4 devices.

The worker (``tests/multiprocess_worker.py``, its docstring lists what each
stage does) runs three times:

1. ``reference``: 1 process x 8 devices, every method (galore, q_galore with
   8-bit moments, apollo_mini, frugal, and gpm_ewc across a task boundary);
   orbax checkpoints after ``SAVE_AT`` updates; galore by
   ``so.per_layer_train_step`` on a scanned stack and by the whole-tree step;
2. ``distributed``: 2 processes x 4 devices joined by ``jax.distributed``
   (a local coordinator on a free port, gloo collectives) over one global
   8-device mesh: the same runs, faults on one process only, a deliberately
   diverged process, and the checkpoints of stage 1 restored and continued;
3. ``resume4``: 1 process x 4 devices, the checkpoints restored and continued.

The runs must agree to float tolerance with the reference, and every process
must hold the same copy of each replicated leaf (counts, refresh schedules,
``apply_if_finite``'s skip counters, seeds) bit for bit: a process that takes
another refresh or skip decision is caught (the negative test makes one).
All stages share one module fixture: the start-up and compilation of each
process dominate. ``test_lm_example_resumes_on_two_processes`` runs the main
job, ``python -m examples.lm.train``, on 2 processes from a checkpoint of 1.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import multiprocess_worker as worker

slow = pytest.mark.slow

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)
TIMEOUT = 300  # seconds per stage; a hung collective must not hang the suite
# float32 runs on other device layouts sum in another order; an SVD basis
# moves by up to ~1e-5 then (measured: 0.74 of 2e-5/2e-6 at worst). A broken
# step (a dropped sign, the wrong end of the spectrum) moves it by O(1).
RTOL, ATOL = 1e-4, 1e-5
METHODS = tuple(worker.methods())
# What jax.distributed.initialize says when the coordinator's port is taken.
BIND_ERRORS = ('Failed to start RPC server', 'Address already in use')


def free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def run_processes(argvs: list[list[str]], devices: int, logs: str,
                  name: str) -> None:
  """Run one process per ``argvs`` entry (``python`` arguments), each with
  ``devices`` CPU devices, until all exit. Kills them all on a timeout or as
  soon as one fails, and fails with their output."""
  env = dict(os.environ)
  env['XLA_FLAGS'] = ' '.join(
      [f for f in env.get('XLA_FLAGS', '').split()
       if 'xla_force_host_platform_device_count' not in f]
      + [f'--xla_force_host_platform_device_count={devices}'])
  env['JAX_PLATFORMS'] = 'cpu'
  env['OPENBLAS_NUM_THREADS'] = '1'  # 4 devices x LAPACK on 2 cores
  env['PYTHONPATH'] = os.pathsep.join(
      [TESTS, ROOT] + [p for p in [env.get('PYTHONPATH')] if p])
  files = [open(os.path.join(logs, f'{name}.p{i}.log'), 'w+')
           for i in range(len(argvs))]
  procs = [subprocess.Popen([sys.executable, *argv], cwd=ROOT, env=env,
                            stdout=log, stderr=subprocess.STDOUT)
           for argv, log in zip(argvs, files)]
  deadline = time.monotonic() + TIMEOUT
  failed = None
  while any(p.poll() is None for p in procs):
    if time.monotonic() > deadline:
      failed = f'timed out after {TIMEOUT} s'
      break
    if any(p.poll() not in (None, 0) for p in procs):
      failed = 'a process failed'
      break
    time.sleep(0.2)
  for p in procs:  # only our own processes, by their handles
    if p.poll() is None:
      p.kill()
    p.wait()
  output = []
  for i, (p, log) in enumerate(zip(procs, files)):
    log.seek(0)
    output.append(f'--- process {i} (exit {p.returncode}):\n'
                  + log.read()[-4000:])
    log.close()
  if failed is None and any(p.returncode for p in procs):
    failed = 'a process failed'
  assert failed is None, f'{name}: {failed}\n' + '\n'.join(output)


def with_free_port(argvs, devices: int, logs: str, name: str) -> None:
  """:func:`run_processes` of ``argvs(port)``; once more on another port if
  the coordinator's port was taken between choosing it and binding it."""
  for attempt in range(2):
    try:
      return run_processes(argvs(free_port()), devices, logs, name)
    except AssertionError as error:
      if attempt or not any(text in str(error) for text in BIND_ERRORS):
        raise


def run_stage(out, stage: str, processes: int, devices: int):
  """The worker's ``stage`` on ``processes`` processes of ``devices`` CPU
  devices each: ``[{key: array}]`` per process."""
  with_free_port(
      lambda port: [[os.path.join(TESTS, 'multiprocess_worker.py'), str(out),
                     str(port), str(processes), str(i), stage]
                    for i in range(processes)],
      devices, str(out), stage)
  results = []
  for i in range(processes):
    with np.load(os.path.join(out, f'{stage}.p{i}.npz')) as saved:
      results.append(dict(saved))
  return results


@pytest.fixture(scope='module')
def stages(tmp_path_factory):
  out = tmp_path_factory.mktemp('multiprocess')
  seconds = {}
  results = {}
  for stage, processes, devices in (('reference', 1, 8),
                                    ('distributed', 2, 4),
                                    ('resume4', 1, 4)):
    began = time.perf_counter()
    results[stage] = run_stage(out, stage, processes, devices)
    seconds[stage] = time.perf_counter() - began
  print('multiprocess stages (s):', seconds)
  return results


def assemble(per_process: list[dict], run: str):
  """``({path: whole array}, [mismatch, ...])`` of ``run`` from the shards
  that every process saved; a mismatch names a part of a leaf whose copies
  on two devices (of one process or of two) are not bit for bit equal."""
  values, filled, mismatches = {}, {}, []
  prefix = f'{run}|'
  for process, result in enumerate(per_process):
    for key, data in result.items():
      if not key.startswith(prefix + 'shard|'):
        continue
      _, _, path, device = key.split('|')
      if path not in values:
        shape = tuple(result[f'{prefix}shape|{path}'])
        values[path] = np.zeros(shape, data.dtype)
        filled[path] = np.zeros(shape, bool)
      bounds = result[f'{prefix}index|{path}|{device}']
      region = tuple(slice(start, stop) for start, stop in bounds)
      seen = filled[path][region]
      old = values[path][region]
      if seen.any() and not np.array_equal(old[seen], data[seen],
                                           equal_nan=True):
        mismatches.append(f'{path}: device {device} of process {process} '
                          f'holds {data.tolist()}, another {old.tolist()}')
      values[path][region] = data
      filled[path][region] = True
  assert values, f'no run {run!r}'
  assert all(f.all() for f in filled.values()), f'{run}: missing shards'
  return values, mismatches


def leaves(per_process: list[dict], run: str) -> dict:
  """``{path: whole array}`` of ``run``; every copy agrees (checked)."""
  values, mismatches = assemble(per_process, run)
  assert not mismatches, (run, mismatches)
  return values


def runs_of(result: dict) -> set[str]:
  return {key.split('|')[0] for key in result}


def assert_close(actual: dict, expected: dict, what: str):
  assert actual.keys() == expected.keys(), what
  assert actual, what
  for path in expected:
    a, e = actual[path], expected[path]
    assert a.shape == e.shape and a.dtype == e.dtype, (what, path)
    if np.issubdtype(e.dtype, np.floating):
      np.testing.assert_allclose(a, e, rtol=RTOL, atol=ATOL,
                                 err_msg=f'{what}: {path}')
    elif e.dtype.itemsize == 1:  # 8-bit codes may round the other way
      np.testing.assert_array_less(
          np.abs(a.astype(np.int32) - e.astype(np.int32)), 2,
          err_msg=f'{what}: {path}')
    else:  # counters, schedules, seeds: exactly
      np.testing.assert_array_equal(a, e, err_msg=f'{what}: {path}')


@slow
@pytest.mark.parametrize('method', METHODS)
def test_two_processes_train_like_one(stages, method):
  """2 x 4 devices give the params and state of 1 x 8 devices."""
  reference = leaves(stages['reference'], method)
  assert_close(leaves(stages['distributed'], method), reference, method)
  # Something was trained: the params moved away from their initial value.
  assert not np.allclose(reference["[0]['w']"],
                         worker.initial_params_numpy()['w'])
  if method == 'gpm_ewc':  # the task boundary stored a memory and a Fisher
    assert reference["[1].inner_state[1].memory['w'].left_count"] > 0
    assert np.all(reference["[1].inner_state[0].fisher['w']"] > 0)


@slow
def test_per_layer_step_on_two_processes(stages):
  """``so.per_layer_train_step`` (galore, a 2-layer scanned stack sharded on
  its input dimension, refreshes at updates 0 and 2): 2 x 4 devices give the
  params, state and losses of 1 x 8, which equal the whole-tree step's."""
  reference = leaves(stages['reference'], 'per_layer/galore')
  assert_close(leaves(stages['distributed'], 'per_layer/galore'), reference,
               'per_layer')
  assert_close(reference, leaves(stages['reference'], 'whole/galore'),
               'per_layer vs whole-tree step')
  for stage in ('reference', 'distributed'):  # the shared state agreed
    assert all(leaves(stages[stage], 'per_layer/same').values()), stage
  initial = worker.per_layer_initial_numpy()
  assert not np.allclose(reference["['params']['blocks']['up']"],
                         initial['blocks']['up'])
  # Both refreshes ran: the next one is due at update 4.
  assert reference[
      "['state'][0].refresh['blocks']['up'].next_refresh"] == worker.STEPS


@slow
def test_every_copy_of_replicated_state_is_the_same(stages):
  """Every run of both processes: the copies of each replicated leaf on the
  devices of both processes agree bit for bit. The comparison covers the
  decisions: update counts, refresh schedules and apply_if_finite's skip
  counters, all replicated."""
  distributed = stages['distributed']
  runs = runs_of(distributed[0]) - {'diverged'}
  assert runs == runs_of(distributed[1]) - {'diverged'}
  for run in sorted(runs):
    _, mismatches = assemble(distributed, run)
    assert not mismatches, (run, mismatches)
  for method in METHODS:
    shards = [k.split('|')[2] for k in distributed[1]
              if k.startswith(f'{method}|shard|')]
    for field in ('.notfinite_count', '.total_notfinite', '.count'):
      assert any(path.endswith(field) for path in shards), (method, field)
    if method != 'gpm_ewc':
      assert any(path.endswith('.next_refresh') for path in shards), method


@slow
def test_a_diverged_process_is_flagged(stages):
  """Negative test: process 1's own copy of apollo_mini's refresh schedule is
  shifted by one update, so it refreshes on other steps than process 0; the
  comparison names the schedules and the seeds that then differ."""
  _, found = assemble(stages['distributed'], 'diverged')
  assert any('next_refresh' in line and 'process 1' in line
             for line in found), found
  assert any('seed' in line for line in found), found


@slow
def test_nan_gradient_on_one_process_is_skipped_everywhere(stages):
  """A NaN in the gradient rows held by process 1 only, at one update:
  ``optax.apply_if_finite`` skips that update on both processes (one skip
  counted everywhere), which is the same as never seeing that batch."""
  run = leaves(stages['distributed'], 'nan_step')
  assert run['[1].total_notfinite'] == 1
  assert all(np.all(np.isfinite(v)) for v in run.values()
             if np.issubdtype(v.dtype, np.floating))
  omitted = leaves(stages['distributed'], 'nan_step_omitted')
  kept = {k: v for k, v in run.items() if 'notfinite' not in k
          and 'last_finite' not in k}
  assert_close(kept, {k: omitted[k] for k in kept}, 'nan_step')
  assert_close(run, leaves(stages['reference'], 'nan_step'),
               'nan_step vs one process')


@slow
def test_nan_gradient_on_one_process_keeps_the_basis(stages):
  """Without apply_if_finite: a NaN in the rows of ``w`` held by process 1, at
  a due refresh (update 0), keeps the basis of ``w`` bit for bit on both
  processes, and its refresh stays due (the library's finite check is
  global); the finite leaf ``s`` refreshes as usual."""
  before = leaves(stages['distributed'], 'nan_refresh/before')
  after = leaves(stages['distributed'], 'nan_refresh/after')
  w, s = "[0].basis['w']", "[0].basis['s']"
  np.testing.assert_array_equal(after[w], before[w])
  assert np.all(np.isfinite(after[s])) and not np.allclose(after[s], before[s])
  key = "[0].refresh['w'].next_refresh"
  assert after[key] == before[key]  # still due
  key = "[0].refresh['s'].next_refresh"
  assert after[key] > before[key]


@slow
def test_failed_refresh_on_one_shard(stages):
  """A refresh whose basis comes out NaN on one layer of a stacked leaf, the
  layer held by process 1: every process keeps the old basis (no NaN) and the
  refresh stays due; the next good refresh runs on every process."""
  tree = {key: leaves(stages['distributed'], f'failed_basis/{key}')
          for key in ('before', 'failed', 'refreshed')}
  basis, schedule = ".basis['s']", ".refresh['s'].next_refresh"
  np.testing.assert_array_equal(tree['failed'][basis], tree['before'][basis])
  assert tree['failed'][schedule] == tree['before'][schedule]  # still due
  assert np.all(np.isfinite(tree['refreshed'][basis]))
  assert not np.allclose(tree['refreshed'][basis], tree['before'][basis])
  assert tree['refreshed'][schedule] > tree['before'][schedule]


@slow
@pytest.mark.parametrize('topology', ['distributed', 'resume4'])
@pytest.mark.parametrize('method', worker.RESUMED)
def test_resume_on_another_topology(stages, topology, method):
  """Saved with orbax on 1 process x 8 devices, restored on 2 x 4 or 1 x 4
  devices: the continuation equals the uninterrupted run."""
  assert_close(leaves(stages[topology], f'resumed/{method}'),
               leaves(stages['reference'], method),
               f'{method} resumed on {topology}')


# ----------------------------------------------------------------------------
# The main job, python -m examples.lm.train, on 2 processes.

LM_FLAGS = ['--dim', '32', '--layers', '1', '--heads', '2', '--ffn-dim', '64',
            '--seq-len', '32', '--batch-size', '8', '--eval-batches', '1',
            '--no-progress', '--no-plot', '--optimizer', 'galore',
            '--steps', '2', '--checkpoint-every', '1', '--keep', '2',
            '--mesh', 'data=2,fsdp=4']


def _lm_records(out) -> list[dict]:
  lines = (out / 'metrics.jsonl').read_text().splitlines()
  return [json.loads(line) for line in lines]


def _lm_checkpoint(out, step: int):
  """The model and optimizer state of checkpoint ``step``, on one device."""
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel

  path = (out / 'galore' / 'checkpoints' / str(step) / 'state').absolute()
  checkpointer = ocp.StandardCheckpointer()
  metadata = checkpointer.metadata(path)
  metadata = getattr(metadata, 'item_metadata', metadata)
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return checkpointer.restore(path, jax.tree.map(
      lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
      metadata))


@slow
def test_lm_example_resumes_on_two_processes(tmp_path):
  """The main job saved on 1 process x 8 devices after update 1 continues on
  2 processes x 4 devices (``--coordinator-address``, ``--num-processes``,
  ``--process-id``) exactly like the uninterrupted run: the same loss,
  validation loss and checkpoint of update 2, which both processes write
  together; process 0 alone writes the metrics and prints."""
  from examples.lm import train  # pylint: disable=import-outside-toplevel

  rng = np.random.default_rng(0)
  words = [b'def', b'return', b'self', b'import', b'class', b'(x)', b'\n']
  corpus = tmp_path / 'corpus.txt'
  corpus.write_bytes(b' '.join(rng.choice(words, 5000).tolist())[:20_000])
  flags = LM_FLAGS + ['--data', str(corpus)]
  uninterrupted, resumed = tmp_path / 'uninterrupted', tmp_path / 'resumed'
  summary = train.main(flags + ['--out', str(uninterrupted)])  # 1 x 8 devices
  shutil.copytree(uninterrupted, resumed)
  shutil.rmtree(resumed / 'galore' / 'checkpoints' / '2')
  with_free_port(
      lambda port: [
          ['-m', 'examples.lm.train', *flags, '--out', str(resumed),
           '--resume', '--coordinator-address', f'127.0.0.1:{port}',
           '--num-processes', '2', '--process-id', str(i)] for i in range(2)],
      4, str(tmp_path), 'lm')
  expected, records = _lm_records(uninterrupted), _lm_records(resumed)
  assert [r['step'] for r in records] == [1, 2]  # written once, by process 0
  assert records[0] == expected[0]
  for key in ('loss', 'val_loss'):
    np.testing.assert_allclose(records[1][key], expected[1][key], rtol=1e-5)
  written = json.loads((resumed / 'summary.json').read_text())
  np.testing.assert_allclose(written['runs'][0]['final_val_loss'],
                             summary['runs'][0]['final_val_loss'], rtol=1e-5)
  logs = [(tmp_path / f'lm.p{i}.log').read_text() for i in range(2)]
  assert 'resumed from' in logs[0] and 'resumed from' not in logs[1]
  want, got = _lm_checkpoint(uninterrupted, 2), _lm_checkpoint(resumed, 2)
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(got)[0],
                          jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4,
                               atol=1e-6, err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize('flags, message', [
    (['--num-processes', '0'], '--num-processes must be positive'),
    (['--num-processes', '2', '--process-id', '2'], '--process-id 2 is not in'),
    (['--num-processes', '2', '--process-id', '0'], 'needs --mesh'),
])
def test_lm_example_process_flags_are_checked(flags, message, capsys):
  from examples.lm import train  # pylint: disable=import-outside-toplevel

  with pytest.raises(SystemExit):
    train.parse_args(flags)
  assert message in capsys.readouterr().err


def test_lm_example_process_flags_fall_back_to_the_environment(monkeypatch):
  from examples.lm import train  # pylint: disable=import-outside-toplevel

  monkeypatch.setenv('JAX_COORDINATOR_ADDRESS', '10.0.0.1:1234')
  monkeypatch.setenv('JAX_NUM_PROCESSES', '4')
  monkeypatch.setenv('JAX_PROCESS_ID', '3')
  args = train.parse_args(['--mesh', 'data=4,fsdp=2'])
  assert (args.coordinator_address, args.num_processes, args.process_id) == (
      '10.0.0.1:1234', 4, 3)
  args = train.parse_args(['--mesh', 'data=4,fsdp=2', '--process-id', '1'])
  assert args.process_id == 1  # a flag wins
