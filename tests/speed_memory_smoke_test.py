"""Smoke test of benchmarks/speed_memory.py: a --quick run and its helpers.

Not a speed check (times on a loaded CPU say nothing); the numbers live in
benchmarks/results/speed_memory_*.json.
"""

import importlib.util
import json

import numpy as np
import pytest

from benchmarks import speed
from benchmarks import speed_memory
from benchmarks import torch_reference

pytestmark = pytest.mark.slow

HAS_REFERENCE = all(importlib.util.find_spec(m) is not None
                    for m in ('torch', 'galore_torch'))


@pytest.fixture(scope='module')
def quick(tmp_path_factory):
  out = tmp_path_factory.mktemp('speed') / 'speed.json'
  argv = ['--quick', '--scan-layers', '--methods', 'adamw,galore_randomized',
          '--out', str(out)] + (['--torch-reference'] if HAS_REFERENCE else [])
  return speed_memory.main(argv), out


def test_quick_run_writes_json_and_markdown(quick):
  result, out = quick
  assert json.loads(out.read_text()) == json.loads(json.dumps(result))
  assert not out.with_suffix('.partial.json').exists()
  assert not out.with_suffix('.torch.json').exists()
  assert result['setup']['stacked_layers'] is True
  galore = result['model']['galore_randomized']
  assert 'error' not in galore, galore.get('error')
  # State bytes are the analytic formula's, and below AdamW's.
  assert galore['state_bytes_vs_analytic'] == 1.0
  assert galore['vs_adamw']['state_bytes'] < 1.0
  assert galore['train_step']['timed_steps'] == 6
  assert galore['train_step']['overdue_refresh_leaves'] == 0
  table = out.with_suffix('.md').read_text()
  assert '| galore_randomized | 8 |' in table
  assert 'layers stacked' in table


@pytest.mark.skipif(not HAS_REFERENCE, reason='torch/galore-torch missing')
def test_torch_reference_times_galore_torch_on_the_same_shapes(quick):
  result, out = quick
  reference = result['torch_reference']
  assert 'error' not in reference, reference.get('error')
  model = reference['tables']['model']
  assert set(model) == {'torch_adamw', 'galore_torch'}
  # galore-torch refreshes on the steps whose count is a multiple of T (3).
  assert model['galore_torch']['refresh_steps'] == 2
  assert model['torch_adamw']['refresh_steps'] == 0
  # The same parameters: AdamW's state is the same size in both libraries.
  assert model['torch_adamw']['state_bytes'] == pytest.approx(
      result['model']['adamw']['state_bytes'], abs=4 * 64)
  ratio = result['model']['galore_randomized']['vs_galore_torch']
  assert ratio['amortised_mean'] > 0
  assert 'against galore-torch' in out.with_suffix('.md').read_text()


def test_stacked_shapes_unstack_for_pytorch():
  params = speed.block_shapes(8, 12, layers=3, stacked=True)
  assert params['blocks']['mlp']['w_up']['kernel'].shape == (3, 8, 12)
  shapes = torch_reference.split_shapes(params)
  assert len(shapes['projected']) == 3 * 7
  assert [8, 12] in shapes['projected'] and [12, 8] in shapes['projected']
  assert shapes['other'] == [[3, 8]]  # the stacked RMSNorm scale
  flat = torch_reference.split_shapes(speed.block_shapes(8, 12, layers=3))
  assert sorted(map(tuple, flat['projected'])) == sorted(
      map(tuple, shapes['projected']))


def test_stacked_shape_gradients_have_a_decaying_spectrum_per_layer():
  params = speed.block_shapes(16, 24, layers=2, stacked=True)
  gradient = speed.shape_gradients(params, count=1, seed=0)[0]
  g = np.asarray(gradient['blocks']['mlp']['w_up']['kernel'])
  assert g.shape == (2, 16, 24)
  for layer in g:
    s = np.linalg.svd(layer, compute_uv=False)
    assert s[0] > 10 * s[-1]
  assert not np.allclose(g[0], g[1])
