"""The quality-drift check (benchmarks/quality_drift.py) on a tiny config: a
baseline is written, the same run passes against it, an injected drift fails
with the offender named, and an incomparable set-up is refused. The numbers of
a 6-step dim-32 run mean nothing; the comparison logic is what is tested."""

import json

import pytest

from benchmarks import quality_drift

pytestmark = pytest.mark.slow

TINY = ['--tiny', '--methods', 'adamw,galore', '--seeds', '0,1']


@pytest.fixture(scope='module')
def tiny_run(tmp_path_factory):
  directory = tmp_path_factory.mktemp('drift')
  run, baseline = directory / 'run.json', directory / 'baseline.json'
  status = quality_drift.main(TINY + ['--out', str(run), '--baseline',
                                      str(baseline), '--update-baseline'])
  assert status == 0
  return run, baseline


def _check(run, baseline, capsys):
  status = quality_drift.main(['--from-results', str(run), '--baseline',
                               str(baseline)])
  return status, capsys.readouterr().out


def test_baseline_records_the_set_up(tiny_run):
  _, baseline = tiny_run
  data = json.loads(baseline.read_text())
  for key in ('device', 'cores', 'date', 'commit', 'command', 'seeds', 'steps',
              'tolerance', 'rows'):
    assert key in data, key
  assert data['device'] == 'cpu' and data['seeds'] == [0, 1]
  assert '--update-baseline' in data['command']
  galore = data['rows']['galore']
  assert len(galore['runs']) == 2 and galore['ratio_std'] is not None
  assert data['rows']['adamw']['ratio_mean'] == pytest.approx(1.0)


def test_the_same_numbers_pass(tiny_run, capsys):
  status, out = _check(*tiny_run, capsys)
  assert status == 0, out
  assert 'galore' in out and 'DRIFT' not in out


def test_a_drift_beyond_the_tolerance_fails(tiny_run, tmp_path, capsys):
  run, baseline = tiny_run
  data = json.loads(baseline.read_text())
  tolerance = quality_drift.tolerance(data, 'galore')
  # Within the tolerance: still passes.
  data['rows']['galore']['ratio_mean'] += 0.5 * tolerance
  edited = tmp_path / 'within.json'
  edited.write_text(json.dumps(data))
  assert _check(run, edited, capsys)[0] == 0
  # Beyond it (the baseline's std and the pooled std unchanged): fails.
  data['rows']['galore']['ratio_mean'] += 2 * tolerance
  edited = tmp_path / 'beyond.json'
  edited.write_text(json.dumps(data))
  status, out = _check(run, edited, capsys)
  assert status == 1
  offenders = out.split('drifted beyond seed noise')[1]
  assert '| galore |' in offenders and 'DRIFT' in offenders


def test_the_tolerance_is_k_seed_stds_with_a_floor():
  baseline = {'tolerance': {'k': 4.0, 'floor': 0.005}, 'seeds': [0, 1],
              'rows': {'adamw': {'ratio_std': 0.0},
                       'quiet': {'ratio_std': 0.0001},
                       'noisy': {'ratio_std': 0.01}}}
  pooled = ((0.0001 ** 2 + 0.01 ** 2) / 2) ** 0.5
  assert quality_drift.pooled_std(baseline) == pytest.approx(pooled)
  # A method whose seeds agreed gets the pooled noise, a noisy one its own.
  assert quality_drift.tolerance(baseline, 'quiet') == pytest.approx(4 * pooled)
  assert quality_drift.tolerance(baseline, 'noisy') == pytest.approx(0.04)
  # Four seeds: the drift of a mean has sqrt(2/4) of the per-seed noise.
  baseline['seeds'] = [0, 1, 2, 3]
  assert quality_drift.tolerance(baseline, 'noisy') == pytest.approx(
      0.04 * 0.5 ** 0.5)
  for row in baseline['rows'].values():
    row['ratio_std'] = 0.0
  assert quality_drift.tolerance(baseline, 'quiet') == pytest.approx(0.005)


def test_a_diverged_method_or_another_set_up_fails(tiny_run, tmp_path, capsys):
  run, baseline = tiny_run
  result = json.loads(run.read_text())
  result['rows']['galore']['ratio_mean'] = None  # not finite any more
  diverged = tmp_path / 'diverged.json'
  diverged.write_text(json.dumps(result))
  assert _check(diverged, baseline, capsys)[0] == 1
  result = json.loads(run.read_text())
  result['setup']['steps'] += 1
  other = tmp_path / 'other.json'
  other.write_text(json.dumps(result))
  status, out = _check(other, baseline, capsys)
  assert status == 2 and 'steps' in out
  result = json.loads(run.read_text())
  result['rows']['fira'] = result['rows']['galore']
  new = tmp_path / 'new.json'
  new.write_text(json.dumps(result))
  status, out = _check(new, baseline, capsys)
  assert status == 2 and "['fira']" in out
