"""examples/continual_lm.py: text domains shipped with Python, a tiny run."""

import dataclasses
import importlib.util

import jax
import numpy as np
import pytest

# Looked up, not imported (a second at every test process's collection).
if importlib.util.find_spec('matplotlib') is None:
  pytest.skip('needs matplotlib (the examples extra)', allow_module_level=True)

from examples import continual_lm as example  # pylint: disable=wrong-import-position
from examples.lm import data as data_lib  # pylint: disable=wrong-import-position

pytestmark = pytest.mark.slow


def test_domains_ship_with_python():
  python = example.domain_bytes('python', 20_000)
  english = example.domain_bytes('english', 20_000)
  assert len(python) == 20_000 and b'def ' in python
  assert len(english) == 20_000 and b' the ' in english
  assert b'def ' not in english[:2000]  # prose, not the topics.py source
  with pytest.raises(ValueError, match='Unknown domain'):
    example.domain_bytes('klingon', 10)


def test_missing_domains_are_skipped_and_two_are_needed():
  texts = {'a': b'alpha ' * 3000, 'b': b'', 'c': b'gamma! ' * 3000}
  read = lambda name, max_bytes: texts[name][:max_bytes]
  config = example.Config(domains=('a', 'b', 'c'), seq_len=16)
  domains = example.load_domains(config, read=read)
  assert domains.names == ['a', 'c'] and domains.skipped == ['b']
  for train, val, test in zip(domains.train, domains.val, domains.test):
    assert train.dtype == np.uint8 and len(val) > 17 and len(test) > 17
    assert len(train) > 5 * (len(val) + len(test))
  with pytest.raises(data_lib.CorpusError, match='at least two'):
    example.load_domains(dataclasses.replace(config, domains=('a', 'b')),
                         read=read)


def test_loss_summary_reads_a_loss_matrix():
  loss = np.array([[1.0, 5.0, 5.0], [1.5, 2.0, 4.0], [2.0, 2.2, 3.0]])
  summary = example.loss_summary(loss, baseline=np.array([5.5, 5.5, 5.5]))
  np.testing.assert_allclose(summary['average_loss'], (2.0 + 2.2 + 3.0) / 3)
  np.testing.assert_allclose(summary['forgetting'], ((2 - 1) + (2.2 - 2)) / 2)
  np.testing.assert_allclose(summary['learned_loss'], 2.0)
  np.testing.assert_allclose(summary['forward_transfer'],
                             ((5.5 - 5.0) + (5.5 - 4.0)) / 2)


def test_quick_run_learns_and_sculpt_starts_like_naive(tmp_path):
  out_png = tmp_path / 'lm.png'
  report = example.main([
      '--quick', '--domains', 'python,english', '--methods',
      'naive,sculpt,sculpt_released,gpm,gpm_ewc', '--steps', '15', '--plot',
      str(out_png)])
  assert report['tasks'] == ['python', 'english']
  assert out_png.stat().st_size > 10_000
  for result in report['results'].values():
    matrix = np.asarray(result['test'])
    assert matrix.shape == (2, 2) and np.all(np.isfinite(matrix))
    assert matrix[0, 0] < np.log(256) - 1.0  # learned bytes (uniform: 5.55)
  # Same weights and batches, and sculpt's memory is empty in the first
  # domain: the same first row as naive fine-tuning.
  for name in ('sculpt', 'sculpt_released', 'gpm', 'gpm_ewc'):
    np.testing.assert_allclose(report['results']['naive']['test'][0],
                               report['results'][name]['test'][0], rtol=1e-4)
  assert set(report['results']['sculpt']['test_summary']) >= {
      'average_loss', 'forgetting', 'learned_loss'}


def test_pretraining_learns_the_first_domain_before_the_sequence():
  quick = ['--quick', '--domains', 'python,english', '--methods', 'naive,ewc',
           '--steps', '10']
  scratch = example.main(quick)
  report = example.main(quick + ['--pretrain-steps', '30'])
  naive, ewc = (report['results'][m] for m in ('naive', 'ewc'))
  # The first domain takes no fine-tuning steps: row 0 is the shared
  # pre-trained model, the same for every method.
  assert naive['final_train_loss'][0] is None
  np.testing.assert_array_equal(naive['test'][0], ewc['test'][0])
  # 30 pre-training steps fit the first domain better than 10 plain ones.
  assert naive['test'][0][0] < scratch['results']['naive']['test'][0][0]
  # The sequence then fine-tunes the second domain.
  assert naive['test'][1][1] < naive['test'][0][1]
  config = example.config_from_args(example.parse_args(
      quick + ['--pretrain-steps', '30']))
  assert config.pretrain_steps == 30
  assert example.defaults(config) is example.PRETRAINED_DEFAULTS


def test_gpm_memory_covers_every_linear_layer_and_the_embedding():
  config = example.config_from_args(example.parse_args(['--quick']))
  net = example.network(config)
  domains = example.load_domains(config)
  inputs, _ = data_lib.batch_at(domains.train[0], seed=0, step=0,
                                        batch_size=4, seq_len=config.seq_len)
  captured = net.layer_inputs(net.initial, inputs)
  tokens = 4 * config.seq_len
  assert captured['embed']['embedding'].shape == (tokens, 256)
  assert captured['lm_head']['kernel'].shape == (tokens, config.dim)
  block = captured['blocks'][0]
  assert block['mlp']['w_down']['kernel'].shape == (tokens, config.ffn_dim)
  assert block['attention_norm']['scale'] is None
  memory = example.continual.gpm_memory(captured, 0.9, params=net.initial)
  for path, count in jax.tree_util.tree_leaves_with_path(
      jax.tree.map(lambda m: m.left_count, memory, is_leaf=lambda m: isinstance(
          m, example.continual.ProtectedSubspace))):
    assert int(count) >= 1, path
