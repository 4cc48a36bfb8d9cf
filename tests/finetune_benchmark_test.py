"""Smoke test of the fine-tuning benchmark (benchmarks/finetune.py): a tiny
model, a few steps, every method; the JSON schema and that every method lowers
the target-domain loss of the pre-trained model."""

import json

import pytest

from benchmarks import finetune

pytestmark = pytest.mark.slow

ROW_KEYS = {
    'method', 'description', 'learning_rate', 'lr_grid', 'sweep',
    'trainable_params', 'trainable_fraction', 'state_bytes', 'step_ms',
    'target_loss', 'source_loss', 'forgetting', 'target_gain', 'runs'}
RUN_KEYS = {'seed', 'learning_rate', 'target_val_loss', 'target_loss',
            'source_loss', 'forgetting', 'target_gain', 'step_ms'}


@pytest.fixture(scope='module')
def result(tmp_path_factory):
  out = tmp_path_factory.mktemp('finetune') / 'finetune.json'
  returned = finetune.main(['--quick', '--steps', '12', '--pretrain-steps',
                            '20', '--seeds', '0', '--out', str(out)])
  assert json.loads(out.read_text()) == json.loads(json.dumps(returned))
  return returned


def test_schema(result):
  assert result['benchmark'] == 'finetune'
  for key in ('date', 'device', 'cores', 'git_commit', 'command', 'setup',
              'pretrained', 'rows', 'claims', 'wall_seconds'):
    assert key in result, key
  assert result['command'].startswith('python -m benchmarks.finetune --quick')
  assert [r['method'] for r in result['rows']] == list(finetune.METHODS)
  for row in result['rows']:
    assert ROW_KEYS <= set(row), (row['method'], ROW_KEYS - set(row))
    assert row['learning_rate'] in row['lr_grid']
    for run in row['runs']:
      assert RUN_KEYS <= set(run), (row['method'], RUN_KEYS - set(run))
  for claim in result['claims']:
    assert claim['verdict'] in (
        'holds', 'holds on the median only', 'does not hold')


def test_every_method_lowers_the_target_loss(result):
  pretrained = result['pretrained']['0']['target_loss']
  for row in result['rows']:
    assert row['target_loss'] < pretrained, row['method']


def test_sizes_follow_the_protocol(result):
  """Adapters train a small share; LoRA has ~16x SVFit's params and LoRA,
  PiSSA and MiLoRA the same count; GaLore's state fits LoRA's."""
  rows = {r['method']: r for r in result['rows']}
  setup = result['setup']
  total = setup['params']
  for name in ('adamw', 'sculpt'):
    assert rows[name]['trainable_params'] == total
  assert rows['galore']['trainable_params'] == setup['block_matrix_params']
  for name in ('lora', 'pissa', 'milora', 'svfit', 'salt', 'effort'):
    assert rows[name]['trainable_params'] <= setup['block_matrix_params']
  assert (rows['lora']['trainable_params'] == rows['pissa']['trainable_params']
          == rows['milora']['trainable_params'] == setup['lora_params'])
  assert rows['salt']['trainable_params'] <= setup['lora_params']
  assert rows['galore']['state_bytes'] <= rows['lora']['state_bytes']
  assert rows['svfit']['trainable_params'] == setup['svfit_params']
