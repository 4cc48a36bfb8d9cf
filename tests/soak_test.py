"""Smoke test of benchmarks/soak.py: a short soak run and its invariants.

200 steps over two tasks (one boundary: EWC consolidation and GPM memory
growth), refreshes every 20 steps, 8-bit moments. The JSON must hold every
key the README's table reads, and the run must show: no compilation inside
the loop and one trace of the jitted step; no growth of the live arrays;
orthonormal bases and memory; a run restored from the final checkpoint that
continues with the same losses and params, bit for bit.
"""

import json

import pytest

from benchmarks import soak


@pytest.fixture(scope='module')
def report(tmp_path_factory):
  out = tmp_path_factory.mktemp('soak') / 'soak.json'
  result = soak.main(['--steps', '200', '--tasks', '2', '--refresh', '20',
                      '--samples', '20', '--continue-steps', '5',
                      '--out', str(out)])
  assert json.loads(out.read_text()) == json.loads(json.dumps(result))
  return result


@pytest.mark.slow  # compiles the step, the boundary and a restored run
def test_soak_report_keys_and_invariants(report):
  for key in ('device', 'date', 'command', 'config', 'seconds', 'ms_per_step',
              'memory', 'compilations', 'orthonormality', 'continuation',
              'loss', 'task_boundaries', 'refreshes', 'int8_moment_bytes'):
    assert key in report, key
  assert report['command'].startswith('python -m benchmarks.soak')
  assert report['config']['steps'] == 200
  assert report['task_boundaries'] == 1
  assert report['int8_moment_bytes'] > 0  # the moments really are 8-bit

  compilations = report['compilations']
  assert compilations['during_train_steps_by_quarter'] == [0, 0, 0, 0]
  assert compilations['in_loop_incl_boundaries'] == 0
  assert compilations['train_step_traces_after_loop'] == 1
  assert compilations['train_step_traces_at_end'] == 1
  assert compilations['restored_run_step_traces'] == 1

  memory = report['memory']
  assert memory['samples'] >= 20
  live = memory['live_array_bytes']
  assert live['last_quarter_median'] <= live['first_quarter_median']
  assert live['max'] == live['min']  # the same state throughout
  assert memory['rss_bytes']['first_quarter_median'] > 0
  assert len(memory['trace']) == memory['samples']

  assert report['orthonormality']['basis_max_abs_QtQ_minus_I'] <= 1e-5
  assert report['orthonormality']['memory_max_abs_QtQ_minus_I'] <= 1e-5

  continuation = report['continuation']
  assert continuation['restored_step'] == 200
  assert continuation['restored_progress'] == {'step': 200}
  assert len(continuation['run_losses']) == 5
  assert continuation['run_losses'] == continuation['restored_losses']
  assert continuation['equal'] is True
  assert continuation['max_abs_loss_difference'] == 0.0

  loss = report['loss']
  assert loss['last'] < loss['first']  # it trains
  assert len(loss['end_of_each_task']) == 2


def test_soak_flags_are_checked():
  with pytest.raises(SystemExit):
    soak.parse(['--steps', '3', '--tasks', '2'])
