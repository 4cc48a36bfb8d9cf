"""bfloat16 params: float32 master weights vs stochastic vs nearest rounding.

The quality benchmark's set-up (``benchmarks/quality.py``: byte-level LLaMA,
clipping, warm-up + cosine, each method at its tuned learning rate) with
every float param stored in bfloat16 (the model still computes in float32).
Each method runs in three variants that differ only in how its float32
update reaches the bfloat16 weights:

* ``master``: ``optax.chain(method, so.master_weights())`` — a float32
  master copy (4 more bytes per parameter), the reference;
* ``stochastic``: ``optax.chain(method, so.stochastic_rounding(seed))`` —
  Q-GaLore's stochastic rounding, no copy;
* ``nearest``: the method alone; ``optax.apply_updates`` rounds to nearest.

Per variant: the median validation loss over the seeds and its spread; per
seed the gap to ``master`` (same init and batches), against the seed noise
(the spread of ``master`` over the seeds).

Usage::

  python -m benchmarks.quality_bf16 --methods adamw,galore --seeds 0,1,2 \\
      --out benchmarks/results/quality_cpu_bf16_stochastic_3seeds.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import shlex
import statistics
import sys
import time
from typing import Any, Optional, Sequence

import jax
import optax

import subspace_optax as so
from benchmarks import methods as lm_optimizers
from benchmarks import quality
from examples.lm import data as data_lib

VARIANTS = ('master', 'stochastic', 'nearest')


def last_transform(variant: str, seed: int) -> Optional[optax.GradientTransformation]:
  """What follows the method in ``variant``."""
  if variant == 'master':
    return so.master_weights()
  if variant == 'stochastic':
    return so.stochastic_rounding(seed=seed)
  if variant == 'nearest':
    return None
  raise ValueError(f'Unknown variant {variant!r}; known: {VARIANTS}.')


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
  losses = [r['val_loss'] for r in runs]
  return {'median_val_loss': statistics.median(losses),
          'min_val_loss': min(losses), 'max_val_loss': max(losses),
          'spread': max(losses) - min(losses)}


def run(args: argparse.Namespace) -> dict[str, Any]:
  began_wall, began_cpu = time.perf_counter(), time.process_time()
  setup = quality.make_setup(args)
  seeds = [int(s) for s in args.seeds.split(',')]
  names = [n.strip() for n in args.methods.split(',') if n.strip()]
  variants = [v.strip() for v in args.variants.split(',') if v.strip()]
  for v in variants:
    last_transform(v, 0)  # a named error for an unknown variant
  corpus = data_lib.load_corpus(None, max_bytes=setup.max_bytes,
                                seq_len=setup.seq_len)
  _, params = quality.init_params(setup, seeds[0])
  ranks, _ = quality.resolve_ranks(names, setup, params)
  rows = []
  for name in names:
    method = lm_optimizers.get(name)
    lr = setup.adamw_lr * method.lr_ratio
    by_variant = {}
    for variant in variants:
      runs = []
      for seed in seeds:
        result = quality.train(
            name, setup, corpus, rank=ranks[name], lr=lr, seed=seed,
            param_dtype='bfloat16', last=last_transform(variant, seed))
        result['seed'] = seed
        runs.append(result)
        print(f'[quality_bf16] {name:>10} {variant:>10} seed={seed} '
              f'val={result["val_loss"]:.4f} '
              f'cpu={result["cpu_seconds"]:.0f}s', file=sys.stderr)
      by_variant[variant] = {**summarise(runs), 'runs': runs}
    if 'master' in by_variant:
      reference = {r['seed']: r['val_loss']
                   for r in by_variant['master']['runs']}
      for variant, row in by_variant.items():
        gaps = [r['val_loss'] - reference[r['seed']] for r in row['runs']]
        row['gap_to_master_per_seed'] = gaps
        row['median_gap_to_master'] = statistics.median(gaps)
      noise = by_variant['master']['spread']
      for row in by_variant.values():
        row['within_seed_noise'] = abs(row['median_gap_to_master']) <= noise
    rows.append({'method': name, 'rank': ranks[name], 'learning_rate': lr,
                 'variants': by_variant})
  return {
      'benchmark': 'quality_bf16',
      'date': args.date or datetime.date.today().isoformat(),
      'machine': args.machine or f'{os.cpu_count()} CPU cores',
      'command': args.command,
      'versions': {'python': platform.python_version(), 'jax': jax.__version__,
                   'optax': optax.__version__},
      'backend': jax.default_backend(),
      'setup': {
          'model': quality.dataclasses.asdict(setup.model_config),
          'param_dtype': 'bfloat16', 'steps': setup.steps,
          'batch_size': setup.batch_size, 'seq_len': setup.seq_len,
          'eval_batches': setup.eval_batches, 'refresh': setup.refresh,
          'adamw_lr': setup.adamw_lr, 'seeds': seeds, 'variants': variants,
          'seed_noise': 'spread (max - min) of the master variant over the '
                        'seeds',
      },
      'rows': rows,
      'wall_seconds': time.perf_counter() - began_wall,
      'cpu_seconds': time.process_time() - began_cpu,
  }


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(
      prog='python -m benchmarks.quality_bf16',
      description=__doc__.split('\n')[0],
      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  p.add_argument('--methods', default='adamw,galore',
                 help='comma-separated names of benchmarks.methods')
  p.add_argument('--variants', default=','.join(VARIANTS),
                 help=f'comma-separated, among {", ".join(VARIANTS)}')
  p.add_argument('--model', default='tiny')
  p.add_argument('--steps', type=int, default=None, help='default 300')
  p.add_argument('--batch-size', type=int, default=8)
  p.add_argument('--seq-len', type=int, default=64)
  p.add_argument('--eval-batches', type=int, default=64)
  p.add_argument('--refresh', type=int, default=100)
  p.add_argument('--adamw-lr', type=float, default=3e-3)
  p.add_argument('--max-bytes', type=int, default=data_lib.DEFAULT_MAX_BYTES)
  p.add_argument('--seeds', default='0,1,2', help='comma-separated seeds')
  p.add_argument('--quick', action='store_true',
                 help='smoke test: a 2-layer dim-32 model, 10 steps')
  p.add_argument('--out', default=None, help='JSON output')
  p.add_argument('--date', default=None, help='default: today')
  p.add_argument('--machine', default=None, help="default: '<n> CPU cores'")
  args = p.parse_args(argv)
  args.command = 'python -m benchmarks.quality_bf16' + (
      ' ' + shlex.join(argv) if argv else '')
  return args


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
  argv = list(sys.argv[1:] if argv is None else argv)
  args = parse_args(argv)
  result = run(args)
  text = json.dumps(result, indent=2)
  print(text)
  if args.out:
    pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(args.out).write_text(text + '\n')
  return result


if __name__ == '__main__':
  main()
