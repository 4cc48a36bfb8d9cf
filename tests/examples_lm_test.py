"""Tests of the byte-level LM example (examples/lm): data, model, training,
orbax checkpoints (bit-exact resume, config checks), metrics and plots."""

import functools
import json
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from examples.lm import checkpoint
from examples.lm import data as data_lib
from examples.lm import model as model_lib
from examples.lm import methods
from examples.lm import train

pytestmark = pytest.mark.slow

TINY = model_lib.Config(dim=32, layers=2, heads=2, ffn_dim=64, max_seq_len=32)
TINY_FLAGS = ['--dim', '32', '--layers', '2', '--heads', '2', '--ffn-dim', '64',
              '--seq-len', '32', '--batch-size', '4', '--eval-batches', '2',
              '--no-progress']
OPTIMIZERS = ('adamw', 'galore')


def _write_text(path: pathlib.Path, size: int, seed: int = 0) -> pathlib.Path:
  rng = np.random.default_rng(seed)
  words = [b'def', b'return', b'self', b'import', b'class', b'(x)', b'\n']
  path.write_bytes(b' '.join(rng.choice(words, size // 4).tolist())[:size])
  return path


@functools.lru_cache(maxsize=None)
def _model(scan_layers=False):
  config = model_lib.Config(**{**TINY.__dict__, 'scan_layers': scan_layers})
  return nnx.jit(lambda: model_lib.Llama(config, rngs=nnx.Rngs(0)))()


_forward = nnx.jit(lambda model, tokens: model(tokens))


def _records(out: pathlib.Path, name: str) -> list[dict]:
  lines = (out / train.METRICS_FILE).read_text().splitlines()
  return [r for r in map(json.loads, lines) if r['optimizer'] == name]


# ----------------------------------------------------------------------------
# Data.


def test_stdlib_corpus_is_found_sorted_and_split():
  files = data_lib.stdlib_files()
  assert files and all(f.suffix == '.py' for f in files)
  assert not any('site-packages' in f.parts for f in files)
  corpus = data_lib.load_corpus(None, max_bytes=100_000, seq_len=32)
  assert len(corpus.train) + len(corpus.val) == 100_000
  assert len(corpus.val) > 32 and len(corpus.train) > len(corpus.val)
  again = data_lib.load_corpus(None, max_bytes=100_000, seq_len=32)
  assert again.fingerprint == corpus.fingerprint
  assert b'import' in corpus.train.tobytes()


def test_user_files_and_directories(tmp_path):
  directory = tmp_path / 'notes'
  directory.mkdir()
  _write_text(directory / 'b.txt', 3000, seed=1)
  _write_text(directory / 'a.txt', 3000, seed=2)
  single = _write_text(tmp_path / 'single.txt', 2000, seed=3)
  from_dir = data_lib.load_corpus([directory], max_bytes=None, seq_len=16)
  both = data_lib.load_corpus([single, directory], max_bytes=None, seq_len=16)
  assert len(from_dir.train) + len(from_dir.val) == 6002  # + two newlines
  assert len(both.train) + len(both.val) == 8003
  # Sorted order: a.txt comes first.
  assert from_dir.train.tobytes().startswith((directory / 'a.txt').read_bytes())


def test_batches_are_a_pure_function_of_seed_and_step():
  tokens = np.arange(1000, dtype=np.int64).astype(np.uint8)
  inputs, targets = data_lib.batch_at(tokens, seed=3, step=7, batch_size=4,
                                      seq_len=16)
  again = data_lib.batch_at(tokens, seed=3, step=7, batch_size=4, seq_len=16)
  other = data_lib.batch_at(tokens, seed=3, step=8, batch_size=4, seq_len=16)
  assert inputs.shape == targets.shape == (4, 16) and inputs.dtype == np.int32
  np.testing.assert_array_equal(inputs, again[0])
  assert not np.array_equal(inputs, other[0])
  np.testing.assert_array_equal(targets[:, :-1], inputs[:, 1:])  # shifted
  val = data_lib.eval_batches(tokens, batches=2, batch_size=3, seq_len=16)
  assert len(val) == 2 and val[0][0].shape == (3, 16)


def test_corpus_errors(tmp_path):
  with pytest.raises(data_lib.CorpusError, match='does not exist'):
    data_lib.load_corpus([tmp_path / 'missing.txt'], seq_len=8)
  empty_dir = tmp_path / 'empty'
  empty_dir.mkdir()
  with pytest.raises(data_lib.CorpusError, match='contains no files'):
    data_lib.load_corpus([empty_dir], seq_len=8)
  (tmp_path / 'empty.txt').write_bytes(b'')
  with pytest.raises(data_lib.CorpusError, match='is empty'):
    data_lib.load_corpus([tmp_path / 'empty.txt'], seq_len=8)
  short = _write_text(tmp_path / 'short.txt', 100)
  with pytest.raises(data_lib.CorpusError, match='fewer than one sequence'):
    data_lib.load_corpus([short], seq_len=64)
  with pytest.raises(SystemExit, match='does not exist'):
    train.main(['--data', str(tmp_path / 'nope'), '--out', str(tmp_path)])


# ----------------------------------------------------------------------------
# Model and optimizers (examples/lm/methods.py).


@pytest.mark.parametrize('scan_layers', [False, True])
def test_model_shapes(scan_layers):
  model = _model(scan_layers)
  logits = _forward(model, jnp.zeros((2, 8), jnp.int32))
  assert logits.shape == (2, 8, 256) and logits.dtype == jnp.float32
  params = nnx.state(model, nnx.Param)
  wq = params['blocks']['attention']['wq']['kernel'][...] if scan_layers else (
      params['blocks'][0]['attention']['wq']['kernel'][...])
  assert wq.shape == ((2, 32, 32) if scan_layers else (32, 32))
  assert params['lm_head']['kernel'][...].shape == (32, 256)  # untied
  # Stacking is a layout change only: same number of parameters.
  assert model_lib.count_params(model) == 2 * 256 * 32 + 32 + 2 * (
      4 * 32 * 32 + 3 * 32 * 64 + 2 * 32)


def test_causal():
  model = _model()
  tokens = jnp.tile(jnp.arange(8, dtype=jnp.int32), (2, 1))
  tokens = tokens.at[1, 5].set(200)  # Row 1 differs from row 0 at position 5.
  logits = _forward(model, tokens)
  np.testing.assert_allclose(logits[0, :5], logits[1, :5], rtol=1e-6,
                             atol=1e-6)
  assert not np.allclose(logits[0, 5:], logits[1, 5:])


@pytest.mark.parametrize('scan_layers', [False, True])
def test_low_rank_projects_block_matrices_only(scan_layers):
  config = model_lib.Config(**{**TINY.__dict__, 'scan_layers': scan_layers})
  abstract = nnx.eval_shape(lambda: model_lib.Llama(config, rngs=nnx.Rngs(0)))
  params = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                        nnx.state(abstract, nnx.Param))
  import subspace_optax as so
  selected = jax.tree_util.tree_flatten_with_path(
      methods.block_matrices(params),
      is_leaf=lambda x: x is None or isinstance(x, so.DimensionNumbers))[0]
  chosen = {jax.tree_util.keystr(p) for p, n in selected if n is not None}
  assert len(chosen) == (7 if scan_layers else 14)
  assert not any(k in name for name in chosen
                 for k in ('embed', 'lm_head', 'norm'))
  full = so.state_bytes(
      methods.make_optimizer('adamw', learning_rate_schedule=1e-3)
      .init(params))
  for name in ('galore', 'apollo_mini', 'fira'):
    low = so.state_bytes(methods.make_optimizer(
        name, learning_rate_schedule=1e-3, rank=4).init(params))
    assert low < 0.75 * full, name


def test_optimizer_names_and_errors():
  assert {'adamw', 'galore', 'fira', 'apollo_mini'} <= set(methods.names())
  assert 'low_rank' not in methods.names()  # a combinator, not a preset
  with pytest.raises(KeyError, match="'nope'"):
    methods.make_optimizer('nope', learning_rate_schedule=1e-3)
  with pytest.raises(SystemExit):
    train.parse_args(['--optimizer', 'adamw,nope'])
  with pytest.raises(SystemExit):  # no default learning rate: --lr needed
    train.parse_args(['--optimizer', 'fira'])
  assert train.parse_args(['--optimizer', 'fira', '--lr', '0.01']).optimizer == [
      'fira']
  args = train.parse_args(['--optimizer', 'adamw', '--optimizer', 'galore,'])
  assert args.optimizer == ['adamw', 'galore']
  assert methods.get('galore').learning_rate == pytest.approx(3e-2)
  assert methods.get('adamw').learning_rate == pytest.approx(3e-3)


def test_fsdp_spec():
  P = jax.sharding.PartitionSpec
  assert train.fsdp_spec((4, 128, 344), 4) == P(None, None, 'fsdp')
  assert train.fsdp_spec((128, 128), 4) == P('fsdp', None)
  assert train.fsdp_spec((3, 5), 4) == P(None, None)
  assert train.fsdp_spec((), 4) == P()


# ----------------------------------------------------------------------------
# Training, checkpoints, metrics, plots.


@pytest.fixture(scope='module')
def first_run(tmp_path_factory):
  """6 steps of adamw and galore, checkpoints at steps 3 and 6."""
  root = tmp_path_factory.mktemp('lm')
  corpus = _write_text(root / 'corpus.txt', 20_000)
  out = root / 'uninterrupted'
  flags = TINY_FLAGS + [
      '--data', str(corpus), '--optimizer', ','.join(OPTIMIZERS),
      '--steps', '6', '--eval-every', '3', '--checkpoint-every', '3',
      '--keep', '2', '--refresh-every', '2', '--lr', '1e-2']
  summary = train.main(flags + ['--out', str(out)])  # plots by default
  return root, out, flags, summary


def test_training_decreases_loss_and_writes_metrics(first_run):
  _, out, _, summary = first_run
  for name in OPTIMIZERS:
    records = _records(out, name)
    assert [r['step'] for r in records] == list(range(1, 7))
    losses = [r['loss'] for r in records]
    assert np.mean(losses[-2:]) < losses[0] - 0.1, losses
    assert [r['step'] for r in records if r['val_loss'] is not None] == [3, 6]
    assert all(r['opt_state_bytes'] > 0 for r in records)
  stored = json.loads((out / train.SUMMARY_FILE).read_text())
  runs = {r['optimizer']: r for r in stored['runs']}
  assert runs['adamw']['val_loss_ratio_to_adamw'] == 1.0
  assert runs['galore']['opt_state_bytes'] < runs['adamw']['opt_state_bytes']
  assert summary['runs'][1]['final_val_loss'] == runs['galore']['final_val_loss']


def test_plots_written(first_run, tmp_path):
  _, out, _, _ = first_run
  for name in ('loss.png', 'memory.png'):
    assert (out / name).read_bytes()[:4] == b'\x89PNG'
  from examples.lm import plot  # pylint: disable=import-outside-toplevel
  plot.main([str(out / train.METRICS_FILE), '--out', str(tmp_path)])
  assert (tmp_path / 'loss.png').stat().st_size > 1000


def test_resume_is_bit_exact(first_run):
  """Resuming from the step-3 checkpoint reproduces steps 4..6 exactly."""
  root, out, flags, _ = first_run
  resumed = root / 'resumed'
  shutil.copytree(out, resumed)
  for name in OPTIMIZERS:  # "Interrupt" after step 3.
    shutil.rmtree(resumed / name / 'checkpoints' / '6')
  train.main(flags + ['--out', str(resumed), '--resume'])
  for name in OPTIMIZERS:
    expected, got = _records(out, name), _records(resumed, name)
    assert [r['step'] for r in got] == list(range(1, 7))
    assert [r['loss'] for r in got] == [r['loss'] for r in expected], name
    assert got[-1]['val_loss'] == expected[-1]['val_loss']


def test_per_layer_run_equals_the_whole_tree_run(first_run, tmp_path):
  """--per-layer: each block updated inside the backward scan, clipped to
  the same global norm (a first backward pass), gives the whole-tree run."""
  _, out, flags, _ = first_run
  with pytest.raises(SystemExit):  # the layers must be stacked and scanned
    train.parse_args(['--per-layer', '--no-scan-layers'])
  per_layer = tmp_path / 'per_layer'
  summary = train.main(flags + ['--per-layer', '--out', str(per_layer),
                                '--no-plot'])
  assert summary['per_layer']
  for name in OPTIMIZERS:
    expected, got = _records(out, name), _records(per_layer, name)
    assert [r['step'] for r in got] == list(range(1, 7))
    np.testing.assert_allclose([r['loss'] for r in got],
                               [r['loss'] for r in expected], rtol=1e-4)
    np.testing.assert_allclose(got[-1]['val_loss'], expected[-1]['val_loss'],
                               rtol=1e-4)
    assert got[-1]['opt_state_bytes'] == expected[-1]['opt_state_bytes']
  # A per-layer run resumes only as a per-layer run.
  with pytest.raises(checkpoint.ConfigMismatchError, match='per_layer'):
    train.main(flags + ['--out', str(per_layer), '--resume'])


def test_mismatched_config_is_refused(first_run, tmp_path):
  _, out, flags, _ = first_run
  copy = tmp_path / 'copy'
  shutil.copytree(out, copy)
  changed = list(flags)
  changed[changed.index('--lr') + 1] = '3e-3'
  changed[changed.index('--refresh-every') + 1] = '5'
  with pytest.raises(checkpoint.ConfigMismatchError) as error:
    train.main(changed + ['--out', str(copy), '--resume'])
  assert 'learning_rate' in str(error.value)
  galore_only = list(flags)
  galore_only[galore_only.index('--optimizer') + 1] = 'galore'
  with pytest.raises(checkpoint.ConfigMismatchError) as error:
    train.main(galore_only + ['--rank', '4', '--out', str(copy), '--resume'])
  assert 'rank' in str(error.value) and 'learning_rate' not in str(error.value)
  with pytest.raises(FileExistsError, match='--resume'):
    train.main(flags + ['--out', str(copy)])


def test_default_runs_get_their_own_directory(tmp_path, monkeypatch, capsys):
  """Run twice without --out: run-1 then run-2 (no FileExistsError); the
  closing lines name the directory, the state saving and the tuned
  comparison; --resume continues the latest run."""
  monkeypatch.setattr(train, 'RUNS_DIR', tmp_path / 'runs')
  corpus = _write_text(tmp_path / 'corpus.txt', 20_000)
  flags = TINY_FLAGS + ['--data', str(corpus), '--steps', '2',
                        '--checkpoint-every', '1', '--no-plot']
  train.main(flags)
  train.main(flags + ['--stop-at', '1'])  # as if interrupted after step 1
  runs = sorted(p.name for p in (tmp_path / 'runs').iterdir())
  assert runs == ['run-1', 'run-2']
  printed = capsys.readouterr().out
  assert f'Outputs in {tmp_path / "runs" / "run-2"}/' in printed
  assert "galore: optimizer state" in printed and "x AdamW's" in printed
  assert train.TUNED_COMPARISON in printed
  assert train.run_directory(None, resume=True) == tmp_path / 'runs' / 'run-2'
  train.main(flags + ['--resume'])
  assert [r['step'] for r in _records(tmp_path / 'runs' / 'run-2',
                                      'galore')] == [1, 2]
  assert not (tmp_path / 'runs' / 'run-3').exists()


def test_plots_are_skipped_with_a_message_without_matplotlib(
    tmp_path, monkeypatch, capsys):
  real = train.importlib.util.find_spec
  monkeypatch.setattr(
      train.importlib.util, 'find_spec',
      lambda name, *a: None if name == 'matplotlib' else real(name, *a))
  assert train.write_plots(tmp_path) == []
  assert 'matplotlib is not installed' in capsys.readouterr().out


def test_loss_plot_has_a_log_axis(first_run, tmp_path, monkeypatch):
  _, out, _, _ = first_run
  scales = []
  from examples.lm import plot  # pylint: disable=import-outside-toplevel
  original = plot.plt.Axes.set_yscale
  monkeypatch.setattr(plot.plt.Axes, 'set_yscale', lambda self, value, **k: (
      scales.append(value), original(self, value, **k)))
  plot.plot_metrics(out / train.METRICS_FILE, tmp_path)
  assert scales == ['log']


@pytest.mark.parametrize(
    'name', ['adamw', pytest.param('galore', marks=pytest.mark.slow)])
def test_mesh_run_shards_params(name, tmp_path):
  if jax.device_count() < 8:
    pytest.skip('needs 8 devices (conftest.py sets XLA_FLAGS)')
  mesh = train.make_mesh('data=2,fsdp=4')
  model = nnx.eval_shape(lambda: model_lib.Llama(
      model_lib.Config(**{**TINY.__dict__, 'scan_layers': True}),
      rngs=nnx.Rngs(0)))
  shardings = train.model_shardings(nnx.state(model), mesh)
  wq = shardings['blocks']['attention']['wq']['kernel'].get_value()
  assert wq.spec == jax.sharding.PartitionSpec(None, 'fsdp', None)
  corpus = _write_text(tmp_path / 'corpus.txt', 20_000)
  summary = train.main(TINY_FLAGS + [
      '--data', str(corpus), '--optimizer', name, '--steps', '2',
      '--batch-size', '8', '--mesh', 'data=2,fsdp=4', '--checkpoint-every',
      '0', '--out', str(tmp_path / 'out')])
  assert np.isfinite(summary['runs'][0]['final_val_loss'])


def test_optimizer_state_takes_the_shardings_the_transform_derives():
  """The trainer shards the optimizer state as ``subspace_optax.state_shardings``
  derives it, not by the model's FSDP rule: GaLore's ``(r, n)`` moments are
  sharded only along an axis their parameter is sharded along."""
  if jax.device_count() < 8:
    pytest.skip('needs 8 devices (conftest.py sets XLA_FLAGS)')
  import subspace_optax as so
  mesh = train.make_mesh('data=2,fsdp=4')
  tx = methods.make_optimizer('galore', learning_rate_schedule=1e-3, rank=4)
  config = model_lib.Config(**{**TINY.__dict__, 'scan_layers': True})

  def create():
    model = model_lib.Llama(config, rngs=nnx.Rngs(0))
    return model, nnx.Optimizer(model, tx, wrt=nnx.Param)

  model, optimizer = nnx.eval_shape(create)
  shardings = train.state_shardings(tx, model, optimizer, mesh)
  params = nnx.state(model, nnx.Param)
  derived = so.state_shardings(tx, params, train.model_shardings(params, mesh))

  def specs(tree):
    return {train.path_names(path): sharding.spec for path, sharding
            in jax.tree_util.tree_flatten_with_path(tree)[0]}

  want = specs(derived)
  assert specs(shardings['optimizer']['opt_state']) == want
  # The model's FSDP rule would shard some low-rank moment differently.
  shapes = {train.path_names(path): x.shape for path, x in
            jax.tree_util.tree_flatten_with_path(nnx.state(optimizer))[0]}
  assert any(spec != train.fsdp_spec(shapes[('opt_state',) + path], 4)
             for path, spec in want.items())
  assert shardings['optimizer']['step'].get_value().spec == (
      jax.sharding.PartitionSpec())


def test_bf16_params_with_stochastic_rounding(tmp_path):
  with pytest.raises(SystemExit):  # --bf16-params needs --precision bf16
    train.parse_args(['--bf16-params', 'stochastic'])
  summary = train.main(TINY_FLAGS + [
      '--optimizer', 'galore', '--precision', 'bf16', '--bf16-params',
      'stochastic', '--steps', '3', '--eval-every', '3', '--max-bytes',
      '60000', '--checkpoint-every', '0', '--no-plot', '--out',
      str(tmp_path)])
  assert np.isfinite(summary['runs'][0]['final_val_loss'])
  args = train.parse_args(TINY_FLAGS + [
      '--optimizer', 'galore', '--precision', 'bf16', '--bf16-params',
      'stochastic', '--basis', 'svd'])
  corpus = data_lib.load_corpus(None, max_bytes=60000, seq_len=32)
  run = train.make_run('galore', args, TINY, corpus)
  model, _ = train.create(run, 0)
  dtypes = {x.dtype for x in jax.tree.leaves(nnx.state(model, nnx.Param))}
  assert dtypes == {jnp.dtype(jnp.bfloat16)}
