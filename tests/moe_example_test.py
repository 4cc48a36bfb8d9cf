"""End-to-end run of the Sub-MoE example (examples/moe.py), tiny and short."""

import json
import math

import pytest

from examples import moe

pytestmark = pytest.mark.slow

TINY = ['--steps', '3', '--seeds', '0', '--groups', '4', '--dim', '32',
        '--hidden', '32', '--layers', '1', '--seq-len', '32',
        '--batch-size', '4', '--eval-batches', '2', '--calib-batches', '4',
        '--calib-tokens', '256', '--max-bytes', '200000']


def test_tiny_run_reports_every_method(tmp_path, capsys):
  out = tmp_path / 'sub_moe.json'
  # rank 32 = every output size: Sub-MoE is then the frequency-weighted
  # average, end to end through the model.
  report = moe.main(TINY + ['--rank', '32', '--out', str(out)])
  assert json.loads(out.read_text()) == json.loads(capsys.readouterr().out)
  assert report['device'] == 'cpu' and report['seeds'] == [0]
  assert report['steps'] == 3 and report['command'].startswith(
      'python -m examples.moe')
  methods = {'prune/drop'} | {
      f'{m}/{r}' for m in ('average', 'freq_average', 'sub_moe',
                           'sub_moe_whitened', 'freq_average_svd')
      for r in ('lse', 'linear')}
  for groups in ('4',):
    table = report['by_experts'][groups]
    assert set(table) == methods
    for row in table.values():
      assert math.isfinite(row['val_loss']) and row['retained'] > 0
    for remap in ('lse', 'linear'):
      for merged in ('sub_moe', 'sub_moe_whitened'):
        assert table[f'{merged}/{remap}']['val_loss'] == pytest.approx(
            table[f'freq_average/{remap}']['val_loss'], abs=1e-3)
