"""Continual byte-level language modelling across text domains shipped with Python.

A tiny LLaMA-style model (``examples/lm/model.py``) is trained on one text
domain after another, with the same initial weights and batches for every
method, and evaluated after each domain on every domain. The domains are read
from files installed with CPython (no download); a domain whose files are
missing is skipped:

* ``python``   the standard library's Python sources (tests excluded),
* ``english``  the English reference text of ``pydoc_data/topics.py`` (the
               string values of its ``topics`` dict),
* ``c``        the C API headers (``sysconfig.get_paths()['include']``),
* ``dectest``  the decimal arithmetic test cases (``test/decimaltestdata``).

Methods (as in ``examples/continual.py``): ``naive`` (Adam), ``l2``
(``l2_to_anchor``), ``ewc`` (``ewc`` with the empirical diagonal Fisher),
``gpm`` (Adam whose update is kept orthogonal to the span of earlier domains'
layer inputs: every ``nnx.Linear`` and the embedding, captured with
``continual.layer_inputs``; norm scales frozen after the first domain),
``gpm_ewc`` (the recommended configuration: ``continual.gpm_ewc``, GPM's
projection at a low energy threshold on EWC-regularised Adam), ``sculpt``
(Sculpting Subspaces, arXiv 2504.07097: AdamW whose update avoids each
weight's top singular directions, rank set per block by the importance
``cos(block input, block output)``; with ``protect='all'`` the embedding and
the head are protected too, at ``max_fraction``) and ``sculpt_released`` (the
same with the released code's rank ``floor(max(m, n) · 0.07 t)``).

The matrix is a **loss** matrix ``L[i, j]``: next-byte cross entropy (nats) on
domain ``j`` after training domain ``i``. Lower is better, so the metrics are
those of ``subspace_optax.continual`` applied to ``-L``: average loss (last
row), forgetting ``(1/(T-1)) Σ_{j<T-1} (L[T-1, j] - L[j, j])`` (the increase in
loss on earlier domains, positive = forgotten) and the mean loss right after
learning each domain (``diag L``, plasticity).

With ``--pretrain-steps N`` (the setting of the Sculpting Subspaces paper:
continual fine-tuning of a *pre-trained* model) the first domain is a
pre-training corpus instead: the model is trained on it for ``N`` steps with
AdamW (warm-up and cosine decay, :func:`pretrain`), shared by every method,
and the sequence then fine-tunes the remaining domains. Row 0 of the matrix is
the pre-trained model, and the first task boundary (memories, Fisher, anchor)
is taken on it.

Each domain's bytes are cut into 4 KiB chunks: every 10th chunk is held out,
the held-out chunks alternate between validation (to choose hyper-parameters)
and test (reported).

Usage (from the repository root)::

  python -m examples.continual_lm                   # 4 domains, every method
  python -m examples.continual_lm --quick           # CI-sized (seconds)
  python -m examples.continual_lm --json out.json --plot out.png
  python -m examples.continual_lm --pretrain-steps 1500   # fine-tune a pre-trained model
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import json
import pathlib
import sysconfig
import time
import types
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from examples import continual_common as common
from examples.continual_common import loss_summary
from examples.lm import data as data_lib
from examples.lm import model as model_lib
import subspace_optax as so
from subspace_optax import continual

METHODS = common.METHODS
DOMAINS = ('python', 'english', 'c', 'dectest')

# Chosen on the validation split (seed 0) by ``python -m benchmarks.continual
# --tasks text --tune`` (every run: benchmarks/results/continual_tuning_text.json).
DEFAULTS: dict[str, dict[str, Any]] = {
    'naive': {'learning_rate': 3e-3},
    'l2': {'learning_rate': 3e-3, 'strength': 1e-2},
    'ewc': {'learning_rate': 3e-3, 'strength': 100.0},
    'gpm': {'learning_rate': 3e-3, 'threshold': 0.9, 'unprotected': 'freeze'},
    'sculpt': {'learning_rate': 3e-3, 'min_fraction': 0.1,
               'max_fraction': 0.5, 'weight_decay': 0.0, 'protect': 'all'},
    'sculpt_released': {'learning_rate': 3e-3, 'weight_decay': 0.0,
                        'protect': 'all'},
    'gpm_ewc': {'learning_rate': 3e-3, 'threshold': 0.9, 'strength': 100.0},
}


# Pre-training on the first domain (``Config.pretrain_steps > 0``); fixed,
# not tuned: AdamW, linear warm-up then cosine decay.
PRETRAIN = {'peak_learning_rate': 3e-3, 'end_learning_rate': 3e-4,
            'warmup_steps': 100, 'weight_decay': 0.1}

# Fine-tuning the pre-trained model: chosen on the validation split (seed 0)
# by ``python -m benchmarks.continual --tasks text_pretrained --tune``
# (benchmarks/results/continual_tuning_text_pretrained.json).
PRETRAINED_DEFAULTS: dict[str, dict[str, Any]] = {
    'naive': {'learning_rate': 3e-4},
    'l2': {'learning_rate': 3e-4, 'strength': 0.1},
    'ewc': {'learning_rate': 1e-3, 'strength': 1000.0},
    'gpm': {'learning_rate': 1e-3, 'threshold': 0.9, 'unprotected': 'freeze'},
    'sculpt': {'learning_rate': 3e-4, 'min_fraction': 0.1,
               'max_fraction': 0.5, 'weight_decay': 0.0, 'protect': 'all'},
    'sculpt_released': {'learning_rate': 3e-4, 'weight_decay': 0.0,
                        'protect': 'all'},
    'gpm_ewc': {'learning_rate': 1e-3, 'threshold': 0.9, 'strength': 100.0},
}


@dataclasses.dataclass(frozen=True)
class Config:
  domains: tuple[str, ...] = DOMAINS
  max_bytes: int = 300_000  # per domain
  split_chunk: int = 4096  # bytes; every 10th chunk is held out
  dim: int = 64
  layers: int = 2
  heads: int = 4
  ffn_dim: int = 172
  seq_len: int = 64
  batch_size: int = 16
  steps_per_task: int = 150
  eval_batches: int = 4  # of batch_size sequences, per domain and split
  memory_samples: int = 32  # sequences per domain for Fisher / importance
  pretrain_steps: int = 0  # > 0: the first domain pre-trains the model
  seed: int = 0


# ----------------------------------------------------------------------------
# Domains.


def _stdlib() -> pathlib.Path:
  return pathlib.Path(sysconfig.get_paths()['stdlib'])


def _python_files() -> list[pathlib.Path]:
  root = _stdlib()
  skipped = ('test', 'tests', 'idle_test', 'pydoc_data')
  return [f for f in data_lib.stdlib_files()
          if not set(f.relative_to(root).parts[:-1]) & set(skipped)]


def _english_text() -> bytes:
  """The string values of ``pydoc_data/topics.py`` (English reference text)."""
  path = _stdlib() / 'pydoc_data' / 'topics.py'
  if not path.is_file():
    return b''
  for node in ast.parse(path.read_text(encoding='utf-8')).body:
    if (isinstance(node, ast.Assign) and len(node.targets) == 1
        and getattr(node.targets[0], 'id', None) == 'topics'):
      topics = ast.literal_eval(node.value)
      return '\n'.join(topics[k] for k in sorted(topics)).encode('utf-8')
  return b''


def _files(root: pathlib.Path, suffix: str) -> list[pathlib.Path]:
  if not root.is_dir():
    return []
  return sorted((p for p in root.rglob('*' + suffix) if p.is_file()),
                key=lambda p: p.relative_to(root).as_posix())


def domain_bytes(name: str, max_bytes: Optional[int]) -> bytes:
  """The text of one domain (empty when its files are not installed)."""
  if name == 'python':
    return data_lib.read_bytes(_python_files(), max_bytes)
  if name == 'english':
    text = _english_text()
    return text if max_bytes is None else text[:max_bytes]
  if name == 'c':
    include = pathlib.Path(sysconfig.get_paths()['include'])
    return data_lib.read_bytes(_files(include, '.h'), max_bytes)
  if name == 'dectest':
    return data_lib.read_bytes(
        _files(_stdlib() / 'test' / 'decimaltestdata', '.decTest'), max_bytes)
  raise ValueError(f'Unknown domain {name!r}; choose from {DOMAINS}.')


@dataclasses.dataclass(frozen=True)
class Domains:
  names: list[str]
  train: list[np.ndarray]  # uint8 bytes per domain
  val: list[np.ndarray]
  test: list[np.ndarray]
  skipped: list[str]  # requested domains whose files are missing


def load_domains(config: Config, *, read: Callable[[str, Optional[int]], bytes]
                 = domain_bytes) -> Domains:
  """Every available domain split into train / validation / test bytes.

  Raises:
    data_lib.CorpusError: fewer than two domains are available.
  """
  names, splits, skipped = [], [], []
  need = config.seq_len + 2
  for name in config.domains:
    raw = read(name, config.max_bytes)
    if len(raw) < 10 * need:
      skipped.append(name)
      continue
    train, held_out = data_lib.split(raw, val_every=10,
                                     split_chunk=config.split_chunk)
    val, test = data_lib.split(held_out.tobytes(), val_every=2,
                               split_chunk=config.split_chunk)
    if min(len(val), len(test)) < need:
      skipped.append(name)
      continue
    names.append(name)
    splits.append((train, val, test))
  if len(names) < 2:
    raise data_lib.CorpusError(
        f'Continual LM needs at least two text domains; found {names} '
        f'(missing: {skipped}).')
  train, val, test = (list(s) for s in zip(*splits))
  return Domains(names=names, train=train, val=val, test=test, skipped=skipped)


# ----------------------------------------------------------------------------
# Model.


def _kernel_tree(params, value_of_block: Callable[[int], Any]):
  """A params-shaped tree: ``value_of_block(i)`` at the kernels of block i,
  None elsewhere (embedding, head, norms)."""
  def pick(path, _):
    keys = [getattr(k, 'key', getattr(k, 'idx', None)) for k in path]
    if keys[0] == 'blocks' and keys[-1] == 'kernel':
      return value_of_block(int(keys[1]))
    return None
  return jax.tree_util.tree_map_with_path(pick, params)


@functools.lru_cache(maxsize=4)
def network(config: Config) -> types.SimpleNamespace:
  """Initial params and the jitted functions shared by every method."""
  model_config = model_lib.Config(
      dim=config.dim, layers=config.layers, heads=config.heads,
      ffn_dim=config.ffn_dim, max_seq_len=config.seq_len)
  model = model_lib.Llama(model_config, rngs=nnx.Rngs(config.seed))
  graphdef, state = nnx.split(model)

  def module(p):
    template = jax.tree.map(lambda v: v, state)
    nnx.replace_by_pure_dict(template, p)
    return nnx.merge(graphdef, template)

  def loss(p, inputs, targets):
    return model_lib.cross_entropy(module(p)(inputs), targets)

  def loss_one(p, example):
    """One sequence's mean next-byte loss (for the Fisher)."""
    inputs, targets = example
    return loss(p, inputs[None], targets[None])

  @jax.jit
  def block_importance(p, inputs):
    """``cos(x, block(x))`` per transformer block (Sculpting Subspaces)."""
    net = module(p)
    positions = jnp.broadcast_to(
        jnp.arange(inputs.shape[1], dtype=jnp.int32), inputs.shape)
    x, scores = net.embed(inputs), []
    for block in net.blocks:
      y = block(x, positions)
      scores.append(continual.activation_importance(x, y))
      x = y
    return jnp.stack(scores)

  @jax.jit
  def layer_inputs(p, inputs):
    """Every linear layer's and the embedding's inputs (GPM's memory)."""
    return continual.layer_inputs(module(p), inputs)

  @jax.jit
  def losses(p, batches):
    """Mean loss per domain of ``(inputs, targets)``, each ``(D, B, b, s)``."""
    per_batch = jax.vmap(jax.vmap(lambda i, t: loss(p, i, t)))(*batches)
    return per_batch.mean(axis=1)

  return types.SimpleNamespace(
      initial=nnx.to_pure_dict(state), loss=loss, loss_one=loss_one,
      block_importance=block_importance, layer_inputs=layer_inputs,
      losses=losses)


# ----------------------------------------------------------------------------
# What the methods need from the model (examples/continual_common.py).


def _model(net, hyper: dict[str, Any]) -> common.Model:
  """Fisher of one sequence; GPM's layer inputs (``continual.layer_inputs``);
  sculpt's importance ``cos(block input, block output)`` per transformer
  block, and its matrices: with ``protect='blocks'`` the blocks' kernels, with
  ``'all'`` also the embedding and the head (every 2-D leaf; no importance
  score, so ``max_fraction``)."""
  protect = hyper.get('protect', 'blocks')
  if protect not in ('blocks', 'all'):
    raise ValueError(f"`protect` must be 'blocks' or 'all', got {protect!r}.")

  def importance(params, samples):
    scores = np.asarray(net.block_importance(params, samples[0]))
    return _kernel_tree(params, lambda i: scores[i])

  matrices = None if protect == 'all' else (lambda p: _kernel_tree(
      p, lambda i: so.DimensionNumbers(-2, -1)))
  return common.Model(
      loss_one=net.loss_one, fisher_batch_size=8, importance=importance,
      layer_inputs=lambda params, samples: net.layer_inputs(params, samples[0]),
      dimension_numbers=matrices)


# ----------------------------------------------------------------------------
# Training and evaluation.


def _stacked_eval(tokens: list[np.ndarray], config: Config):
  batches = [data_lib.eval_batches(t, batches=config.eval_batches,
                                   batch_size=config.batch_size,
                                   seq_len=config.seq_len) for t in tokens]
  return tuple(jnp.asarray(np.stack([np.stack([b[k] for b in domain])
                                     for domain in batches])) for k in (0, 1))


@functools.lru_cache(maxsize=2)
def _pretrained(config: Config, tokens: bytes):
  net = network(config)
  # Warm-up: PRETRAIN's, at most a tenth of a short run.
  warmup = min(PRETRAIN['warmup_steps'], max(1, config.pretrain_steps // 10))
  tx = optax.adamw(optax.warmup_cosine_decay_schedule(
      0.0, PRETRAIN['peak_learning_rate'], warmup, config.pretrain_steps,
      PRETRAIN['end_learning_rate']),
                   weight_decay=PRETRAIN['weight_decay'])

  @jax.jit
  def step(params, opt_state, inputs, targets):
    grads = jax.grad(net.loss)(params, inputs, targets)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  params, corpus = net.initial, np.frombuffer(tokens, np.uint8)
  opt_state = tx.init(params)
  for k in range(config.pretrain_steps):
    inputs, targets = data_lib.batch_at(
        corpus, seed=config.seed + 2, step=k, batch_size=config.batch_size,
        seq_len=config.seq_len)
    params, opt_state = step(params, opt_state, inputs, targets)
  return params


def pretrain(config: Config, domains: Domains):
  """The initial params of every method: ``network(config).initial``, or,
  with ``config.pretrain_steps > 0``, those weights trained on the first
  domain for that many steps with AdamW (``PRETRAIN``; its own batch stream).
  Cached, so a run of several methods pre-trains once."""
  if config.pretrain_steps <= 0:
    return network(config).initial
  return _pretrained(config, domains.train[0].tobytes())


def run_method(name: str, hyper: dict[str, Any], domains: Domains,
               config: Config, *,
               make_method: Callable[..., Any] = common.make_method
               ) -> dict[str, Any]:
  """Train one method on every domain in turn; its loss matrices.

  ``make_method(name, hyper, model)`` builds the method (default: the
  examples' table, ``continual_common.make_method``; the benchmarks pass
  their own).
  """
  net = network(config)
  method = make_method(name, hyper, _model(net, hyper))
  tx, params = method.tx, pretrain(config, domains)
  opt_state = tx.init(params)

  @jax.jit
  def train_step(params, opt_state, inputs, targets):
    value, grads = jax.value_and_grad(net.loss)(params, inputs, targets)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, value

  evaluation = {split: _stacked_eval(getattr(domains, split), config)
                for split in ('val', 'test')}
  evaluate = lambda p: {s: np.asarray(net.losses(p, b))
                        for s, b in evaluation.items()}
  baseline = evaluate(params)

  def train(t, params, opt_state):
    # With pre-training, the first domain is already learned.
    steps = 0 if t == 0 and config.pretrain_steps > 0 else config.steps_per_task
    value = None
    for step in range(steps):
      inputs, targets = data_lib.batch_at(
          domains.train[t], seed=config.seed,
          step=t * config.steps_per_task + step,
          batch_size=config.batch_size, seq_len=config.seq_len)
      params, opt_state, value = train_step(params, opt_state, inputs, targets)
    return params, opt_state, None if value is None else float(value)

  def samples(t):
    return data_lib.batch_at(
        domains.train[t], seed=config.seed + 1, step=t,
        batch_size=config.memory_samples, seq_len=config.seq_len)

  start = time.perf_counter()
  _, _, matrices, final_loss, boundaries = common.run_tasks(
      len(domains.names), method, params, opt_state, train=train,
      evaluate=evaluate, samples=samples)
  return {
      'method': name, 'hyper': hyper,
      'test': matrices['test'].tolist(), 'val': matrices['val'].tolist(),
      'test_summary': loss_summary(matrices['test'], baseline['test']),
      'val_summary': loss_summary(matrices['val'], baseline['val']),
      'final_train_loss': final_loss,
      'seconds': time.perf_counter() - start,
      'boundary_seconds': boundaries,
  }


def defaults(config: Config) -> dict[str, dict[str, Any]]:
  """Each method's validation-chosen hyper-parameters for this setting."""
  return PRETRAINED_DEFAULTS if config.pretrain_steps > 0 else DEFAULTS


def report_header(config: Config, domains: Domains) -> dict[str, Any]:
  """The config and the domains of a report (JSON-ready)."""
  return {
      'config': dataclasses.asdict(config), 'tasks': domains.names,
      'skipped_domains': domains.skipped,
      'domain_bytes': {n: [len(domains.train[i]), len(domains.val[i]),
                           len(domains.test[i])]
                       for i, n in enumerate(domains.names)},
  }


def run(config: Config, methods: Sequence[str] = METHODS,
        hyper: Optional[dict[str, dict[str, Any]]] = None, *,
        make_method: Callable[..., Any] = common.make_method
        ) -> dict[str, Any]:
  domains = load_domains(config)
  hyper = {**defaults(config), **(hyper or {})}
  return {**report_header(config, domains),
          'results': {m: run_method(m, hyper[m], domains, config,
                                    make_method=make_method)
                      for m in methods}}


# ----------------------------------------------------------------------------
# Reporting.


def format_report(report: dict[str, Any]) -> str:
  names = report['tasks']
  width = max(len(n) for n in names) + 2
  out = []
  for name, result in report['results'].items():
    out.append(f'== {name} {result["hyper"]} ({result["seconds"]:.1f} s), '
               'test loss (nats/byte)')
    out.append('after \\ on'.ljust(width) + ''.join(n.rjust(9) for n in names))
    for i, row in enumerate(result['test']):
      out.append(names[i].ljust(width) + ''.join(f'{v:9.3f}' for v in row))
  out.append('')
  out.append(f'{"method":8s} {"avg loss":>9s} {"forgetting":>11s} '
             f'{"learned":>8s}')
  for name, result in report['results'].items():
    s = result['test_summary']
    out.append(f'{name:8s} {s["average_loss"]:9.3f} {s["forgetting"]:+11.3f} '
               f'{s["learned_loss"]:8.3f}')
  return '\n'.join(out)


def plot(report: dict[str, Any], path: str | pathlib.Path) -> None:
  """One loss-matrix heatmap per method (matplotlib, Agg backend)."""
  every = np.concatenate([np.ravel(r['test'])
                          for r in report['results'].values()])
  config, names = report['config'], report['tasks']
  pretrained = (f', pre-trained {config["pretrain_steps"]} steps on {names[0]}'
                if config.get('pretrain_steps') else '')
  common.plot_matrices(
      report, path, values=np.asarray,
      limits=(float(np.min(every)), float(np.max(every))), cmap='viridis_r',
      number_format='{:.2f}',
      title=lambda s: (f'loss {s["average_loss"]:.3f}  '
                       f'forgot {s["forgetting"]:+.3f}'),
      task_labels=names, axis_name='domain',
      colorbar_label='test loss (nats/byte)',
      suptitle=f'continual byte-level LM (seed {config["seed"]}{pretrained}): '
      'test loss matrix per method', panel_width=3.0, high_is_dark=True)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--domains', default=','.join(DOMAINS))
  parser.add_argument('--methods', default=','.join(METHODS))
  parser.add_argument('--steps', type=int, default=None,
                      help='training steps per domain (default 150)')
  parser.add_argument('--pretrain-steps', type=int, default=0,
                      help='pre-train on the first domain for this many '
                      'steps, then fine-tune the others (default 0: none)')
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--quick', action='store_true',
                      help='CI-sized run: 3 domains, 20 steps, 1 layer')
  parser.add_argument('--json', default=None, help='write the results here')
  parser.add_argument('--plot', default=None, help='write the heatmap PNG here')
  return parser.parse_args(argv)


def config_from_args(args: argparse.Namespace) -> Config:
  config = Config(domains=tuple(d for d in args.domains.split(',') if d),
                  seed=args.seed, pretrain_steps=args.pretrain_steps)
  if args.quick:
    config = dataclasses.replace(
        config, domains=config.domains[:3], max_bytes=60_000, dim=32, layers=1,
        ffn_dim=64, seq_len=32, batch_size=8, steps_per_task=20,
        eval_batches=1, memory_samples=8)
  if args.steps is not None:
    config = dataclasses.replace(config, steps_per_task=args.steps)
  return config


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
  args = parse_args(argv)
  report = run(config_from_args(args),
               [m for m in args.methods.split(',') if m])
  print(format_report(report))
  if args.json:
    pathlib.Path(args.json).write_text(json.dumps(report, indent=1))
  if args.plot:
    plot(report, args.plot)
  return report


if __name__ == '__main__':
  main()
