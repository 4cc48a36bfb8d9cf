"""Quality benchmark: validation loss of each low-rank method relative to AdamW.

Every method trains the byte-level LLaMA-style model of ``examples/lm`` from
the same initial weights on the same batches (the CPython standard library's
sources, nothing downloaded), then the final validation loss is divided by
``optax.adamw``'s, and the optimizer-state bytes (``subspace_optax.state_bytes``)
by AdamW's::

  python -m benchmarks.quality                       # default CPU run
  python -m benchmarks.quality --seeds 0,1,2         # median over seeds
  python -m benchmarks.quality --methods adamw,galore,frugal \\
      --lr-multipliers 1/3,1,3                       # small lr sweep
  python -m benchmarks.quality --quick               # smoke test (seconds)

Protocol (details in ``benchmarks/README.md``, section "Quality"):

* Only the transformer block matrices (attention and MLP kernels) are
  projected, as in GaLore; the embedding, the output head and the norms keep
  full Adam (``benchmarks.methods.block_matrices``).
* Every run is ``clip_by_global_norm(1.0)`` then the method, with the GaLore
  LLaMA schedule (10 % linear warm-up, cosine decay to 10 % of the peak) and no
  weight decay.
* Learning rates follow each paper's recipe relative to AdamW's (the
  ``lr_ratio`` of the row in ``benchmarks.methods.REGISTRY``: the GaLore
  family, 0.01 with ``scale=0.25`` against AdamW's 0.001, is 10x; FRUGAL and
  DCT-AdamW, whose subspace step has scale 1, are 1x; Q-GaLore's 60M recipe
  0.015 is 15x). ``--lr-multipliers`` multiplies every method's rate by each
  value and keeps, per method, the one with the lowest median validation loss
  (the same number of runs for every method).
* Equal optimizer-state budget: the budget is ``subspace_optax.galore`` at
  rank ``dim // 4``. Methods marked ``match_budget`` get the rank whose state
  bytes are the largest within that budget (e.g. FRUGAL and Fira keep their reference
  side, where a rank costs more bytes, so they get a smaller rank). GaLore
  itself and ``optax.contrib.galore`` run at rank ``dim // 4``, APOLLO-Mini at
  rank 1 (its definition). A matched rank is the largest whose state is not
  above the budget, so no challenger gets more memory than GaLore.

Output: one JSON object on stdout, also written to ``--out`` (and a markdown
table to ``--markdown``).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import fractions
import json
import math
import os
import pathlib
import platform
import shlex
import statistics
import sys
import time
import warnings
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import subspace_optax as so
from examples.lm import data as data_lib
from examples.lm import model as model_lib
from benchmarks import methods as lm_optimizers

DEFAULT_OUT = 'benchmarks/results/quality_cpu.json'
DEFAULT_MARKDOWN = 'benchmarks/results/quality_cpu.md'
BASELINE = 'adamw'
BUDGET_METHOD = 'galore'

# ----------------------------------------------------------------------------
# Methods: rows of the one table, benchmarks.methods.REGISTRY (learning-rate
# ratio to AdamW, rank rule, description). The committed tables ran these rows,
# in this order.

QUALITY_METHODS = (
    'adamw', 'galore', 'optax_galore', 'frugal', 'fira',
    'online_subspace_descent', 'apollo', 'apollo_mini', 'q_galore', 'golore',
    'i3s', 'galore_momentum_reset', 'frugal_random', 'frugal_columns',
    'frugal_blocks', 'online_subspace_descent_lion', 'adamp', 'sgdp', 'auon',
    'auon_hybrid', 'dct_adamw')
METHODS: dict[str, lm_optimizers.Method] = {
    name: lm_optimizers.get(name) for name in QUALITY_METHODS}
QUICK_METHODS = ('adamw', 'galore')


def make_tx(name: str, learning_rate: optax.ScalarOrSchedule, rank,
            refresh: int, seed: int) -> optax.GradientTransformation:
  """Row ``name``: gradient clipping, then the method, no weight decay."""
  return lm_optimizers.make_optimizer(
      name, learning_rate_schedule=learning_rate, rank=rank,
      refresh=refresh, weight_decay=0.0, seed=seed)


# ----------------------------------------------------------------------------
# Set-up.


@dataclasses.dataclass(frozen=True)
class Setup:
  """Everything shared by the runs."""

  model_config: model_lib.Config
  steps: int
  batch_size: int
  seq_len: int
  eval_batches: int
  refresh: int
  adamw_lr: float
  max_bytes: int


def make_setup(args) -> Setup:
  if args.quick:
    config = model_lib.Config(dim=32, layers=2, heads=2, ffn_dim=64,
                              max_seq_len=32)
    return Setup(config, steps=args.steps or 10, batch_size=4, seq_len=32,
                 eval_batches=2, refresh=5, adamw_lr=args.adamw_lr,
                 max_bytes=200_000)
  config = model_lib.config_from_preset(args.model, scan_layers=False)
  return Setup(config, steps=args.steps or 300, batch_size=args.batch_size,
               seq_len=args.seq_len,
               eval_batches=args.eval_batches,
               refresh=args.refresh, adamw_lr=args.adamw_lr,
               max_bytes=args.max_bytes)


def init_params(setup: Setup, seed: int):
  """``(graphdef, params)``: params as plain arrays (``nnx.as_pure``)."""
  model = model_lib.Llama(setup.model_config, rngs=nnx.Rngs(seed))
  graphdef, state = nnx.split(model)
  return graphdef, nnx.as_pure(state)


def state_bytes_of(tx: optax.GradientTransformation, params) -> int:
  """State bytes of ``tx`` on ``params``, allocating nothing. The rank search
  below probes ranks that save no memory; their FullSizeWarning is expected."""
  with warnings.catch_warnings():
    warnings.simplefilter('ignore', so.FullSizeWarning)
    return int(so.state_bytes(jax.eval_shape(tx.init, params)))


def budget_rank(build: Callable[[int], optax.GradientTransformation],
                params, budget: int, max_rank: int) -> tuple[int, int]:
  """The largest rank in ``[1, max_rank]`` whose state fits in ``budget`` bytes.

  State bytes grow with the rank, so this is a bisection. Returns
  ``(rank, bytes)``; rank 1 if even that exceeds the budget.
  """
  size = lambda rank: state_bytes_of(build(rank), params)
  if size(max_rank) <= budget:
    return max_rank, size(max_rank)
  low, high = 1, max_rank  # bytes(high) > budget
  if size(low) > budget:
    return low, size(low)
  while high - low > 1:  # bytes(low) <= budget < bytes(high)
    middle = (low + high) // 2
    if size(middle) <= budget:
      low = middle
    else:
      high = middle
  return low, size(low)


def resolve_ranks(names: Sequence[str], setup: Setup,
                  params) -> tuple[dict[str, Optional[int]], int]:
  """Rank of each method and the state budget (bytes of GaLore at dim/4)."""
  quarter = setup.model_config.dim // 4
  schedule = lm_optimizers.warmup_cosine(1e-3, setup.steps)  # as in train()
  build_of = lambda name: lambda r: make_tx(
      name, schedule, r, setup.refresh, 0)
  budget = state_bytes_of(build_of(BUDGET_METHOD)(quarter), params)
  ranks = {}
  for name in names:
    rule = lm_optimizers.get(name).rank
    if rule is None or isinstance(rule, (int, float)):
      ranks[name] = rule
    elif rule == 'quarter':
      ranks[name] = quarter
    elif rule == 'match_budget':
      ranks[name], _ = budget_rank(build_of(name), params, budget,
                                   setup.model_config.dim)
    else:
      raise ValueError(f'Unknown rank rule {rule!r} for {name}.')
  return ranks, budget


# ----------------------------------------------------------------------------
# One run.


def train(name: str, setup: Setup, corpus: data_lib.Corpus, *, rank, lr: float,
          seed: int, param_dtype: Optional[str] = None,
          last: Optional[optax.GradientTransformation] = None,
          ) -> dict[str, Any]:
  """Train ``setup.steps`` steps; final validation loss, state bytes, times.

  ``param_dtype`` (e.g. ``'bfloat16'``) stores the float params in that dtype
  (the model still computes in its ``compute_dtype``); ``last`` is chained
  after the method (e.g. ``so.stochastic_rounding()``), see
  ``benchmarks/quality_bf16.py``.
  """
  wall, cpu = time.perf_counter(), time.process_time()
  graphdef, params = init_params(setup, seed)
  if param_dtype is not None:
    params = jax.tree.map(
        lambda x: x.astype(param_dtype)
        if jnp.issubdtype(x.dtype, jnp.floating) else x, params)
  schedule = lm_optimizers.warmup_cosine(lr, setup.steps)
  tx = make_tx(name, schedule, rank, setup.refresh, seed)
  if last is not None:
    tx = optax.chain(tx, last)
  opt_state = tx.init(params)
  state_size = int(so.state_bytes(opt_state))

  def loss_fn(params, inputs, targets):
    return model_lib.cross_entropy(nnx.merge(graphdef, params)(inputs), targets)

  @jax.jit
  def train_step(params, opt_state, inputs, targets):
    loss, grads = jax.value_and_grad(loss_fn)(params, inputs, targets)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  eval_step = jax.jit(loss_fn)
  losses = []
  for step in range(setup.steps):
    inputs, targets = data_lib.batch_at(
        corpus.train, seed=seed, step=step, batch_size=setup.batch_size,
        seq_len=setup.seq_len)
    params, opt_state, loss = train_step(params, opt_state, inputs, targets)
    losses.append(loss)
  losses = [float(l) for l in losses]
  val_batches = data_lib.eval_batches(
      corpus.val, batches=setup.eval_batches, batch_size=setup.batch_size,
      seq_len=setup.seq_len)
  val_loss = float(np.mean([float(eval_step(params, *b)) for b in val_batches]))
  return {
      'val_loss': val_loss,
      'train_loss_last10': float(np.mean(losses[-10:])),
      'finite': bool(math.isfinite(val_loss) and all(map(math.isfinite, losses))),
      'opt_state_bytes': state_size,
      'wall_seconds': time.perf_counter() - wall,
      'cpu_seconds': time.process_time() - cpu,
  }


# ----------------------------------------------------------------------------
# The benchmark.


def _median(values):
  values = [v for v in values if v is not None and math.isfinite(v)]
  return statistics.median(values) if values else None


def run(args) -> dict[str, Any]:
  began_wall, began_cpu = time.perf_counter(), time.process_time()
  setup = make_setup(args)
  seeds = [int(s) for s in args.seeds.split(',')]
  multipliers = [float(fractions.Fraction(m))
                 for m in args.lr_multipliers.split(',')]
  if args.methods:
    names = [n.strip() for n in args.methods.split(',') if n.strip()]
    unknown = [n for n in names if n not in lm_optimizers.REGISTRY]
    if unknown:
      raise SystemExit(f'error: unknown method(s) {unknown}; '
                       f'known: {", ".join(lm_optimizers.REGISTRY)}')
  else:
    names = list(QUICK_METHODS) if args.quick else list(METHODS)
  if BASELINE not in names:
    names.insert(0, BASELINE)

  corpus = data_lib.load_corpus(None, max_bytes=setup.max_bytes,
                                seq_len=setup.seq_len)
  _, params = init_params(setup, seeds[0])
  ranks, budget = resolve_ranks(names, setup, params)
  param_count = sum(int(x.size) for x in jax.tree.leaves(params))

  rows = []
  for name in names:
    method = lm_optimizers.get(name)
    sweep = []
    for multiplier in multipliers:
      lr = setup.adamw_lr * method.lr_ratio * multiplier
      runs = []
      for seed in seeds:
        result = train(name, setup, corpus, rank=ranks[name], lr=lr, seed=seed)
        result['seed'] = seed
        runs.append(result)
        print(f'[quality] {name:>24} lr={lr:<8g} seed={seed} '
              f'val={result["val_loss"]:.4f} cpu={result["cpu_seconds"]:.0f}s '
              f'wall={result["wall_seconds"]:.0f}s', file=sys.stderr)
      sweep.append({'lr_multiplier': multiplier, 'learning_rate': lr,
                    'median_val_loss': _median([r['val_loss'] for r in runs]),
                    'runs': runs})
    finite = [s for s in sweep if s['median_val_loss'] is not None]
    best = min(finite, key=lambda s: s['median_val_loss']) if finite else sweep[0]
    rows.append({
        'method': name, 'description': method.description,
        'rank': ranks[name], 'learning_rate': best['learning_rate'],
        'lr_ratio_to_adamw': method.lr_ratio * best['lr_multiplier'],
        'lr_multiplier': best['lr_multiplier'],
        'val_loss': best['median_val_loss'],
        'opt_state_bytes': best['runs'][0]['opt_state_bytes'],
        'runs': best['runs'],
        'sweep': [{k: s[k] for k in ('lr_multiplier', 'learning_rate',
                                     'median_val_loss')} for s in sweep]
                 if len(multipliers) > 1 else None,
    })

  baseline = next(r for r in rows if r['method'] == BASELINE)
  baseline_by_seed = {r['seed']: r['val_loss'] for r in baseline['runs']}
  galore = next((r for r in rows if r['method'] == BUDGET_METHOD), None)
  for row in rows:
    # Ratio per seed (same seed: same init and batches), then the median.
    row['val_loss_ratio_to_adamw'] = _median(
        [r['val_loss'] / baseline_by_seed[r['seed']] for r in row['runs']])
    row['state_ratio_to_adamw'] = (
        row['opt_state_bytes'] / baseline['opt_state_bytes'])
    row['state_ratio_to_galore'] = (
        None if galore is None
        else row['opt_state_bytes'] / galore['opt_state_bytes'])
  result = {
      'benchmark': 'quality',
      'date': args.date or datetime.date.today().isoformat(),
      'machine': args.machine or f'{os.cpu_count()} CPU cores',
      'command': args.command,
      'versions': {'python': platform.python_version(), 'jax': jax.__version__,
                   'optax': optax.__version__,
                   'flax': getattr(__import__('flax'), '__version__', None)},
      'backend': jax.default_backend(),
      'setup': {
          'model': dataclasses.asdict(setup.model_config),
          'params': param_count, 'steps': setup.steps,
          'batch_size': setup.batch_size, 'seq_len': setup.seq_len,
          'tokens': setup.steps * setup.batch_size * setup.seq_len,
          'eval_batches': setup.eval_batches,
          'eval_tokens': setup.eval_batches * setup.batch_size * setup.seq_len,
          'refresh': setup.refresh, 'adamw_lr': setup.adamw_lr,
          'schedule': 'warmup 10% then cosine to 10% of peak',
          'clip_by_global_norm': 1.0, 'weight_decay': 0.0,
          'seeds': seeds, 'lr_multipliers': multipliers,
          'corpus': corpus.description, 'corpus_fingerprint': corpus.fingerprint,
          'projected': 'transformer block kernels (attention, MLP)',
          'state_budget_bytes': budget,
          'state_budget': f'{BUDGET_METHOD} at rank dim//4 = '
                          f'{setup.model_config.dim // 4}',
      },
      'rows': rows,
      'bars': bars(rows),
      'wall_seconds': time.perf_counter() - began_wall,
      'cpu_seconds': time.process_time() - began_cpu,
  }
  return result


def bars(rows) -> dict[str, Any]:
  """The issue's quality bars, evaluated on the medians."""
  by_name = {r['method']: r for r in rows}
  out = {}
  galore = by_name.get(BUDGET_METHOD)
  if galore is not None and galore['val_loss_ratio_to_adamw'] is not None:
    ratio = galore['val_loss_ratio_to_adamw']
    out['galore_within_3pct_of_adamw'] = {
        'ratio': ratio, 'bound': 1.03, 'met': bool(ratio <= 1.03)}
    challengers = {}
    for name in ('frugal', 'fira', 'online_subspace_descent'):
      row = by_name.get(name)
      if row is None or row['val_loss_ratio_to_adamw'] is None:
        continue
      challengers[name] = {
          'ratio': row['val_loss_ratio_to_adamw'],
          'state_ratio_to_galore': row['state_ratio_to_galore'],
          # A smaller loss gap to AdamW than GaLore's (a loss below AdamW's
          # is no gap) within GaLore's state budget.
          'closer_than_galore': bool(
              row['val_loss_ratio_to_adamw'] < ratio
              and row['state_ratio_to_galore'] <= 1.0)}
    if challengers:
      out['one_of_frugal_fira_osd_closer_than_galore'] = {
          'galore_ratio': ratio, 'methods': challengers,
          'met': any(c['closer_than_galore'] for c in challengers.values())}
  return out


def markdown(result: dict[str, Any]) -> str:
  s = result['setup']
  m = s['model']
  lines = [
      "# Quality: final validation loss relative to AdamW",
      '',
      f"{result['date']}, {result['machine']}, backend {result['backend']}, "
      f"jax {result['versions']['jax']}, optax {result['versions']['optax']}.",
      '',
      f"Model: byte-level LLaMA, dim {m['dim']}, {m['layers']} layers, "
      f"{m['heads']} heads, ffn {m['ffn_dim']} ({s['params']:,} params). "
      f"{s['steps']} steps of {s['batch_size']} x {s['seq_len']} bytes "
      f"({s['tokens']:,} tokens), validation on {s['eval_tokens']:,} bytes. "
      f"AdamW peak lr {s['adamw_lr']:g}, refresh every {s['refresh']}, "
      f"seeds {s['seeds']}, lr multipliers {s['lr_multipliers']}. "
      f"State budget: {s['state_budget']} = {s['state_budget_bytes']:,} bytes.",
      '',
      f"Command: `{result['command']}`",
      '',
      '| method | rank | lr | lr / AdamW | val loss | val loss / AdamW | '
      'state bytes | state / AdamW | state / GaLore |',
      '| --- | --- | --- | --- | --- | --- | --- | --- | --- |',
  ]
  for r in result['rows']:
    fmt = lambda v, f: '-' if v is None else format(v, f)
    lines.append(
        f"| {r['method']} | {fmt(r['rank'], 'g')} | {r['learning_rate']:.3g} "
        f"| {r['lr_ratio_to_adamw']:g} | {fmt(r['val_loss'], '.4f')} "
        f"| {fmt(r['val_loss_ratio_to_adamw'], '.4f')} "
        f"| {r['opt_state_bytes']:,} | {r['state_ratio_to_adamw']:.3f} "
        f"| {fmt(r['state_ratio_to_galore'], '.3f')} |")
  sweeps = [r for r in result['rows'] if r['sweep']]
  if sweeps:
    lines += ['', 'Learning-rate sweep (median validation loss):', '',
              '| method | ' + ' | '.join(
                  f"x{s['lr_multiplier']:g}" for s in sweeps[0]['sweep']) + ' |',
              '| --- |' + ' --- |' * len(sweeps[0]['sweep'])]
    for r in sweeps:
      lines.append(f"| {r['method']} | " + ' | '.join(
          '-' if s['median_val_loss'] is None
          else f"{s['median_val_loss']:.4f}" for s in r['sweep']) + ' |')
  lines += ['', 'Bars:', '']
  for name, bar in result['bars'].items():
    lines.append(f"- {name}: {'met' if bar['met'] else 'NOT met'} "
                 f"({json.dumps({k: v for k, v in bar.items() if k != 'met'})})")
  lines += ['', f"Total: {result['cpu_seconds']:.0f} s CPU, "
            f"{result['wall_seconds']:.0f} s wall."]
  return '\n'.join(lines) + '\n'


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(
      prog='python -m benchmarks.quality', description=__doc__.split('\n')[0],
      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  p.add_argument('--methods', default=None,
                 help=f'comma-separated names of benchmarks.methods '
                 f'(default: {", ".join(METHODS)}; adamw is always run)')
  p.add_argument('--model', default='tiny', choices=sorted(model_lib.PRESETS))
  p.add_argument('--steps', type=int, default=None, help='default 300')
  p.add_argument('--batch-size', type=int, default=8)
  p.add_argument('--seq-len', type=int, default=64)
  p.add_argument('--eval-batches', type=int, default=64)
  p.add_argument('--refresh', '--refresh-every', type=int, default=100)
  p.add_argument('--adamw-lr', type=float, default=3e-3,
                 help='AdamW peak lr; other methods use LR_RATIO times it')
  p.add_argument('--max-bytes', type=int, default=data_lib.DEFAULT_MAX_BYTES)
  p.add_argument('--seeds', default='0', help='comma-separated seeds')
  p.add_argument('--lr-multipliers', default='1',
                 help='comma-separated multipliers of every lr (a sweep), e.g. '
                 '1/3,1,3')
  p.add_argument('--quick', action='store_true',
                 help='smoke test: a 2-layer dim-32 model, 10 steps, '
                 f'methods {",".join(QUICK_METHODS)}')
  p.add_argument('--out', default=None,
                 help=f'JSON output (the default run writes {DEFAULT_OUT})')
  p.add_argument('--markdown', default=None,
                 help=f'markdown table (the default run writes '
                 f'{DEFAULT_MARKDOWN})')
  p.add_argument('--date', default=None, help='default: today')
  p.add_argument('--machine', default=None, help="default: '<n> CPU cores'")
  args = p.parse_args(argv)
  args.command = 'python -m benchmarks.quality' + (
      ' ' + shlex.join(argv) if argv else '')
  return args


def is_default_run(args: argparse.Namespace) -> bool:
  """True when every setting that changes the numbers has its default."""
  defaults = parse_args([])
  ignored = ('out', 'markdown', 'date', 'machine', 'command')
  return all(getattr(args, k) == getattr(defaults, k)
             for k in vars(defaults) if k not in ignored)


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
  argv = list(sys.argv[1:] if argv is None else argv)
  args = parse_args(argv)
  result = run(args)
  text = json.dumps(result, indent=2)
  print(text)
  out, table = args.out, args.markdown
  if is_default_run(args):
    out, table = out or DEFAULT_OUT, table or DEFAULT_MARKDOWN
  for path, render in ((out, lambda: text + '\n'),
                       (table, lambda: markdown(result))):
    if path:  # the JSON first: a rendering error never loses a run
      pathlib.Path(path).parent.mkdir(parents=True, exist_ok=True)
      pathlib.Path(path).write_text(render())
  return result


if __name__ == '__main__':
  main()
