"""A quick end-to-end run of examples/continual.py (digits, NNX MLP)."""

import importlib.util
import json

import numpy as np
import pytest

# Looked up, not imported (seconds at every test process's collection); the
# example imports them when it runs.
for _package in ('sklearn', 'matplotlib'):
  if importlib.util.find_spec(_package) is None:
    pytest.skip(f'needs {_package} (the examples extra)',
                allow_module_level=True)

from examples import continual as example  # pylint: disable=wrong-import-position

pytestmark = pytest.mark.slow


def test_tasks_are_padded_to_one_shape():
  tasks = example.load_tasks(example.Config(tasks='split', num_tasks=5))
  assert tasks.train_x.shape[:1] == (5,) and tasks.train_x.shape[2] == 64
  assert tasks.class_mask.sum(1).tolist() == [2] * 5
  for t in range(5):  # every real example belongs to the task's classes
    labels = tasks.test_y[t][tasks.test_valid[t]]
    assert set(np.unique(labels)) == {2 * t, 2 * t + 1}
  permuted = example.load_tasks(example.Config(tasks='permuted', num_tasks=2))
  np.testing.assert_allclose(np.sort(permuted.train_x[0], 1),
                             np.sort(permuted.train_x[1], 1))  # same pixels
  assert not np.allclose(permuted.train_x[0], permuted.train_x[1])


def test_rotated_tasks_turn_the_same_digits():
  x = np.random.default_rng(0).random((3, 64)).astype(np.float32)
  np.testing.assert_array_equal(example.rotate(x, 0), x)
  np.testing.assert_array_equal(  # a quarter turn, counter-clockwise
      example.rotate(x, 90).reshape(3, 8, 8),
      np.rot90(x.reshape(3, 8, 8), 1, axes=(1, 2)))
  tasks = example.load_tasks(example.Config(tasks='rotated', num_tasks=3,
                                            rotation_degrees=30.0))
  assert tasks.names == ['rotated 0', 'rotated 30', 'rotated 60']
  assert tasks.class_mask.all()
  np.testing.assert_array_equal(tasks.train_y[0], tasks.train_y[2])
  np.testing.assert_array_equal(tasks.train_x[2],
                                example.rotate(tasks.train_x[0], 60))


def test_quick_run_writes_the_matrix_json_and_plot(tmp_path):
  out_json, out_png = tmp_path / 'continual.json', tmp_path / 'continual.png'
  report = example.main(['--quick', '--methods', 'naive,ewc,gpm,sculpt',
                         '--json', str(out_json), '--plot', str(out_png)])
  saved = json.loads(out_json.read_text())
  assert set(saved['results']) == {'naive', 'ewc', 'gpm', 'sculpt'}
  assert out_png.stat().st_size > 10_000
  for name, result in report['results'].items():
    matrix = np.asarray(result['test'])
    assert matrix.shape == (3, 3) and np.all((matrix >= 0) & (matrix <= 1))
    assert matrix[0, 0] > 0.25, name  # learned the first task (chance: 0.1)
    assert set(result['test_summary']) >= {
        'average_accuracy', 'backward_transfer', 'forward_transfer'}
  # Same weights, data and learning rate, and sculpt's memory is empty during
  # the first task: the same first row as naive fine-tuning (up to rounding).
  assert (report['results']['naive']['hyper']['learning_rate'] ==
          report['results']['sculpt']['hyper']['learning_rate'])
  np.testing.assert_allclose(report['results']['naive']['test'][0],
                             report['results']['sculpt']['test'][0], atol=0.02)
  # The orthogonal methods filled their memories.
  for name in ('gpm', 'sculpt'):
    protected = report['results'][name]['protected']
    assert protected and max(protected.values()) > 0, name
