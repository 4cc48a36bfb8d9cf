"""Fine-tuning benchmark: adapt a pre-trained model to a new text domain.

The byte-level LLaMA-style model of ``examples/lm`` is pre-trained with AdamW
on the source domain (the CPython standard library's sources, as in
``benchmarks.quality``), then each method fine-tunes the same pre-trained
weights on the target domain, the text of Python's reference documentation
(``pydoc_data.topics.topics``, shipped with CPython). Nothing is downloaded::

  python -m benchmarks.finetune                # default CPU run (2 seeds)
  python -m benchmarks.finetune --quick        # smoke test (seconds)

Per method: target-domain test loss, source-domain loss (forgetting: its rise
over the pre-trained model's), trainable parameters, optimizer-state bytes
(``subspace_optax.state_bytes``) and the median step time. Protocol (details
in ``benchmarks/README.md``, section "Fine-tuning"):

* The reparameterised methods (LoRA, PiSSA, MiLoRA, SVFit, SALT, Effort)
  and GaLore adapt the transformer block kernels only; embeddings, norms and
  the output head are frozen (PEFT's setting). AdamW and Sculpt train all
  params (full fine-tuning).
* Equal trainable parameters: LoRA's rank ``r`` is the one giving it 16x the
  trainable parameters of SVFit (the SVFit paper's comparison); PiSSA, MiLoRA
  and Effort use the same ``r`` (Effort: ``q = r`` minor triplets), SALT the
  paper's ``10 %`` top values and the largest LoRA rank ``q`` within LoRA's
  count. GaLore gets the largest rank whose state bytes fit LoRA's (it
  updates every entry of the block kernels; with Adam on the embeddings too,
  their moments alone would outweigh LoRA's whole state).
* Every run: ``clip_by_global_norm(1.0)``, then the method, no weight decay, 10 %
  linear warm-up then cosine decay to 10 % of the peak rate. The peak rate is
  chosen per method from a grid of 3 values on a validation split of the
  target domain (seed 0); the other seeds rerun the chosen rate. Test losses
  are measured on held-out splits of both domains.
* The pre-trained params are computed once per seed and kept in memory.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import pathlib
import shlex
import statistics
import subprocess
import sys
import time
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from pydoc_data import topics as pydoc_topics

import subspace_optax as so
from benchmarks import harness
from benchmarks import methods as lm_methods
from benchmarks import quality
from examples.lm import data as data_lib
from examples.lm import model as model_lib

DEFAULT_OUT = 'benchmarks/results/finetune_cpu.json'
LORA_TO_SVFIT = 16  # SVFit's claim: as good as LoRA with 16x fewer params
SCULPT_FRACTION = 0.5  # top singular directions kept out of the update
# Peak learning rates tried per method (3 each). A first run with grids 3x
# lower chose the top value for every method, so the grids were moved up.
ADAPTER_GRID = (3e-3, 1e-2, 3e-2)
FULL_GRID = (1e-3, 3e-3, 1e-2)


@dataclasses.dataclass(frozen=True)
class Setup:
  """Everything shared by the runs."""

  config: model_lib.Config
  pretrain_steps: int
  steps: int
  batch_size: int
  seq_len: int
  eval_batches: int
  pretrain_lr: float
  source_bytes: int
  sweep: bool  # False: the middle of each grid, no selection (--quick)


def make_setup(args) -> Setup:
  if args.quick:
    config = model_lib.Config(dim=32, layers=1, heads=2, ffn_dim=64,
                              max_seq_len=32)
    return Setup(config, args.pretrain_steps or 30, args.steps or 12,
                 batch_size=4, seq_len=32, eval_batches=2, pretrain_lr=3e-3,
                 source_bytes=200_000, sweep=False)
  config = model_lib.Config(dim=64, layers=2, heads=4, ffn_dim=172,
                            max_seq_len=64)
  return Setup(config, args.pretrain_steps or 1000, args.steps or 300,
               batch_size=8, seq_len=64, eval_batches=16, pretrain_lr=3e-3,
               source_bytes=1_000_000, sweep=True)


# ----------------------------------------------------------------------------
# Data: the source (stdlib sources) and target (reference manual) domains.


def three_way(data: bytes, chunk: int = 2048):
  """Chunks of ``chunk`` bytes: 8 of 10 train, then 1 validation, 1 test."""
  tokens = np.frombuffer(data, dtype=np.uint8)
  parts = ([], [], [])
  for i in range(0, len(tokens), chunk):
    parts[min(2, max(0, (i // chunk) % 10 - 7))].append(tokens[i:i + chunk])
  return tuple(np.concatenate(p) for p in parts)


def load_domains(setup: Setup) -> dict[str, Any]:
  source = data_lib.load_corpus(None, max_bytes=setup.source_bytes,
                                seq_len=setup.seq_len)
  text = '\n\n'.join(pydoc_topics.topics[k]
                     for k in sorted(pydoc_topics.topics))
  train, val, test = three_way(text.encode('utf-8'))
  evals = lambda t: data_lib.eval_batches(
      t, batches=setup.eval_batches, batch_size=setup.batch_size,
      seq_len=setup.seq_len)
  return {
      'source_train': source.train, 'target_train': train,
      'source_test': evals(source.val), 'target_val': evals(val),
      'target_test': evals(test),
      'description': {
          'source': source.description,
          'target': f'pydoc_data.topics ({len(pydoc_topics.topics)} topics '
                    f'of the Python reference manual): {len(text):,} chars; '
                    f'train/val/test {len(train):,}/{len(val):,}/{len(test):,}'
                    ' bytes'}}


# ----------------------------------------------------------------------------
# Methods.


@dataclasses.dataclass(frozen=True)
class Method:
  description: str
  factory: Callable[..., Any]
  kwargs: Callable[[dict[str, Any]], dict[str, Any]]  # context -> kwargs
  grid: tuple[float, ...]
  peft: bool  # trains the block kernels only (the rest frozen)


def _blocks(ctx):
  return dict(mask=lm_methods.block_matrix_mask)


def galore_blocks(learning_rate, rank: int, refresh: int):
  """``so.galore`` on the block kernels, the other leaves frozen: with Adam
  on the embeddings and head (their moments alone outweigh LoRA's state)
  GaLore could not be compared at equal state bytes."""
  labels = lambda params: jax.tree.map(
      lambda block: 'blocks' if block else 'frozen',
      lm_methods.block_matrix_mask(params))
  return optax.multi_transform(
      {'blocks': so.galore(learning_rate, rank, refresh=refresh),
       'frozen': optax.set_to_zero()}, labels)


galore_blocks.static_args = ('rank', 'refresh')


METHODS: dict[str, Method] = {
    'adamw': Method('full fine-tuning, optax.adamw', optax.adamw,
                    lambda c: dict(weight_decay=0.0), FULL_GRID, False),
    'lora': Method('LoRA, scale 1 (PEFT alpha = r)', so.lora,
                   lambda c: dict(rank=c['rank'], **_blocks(c)),
                   ADAPTER_GRID, True),
    'pissa': Method('PiSSA: LoRA on the top singular triplets', so.pissa,
                    lambda c: dict(rank=c['rank'], **_blocks(c)),
                    ADAPTER_GRID, True),
    'milora': Method('MiLoRA: LoRA on the minor singular triplets', so.milora,
                     lambda c: dict(rank=c['rank'], **_blocks(c)),
                     ADAPTER_GRID, True),
    'svfit': Method("SVFit: top singular values, rank='energy' (99 %)",
                    so.svfit, lambda c: dict(rank='energy', **_blocks(c)),
                    ADAPTER_GRID, True),
    'salt': Method('SALT: scale/shift of the top 10 %, LoRA on the rest',
                   so.salt, lambda c: dict(rank=0.1, lora_rank=c['salt_q'],
                                           **_blocks(c)), ADAPTER_GRID, True),
    'effort': Method('Effort: the q = r minor singular triplets', so.effort,
                     lambda c: dict(rank=c['rank'], **_blocks(c)),
                     ADAPTER_GRID, True),
    'galore': Method('GaLore (scale 0.25) on every entry of the block '
                     'kernels, the rest frozen', galore_blocks,
                     lambda c: dict(rank=c['galore_rank'],
                                    refresh=c['refresh']),
                     tuple(10 * lr for lr in FULL_GRID), True),
    'sculpt': Method(
        f'Sculpt: AdamW out of the top {SCULPT_FRACTION:.0%} singular '
        'directions of the pre-trained block kernels', so.continual.sculpt,
        lambda c: dict(memory=c['sculpt_memory'], max_fraction=SCULPT_FRACTION,
                       dimension_numbers=lm_methods.block_matrices),
        FULL_GRID, False),
}


def make_tx(name: str, ctx: dict[str, Any], lr: float):
  """Clipping, then the method with its learning rate injected (set per step
  in the state, so the sweep and the seeds reuse one compilation)."""
  method = METHODS[name]
  static = (() if method.factory is optax.adamw
            else so.static_args(method.factory))
  injected = optax.inject_hyperparams(method.factory, static_args=static)(
      learning_rate=lr, **method.kwargs(ctx))
  return optax.chain(optax.clip_by_global_norm(1.0), injected)


def plain_tx(name: str, ctx: dict[str, Any], lr: float = 1e-3):
  method = METHODS[name]
  return method.factory(learning_rate=lr, **method.kwargs(ctx))


def init_params(config: model_lib.Config, seed: int):
  """``(graphdef, params)``: params as plain arrays (``nnx.as_pure``)."""
  graphdef, state = nnx.split(model_lib.Llama(config, rngs=nnx.Rngs(seed)))
  return graphdef, nnx.as_pure(state)


def factor_count(tx, params, concrete: bool = False) -> int:
  """Trainable parameters of a reparameterised method: its factors (SVFit's
  energy rank reads the singular values: ``concrete`` runs ``init``)."""
  state = tx.init(params) if concrete else jax.eval_shape(tx.init, params)
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.factors))


def resolve_sizes(params, steps: int) -> dict[str, Any]:
  """Ranks for equal trainable params (LoRA family) and state (GaLore)."""
  block_params = sum(
      int(x.size) for p, x in jax.tree_util.tree_leaves_with_path(params)
      if lm_methods.is_block_matrix(p, x))
  ctx = {'refresh': max(1, steps // 3)}
  svfit = factor_count(so.svfit(1e-3, mask=lm_methods.block_matrix_mask),
                       params, concrete=True)
  per_rank = factor_count(so.lora(1e-3, 1, mask=lm_methods.block_matrix_mask),
                          params)
  ctx['rank'] = max(1, round(LORA_TO_SVFIT * svfit / per_rank))
  lora = ctx['rank'] * per_rank
  salt = lambda q: factor_count(so.salt(
      1e-3, 0.1, q, mask=lm_methods.block_matrix_mask), params)
  ctx['salt_q'] = max([1] + [q for q in range(1, ctx['rank'] * 4 + 1)
                             if salt(q) <= lora])
  budget = so.state_bytes(plain_tx('lora', ctx).init(params))
  ctx['galore_rank'], _ = quality.budget_rank(
      lambda r: plain_tx('galore', {**ctx, 'galore_rank': r}), params,
      budget, max_rank=64)
  ctx['sculpt_memory'] = None  # per seed, from the pre-trained params
  ctx['declared'] = {
      'svfit_params': svfit, 'lora_rank': ctx['rank'], 'lora_params': lora,
      'lora_to_svfit_params': lora / svfit, 'salt_lora_rank': ctx['salt_q'],
      'galore_rank': ctx['galore_rank'], 'galore_refresh': ctx['refresh'],
      'lora_state_bytes': int(budget), 'block_matrix_params': block_params}
  return ctx


# ----------------------------------------------------------------------------
# Training.


def _is_injected(x) -> bool:
  """optax.inject_hyperparams' state (InjectStatefulHyperparamsState in
  recent optax, InjectHyperparamsState before)."""
  return 'learning_rate' in getattr(x, 'hyperparams', ())


def _set_lr(state, lr):
  """``state`` with every injected ``learning_rate`` set to ``lr``."""
  return jax.tree.map(
      lambda s: s._replace(hyperparams={**s.hyperparams, 'learning_rate': lr})
      if _is_injected(s) else s, state, is_leaf=_is_injected)


class Trainer:
  """Jitted loss, evaluation and one step per optimizer (compiled once)."""

  def __init__(self, setup: Setup, graphdef):
    self.setup, self.graphdef = setup, graphdef
    self.loss = lambda p, x, y: model_lib.cross_entropy(
        nnx.merge(graphdef, p)(x), y)
    self.eval_loss = jax.jit(self.loss)
    self._steps = {}

  def evaluate(self, params, batches) -> float:
    return float(np.mean([float(self.eval_loss(params, *b)) for b in batches]))

  def step_fn(self, key, tx):
    if key not in self._steps:

      @jax.jit
      def step(params, state, lr, inputs, targets):
        loss, grads = jax.value_and_grad(self.loss)(params, inputs, targets)
        updates, state = tx.update(grads, _set_lr(state, lr), params)
        return optax.apply_updates(params, updates), state, loss

      self._steps[key] = step
    return self._steps[key]

  def train(self, key, tx, params, tokens, *, peak, steps, seed):
    """``steps`` steps from ``params``; (params, state, losses, step ms)."""
    step = self.step_fn(key, tx)
    schedule = lm_methods.warmup_cosine(peak, steps)
    state = tx.init(params)
    if not any(map(_is_injected,
                   jax.tree.leaves(state, is_leaf=_is_injected))):
      raise ValueError(f'{key}: no injected learning_rate in the state.')
    losses, times = [], []
    for t in range(steps):
      inputs, targets = data_lib.batch_at(
          tokens, seed=seed, step=t, batch_size=self.setup.batch_size,
          seq_len=self.setup.seq_len)
      start = time.perf_counter()
      params, state, loss = jax.block_until_ready(
          step(params, state, jnp.float32(schedule(t)), inputs, targets))
      times.append(1e3 * (time.perf_counter() - start))
      losses.append(float(loss))
    return params, state, losses, statistics.median(times[1:] or times)


def pretrain(trainer: Trainer, params, domains, seed: int):
  tx = optax.chain(optax.clip_by_global_norm(1.0),
                   optax.inject_hyperparams(optax.adamw)(
                       learning_rate=0.0, weight_decay=0.0))
  params, _, losses, _ = trainer.train(
      'pretrain', tx, params, domains['source_train'],
      peak=trainer.setup.pretrain_lr, steps=trainer.setup.pretrain_steps,
      seed=10_000 + seed)
  return params, losses


def finetune(trainer, name, ctx, params, domains, *, lr, seed):
  tx = make_tx(name, ctx, lr)
  tuned, _, losses, ms = trainer.train(
      name, tx, params, domains['target_train'], peak=lr,
      steps=trainer.setup.steps, seed=seed)
  evaluate = lambda split: trainer.evaluate(tuned, domains[split])
  return {'seed': seed, 'learning_rate': lr,
          'target_val_loss': evaluate('target_val'),
          'target_loss': evaluate('target_test'),
          'source_loss': evaluate('source_test'),
          'train_loss_first': losses[0], 'train_loss_last10':
              float(np.mean(losses[-10:])), 'step_ms': ms}


def trainable_params(name, ctx, params) -> int:
  """Factors of a reparameterised method, else every param it updates."""
  if name == 'galore':
    return ctx['declared']['block_matrix_params']
  if METHODS[name].peft:
    return factor_count(plain_tx(name, ctx), params, concrete=True)
  return sum(int(x.size) for x in jax.tree.leaves(params))


# ----------------------------------------------------------------------------
# The benchmark.


def _median(values):
  return statistics.median(values) if values else None


def run(args) -> dict[str, Any]:
  began = time.perf_counter()
  setup = make_setup(args)
  seeds = [int(s) for s in args.seeds.split(',')]
  names = list(METHODS) if not args.methods else [
      n.strip() for n in args.methods.split(',')]
  unknown = [n for n in names if n not in METHODS]
  if unknown:
    raise SystemExit(f'error: unknown method(s) {unknown}; known: '
                     f'{", ".join(METHODS)}')
  domains = load_domains(setup)
  graphdef, _ = init_params(setup.config, seeds[0])
  trainer = Trainer(setup, graphdef)
  pretrained, reference, memories = {}, {}, {}
  for seed in seeds:  # pre-trained once per seed, kept in memory
    pretrained[seed], losses = pretrain(
        trainer, init_params(setup.config, seed)[1], domains, seed)
    memories[seed] = so.continual.sculpt_memory(
        pretrained[seed], max_fraction=SCULPT_FRACTION,
        dimension_numbers=lm_methods.block_matrices)
    reference[seed] = {
        'source_loss': trainer.evaluate(pretrained[seed],
                                        domains['source_test']),
        'target_loss': trainer.evaluate(pretrained[seed],
                                        domains['target_test']),
        'target_val_loss': trainer.evaluate(pretrained[seed],
                                            domains['target_val']),
        'pretrain_loss_last10': float(np.mean(losses[-10:]))}
    print(f'[finetune] pre-trained seed {seed}: {reference[seed]}',
          file=sys.stderr)
  sized = time.perf_counter()
  ctx = resolve_sizes(pretrained[seeds[0]], setup.steps)
  print(f'[finetune] sizes {ctx["declared"]} in '
        f'{time.perf_counter() - sized:.0f} s', file=sys.stderr)
  total = sum(int(x.size) for x in jax.tree.leaves(pretrained[seeds[0]]))

  rows = []
  for name in names:
    row_began = time.perf_counter()
    method = METHODS[name]
    grid = method.grid if setup.sweep else (method.grid[1],)
    runs_of = lambda seed, lr: finetune(
        trainer, name, {**ctx, 'sculpt_memory': memories[seed]},
        pretrained[seed], domains, lr=lr, seed=seed)
    sweep = [runs_of(seeds[0], lr) for lr in grid]
    best = min(sweep, key=lambda r: r['target_val_loss'])
    runs = [best] + [runs_of(seed, best['learning_rate'])
                     for seed in seeds[1:]]
    for r in runs:
      r['forgetting'] = r['source_loss'] - reference[r['seed']]['source_loss']
      r['target_gain'] = reference[r['seed']]['target_loss'] - r['target_loss']
    trainable = trainable_params(name, ctx, pretrained[seeds[0]])
    row = {
        'method': name, 'description': method.description,
        'learning_rate': best['learning_rate'], 'lr_grid': list(grid),
        'sweep': [{'learning_rate': r['learning_rate'],
                   'target_val_loss': r['target_val_loss']} for r in sweep],
        'trainable_params': trainable,
        'trainable_fraction': trainable / total,
        'state_bytes': int(so.state_bytes(plain_tx(
            name, {**ctx, 'sculpt_memory': memories[seeds[0]]}).init(
                pretrained[seeds[0]]))),
        'step_ms': _median([r['step_ms'] for r in runs]),
        'runs': runs}
    for key in ('target_loss', 'source_loss', 'forgetting', 'target_gain'):
      row[key] = _median([r[key] for r in runs])
    rows.append(row)
    print(f"[finetune] {name:>7} lr={row['learning_rate']:g} target="
          f"{row['target_loss']:.4f} source={row['source_loss']:.4f} "
          f"params={trainable} state={row['state_bytes']} "
          f"{row['step_ms']:.1f} ms/step, "
          f'{time.perf_counter() - row_began:.0f} s', file=sys.stderr)

  declared = dict(ctx['declared'])
  return {
      'benchmark': 'finetune',
      'date': args.date or datetime.date.today().isoformat(),
      'device': jax.default_backend(), 'cores': os.cpu_count(),
      'machine': f'{os.cpu_count()} CPU cores',
      'backend': jax.default_backend(),
      'load_average': harness.load_average(),
      'git_commit': git_commit(), 'command': args.command,
      'versions': harness.versions(),
      'setup': {
          'model': dataclasses.asdict(setup.config), 'params': total,
          'pretrain_steps': setup.pretrain_steps, 'steps': setup.steps,
          'batch_size': setup.batch_size, 'seq_len': setup.seq_len,
          'eval_tokens': setup.eval_batches * setup.batch_size * setup.seq_len,
          'pretrain': f'AdamW peak lr {setup.pretrain_lr:g} on the source',
          'schedule': 'warmup 10% then cosine to 10% of peak',
          'clip_by_global_norm': 1.0, 'weight_decay': 0.0, 'seeds': seeds,
          'lr_selection': (
              'per method, the grid value with the lowest target validation '
              f'loss on seed {seeds[0]}; other seeds rerun it'
              if setup.sweep else 'middle of the grid, no selection'),
          'sculpt_max_fraction': SCULPT_FRACTION,
          'peft_scope': 'block kernels (attention, MLP); embeddings, norms, '
                        'head frozen', **declared,
          'domains': domains['description']},
      'pretrained': {str(s): reference[s] for s in seeds},
      'rows': rows, 'claims': claims(rows, declared),
      'wall_seconds': time.perf_counter() - began}


def _compare(rows, a, b, key, claim, paper, extra=None):
  """Claim: ``a`` has a lower ``key`` than ``b`` (medians; per seed too)."""
  by = {r['method']: r for r in rows}
  if a not in by or b not in by:
    return None
  ra, rb = by[a], by[b]
  per_seed = [x[key] < y[key] for x, y in zip(ra['runs'], rb['runs'])]
  holds = ra[key] < rb[key]
  verdict = ('holds' if holds and all(per_seed) else
             'holds on the median only' if holds else 'does not hold')
  return {'claim': claim, 'paper': paper, 'metric': key,
          a: ra[key], b: rb[key], 'difference': ra[key] - rb[key],
          'holds_per_seed': per_seed, 'verdict': verdict, **(extra or {})}


def claims(rows, declared) -> list[dict[str, Any]]:
  ratio = {'lora_to_svfit_params': declared['lora_to_svfit_params']}
  out = [
      _compare(rows, 'svfit', 'lora', 'target_loss',
               'SVFit fits the target better than LoRA with ~16x fewer '
               'trainable params', 'Sun et al. 2024, arXiv:2409.05926', ratio),
      _compare(rows, 'milora', 'lora', 'target_loss',
               'MiLoRA fits the target better than LoRA (equal params)',
               'Wang et al. 2024, arXiv:2406.09044'),
      _compare(rows, 'milora', 'pissa', 'target_loss',
               'MiLoRA fits the target better than PiSSA (equal params)',
               'Wang et al. 2024, arXiv:2406.09044'),
      _compare(rows, 'milora', 'lora', 'forgetting',
               'MiLoRA forgets less of the pre-trained knowledge than LoRA',
               'Wang et al. 2024, arXiv:2406.09044'),
      _compare(rows, 'pissa', 'lora', 'target_loss',
               'PiSSA fits the target better than LoRA (equal params)',
               'Meng et al. 2024, arXiv:2404.02948'),
      _compare(rows, 'salt', 'lora', 'target_loss',
               'SALT fits the target better than LoRA (about equal params)',
               'Elsayed et al. 2025, arXiv:2503.16055'),
      _compare(rows, 'effort', 'adamw', 'forgetting',
               'Effort forgets less than full fine-tuning',
               'Yan et al. 2025, arXiv:2411.15633'),
      _compare(rows, 'sculpt', 'adamw', 'forgetting',
               'Sculpt forgets less than full fine-tuning',
               'Nayak et al. 2025, arXiv:2504.07097'),
      _compare(rows, 'galore', 'lora', 'target_loss',
               'GaLore fits the target better than LoRA at equal state bytes',
               'Zhao et al. 2024, arXiv:2403.03507'),
  ]
  return [c for c in out if c is not None]


def git_commit() -> Optional[str]:
  try:
    head = subprocess.run(['git', 'rev-parse', 'HEAD'], capture_output=True,
                          text=True, check=True).stdout.strip()
    dirty = subprocess.run(['git', 'status', '--porcelain'],
                           capture_output=True, text=True).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return None
  return head + ('+uncommitted' if dirty else '')


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(
      prog='python -m benchmarks.finetune', description=__doc__.split('\n')[0],
      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  p.add_argument('--steps', type=int, default=None,
                 help='fine-tuning steps per run (default 300; --quick 12)')
  p.add_argument('--pretrain-steps', type=int, default=None,
                 help='pre-training steps (default 1000; --quick 30)')
  p.add_argument('--seeds', default='0,1', help='comma-separated seeds')
  p.add_argument('--methods', default=None,
                 help=f'comma-separated subset of {", ".join(METHODS)}')
  p.add_argument('--quick', action='store_true',
                 help='smoke test: a 1-layer dim-32 model, no lr sweep')
  p.add_argument('--out', default=None,
                 help=f'JSON output (the default run writes {DEFAULT_OUT})')
  p.add_argument('--date', default=None, help='default: today')
  args = p.parse_args(argv)
  args.command = 'python -m benchmarks.finetune' + (
      ' ' + shlex.join(argv) if argv else '')
  return args


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
  argv = list(sys.argv[1:] if argv is None else argv)
  args = parse_args(argv)
  result = run(args)
  text = json.dumps(result, indent=2)
  print(text)
  defaults = parse_args([])
  default_run = all(getattr(args, k) == getattr(defaults, k)
                    for k in ('steps', 'pretrain_steps', 'seeds', 'methods',
                              'quick'))
  out = args.out or (DEFAULT_OUT if default_run else None)
  if out:
    pathlib.Path(out).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(out).write_text(text + '\n')
  return result


if __name__ == '__main__':
  main()
