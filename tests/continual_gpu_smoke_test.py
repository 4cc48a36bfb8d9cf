"""Smoke test of benchmarks/continual_gpu.py: the --smoke run, in-process.

Not a quality or speed check (a few steps of a one-block model on a loaded
CPU); it checks that the GPU script runs end to end and that its JSON and
markdown hold what the GPU run will be read for.
"""

import json
import math

import numpy as np
import pytest

from benchmarks import continual_gpu
from benchmarks import continual_methods
from examples import continual_lm

pytestmark = pytest.mark.slow

METHODS = ('naive', continual_methods.RECOMMENDED)
# Used only for a method that continual_lm.defaults does not cover (yet).
FALLBACK_HYPER = {
    'gpm_ewc': {'learning_rate': 1e-3, 'threshold': 0.9, 'strength': 1000.0},
}


@pytest.fixture(scope='module')
def smoke(tmp_path_factory):
  out = tmp_path_factory.mktemp('continual_gpu') / 'continual.json'
  defaults = continual_lm.defaults(continual_gpu.SMOKE_CONFIG)
  hyper = {m: FALLBACK_HYPER[m] for m in METHODS if m not in defaults}
  argv = ['--smoke', '--methods', ','.join(METHODS), '--out', str(out)]
  if hyper:
    argv += ['--hyper', json.dumps(hyper)]
  return continual_gpu.main(argv), out


def test_json_holds_every_method_with_finite_matrices(smoke):
  report, out = smoke
  assert json.loads(out.read_text()) == json.loads(json.dumps(report))
  assert report['methods_requested'] == list(METHODS)
  assert report['methods_run'] == list(METHODS)
  assert report['skipped'] == []
  assert report['recommended'] == continual_methods.RECOMMENDED
  assert continual_methods.RECOMMENDED in report['results']
  count = len(report['tasks'])
  assert report['tasks'][0] == 'python' and count >= 2
  for name in METHODS:
    result = report['results'][name]
    for split in ('test', 'val'):
      matrix = np.asarray(result[split])
      assert matrix.shape == (count, count)
      assert np.all(np.isfinite(matrix))
    assert all(math.isfinite(v) for v in result['test_summary'].values())
    assert len(result['boundary_seconds']) == count - 1


def test_records_device_config_and_positive_timings(smoke):
  report, _ = smoke
  assert report['device'] and report['platform']
  assert report['versions']['jax'] and report['date'].endswith('+00:00')
  assert report['config']['pretrain_steps'] > 0
  assert report['config']['dim'] == continual_gpu.SMOKE_CONFIG.dim
  timings = report['timings']
  assert timings['load_seconds'] > 0 and timings['pretrain_seconds'] > 0
  for name in METHODS:
    method = timings['methods'][name]
    assert method['wall_seconds'] >= method['train_seconds'] > 0
    assert method['median_boundary_seconds'] >= 0
  assert timings['total_seconds'] > sum(
      m['wall_seconds'] for m in timings['methods'].values())
  assert all(d['ran'] for d in report['budget']['decisions'])


def test_markdown_has_the_summary_and_the_recommended_matrix(smoke):
  report, out = smoke
  table = out.with_suffix('.md').read_text()
  assert '| naive |' in table
  assert f'| {continual_methods.RECOMMENDED} (recommended) |' in table
  assert '| after \\ on | ' + ' | '.join(report['tasks']) + ' |' in table


def test_prediction_and_order():
  assert continual_gpu.predicted_seconds([]) == 0.0
  assert continual_gpu.predicted_seconds([2.0, 4.0]) == pytest.approx(
      continual_gpu.MARGIN * 4.0)
  order = continual_gpu.ORDER
  assert sorted(order) == sorted(continual_methods.METHODS)
  baselines = continual_methods.BASELINES
  assert order[:len(baselines) + 1] == (*baselines,
                                        continual_methods.RECOMMENDED)


def test_budget_skips_the_remaining_methods_and_says_so(tmp_path, monkeypatch):
  # Any method after the first is predicted to overrun the budget.
  monkeypatch.setattr(continual_gpu, 'predicted_seconds',
                      lambda walls: 1e9 if walls else 0.0)
  out = tmp_path / 'cut.json'
  report = continual_gpu.main(['--smoke', '--methods', 'naive,l2,ewc',
                               '--out', str(out)])
  assert report['methods_run'] == ['naive']
  assert [s['method'] for s in report['skipped']] == ['l2', 'ewc']
  assert all(s['reason'] == 'time budget' for s in report['skipped'])
  assert [d['ran'] for d in report['budget']['decisions']] == [
      True, False, False]
  table = out.with_suffix('.md').read_text()
  assert '| l2 | skipped (time budget) |' in table
  assert f'{continual_methods.RECOMMENDED} did not run.' in table


def test_missing_hyper_parameters_fail_before_running():
  config = continual_gpu.SMOKE_CONFIG
  with pytest.raises(ValueError, match='--hyper'):
    continual_gpu.hyper_for(config, ['naive', 'no_such_method'], {})
  with pytest.raises(ValueError, match='Unknown methods'):
    continual_gpu.parse_methods('naive,nope')
