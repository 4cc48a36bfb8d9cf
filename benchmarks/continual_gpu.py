"""Continual byte-level LM on one GPU: ``examples.continual_lm``, larger.

One prepared run (< 5 minutes on one H100 or H200) of the continual
language-modelling experiment of ``examples/continual_lm.py`` at a larger
size: a byte-level LLaMA-style model (``examples/lm/model.py``) is pre-trained
on the ``python`` domain (the CPython standard library's sources), then
fine-tuned in turn on ``english``, ``c`` and ``dectest``, and evaluated after
each domain on every domain (the test loss matrix ``L[i, j]``, nats/byte).
Every method starts from the same pre-trained weights and sees the same
batches; the pre-training runs once (``continual_lm.pretrain`` is cached).
The methods are the benchmarks' table (``benchmarks/continual_methods.py``,
handed to ``continual_lm.run_method`` as ``make_method``); everything else is
``continual_lm``'s: the domains, the model, the methods' validation-chosen
hyper-parameters (``continual_lm.defaults``: ``PRETRAINED_DEFAULTS``, tuned
on the small CPU setting and not re-tuned at this size; ``--hyper``
overrides them) and the metrics.

Methods, in this order so that a budget cut (below) drops the comparisons
that matter least: the baselines ``naive``, ``l2``, ``ewc``, the recommended
configuration ``gpm_ewc``, then ``gpm``, ``sculpt``, ``sculpt_released``.

GPU configuration (``GPU_CONFIG``) and its time estimate
-------------------------------------------------------

Model: dim 256, 6 layers, 4 heads (head dim 64), SwiGLU width 688, 256-byte
vocabulary: 4,877,568 parameters (6 x 791,040 per block + 2 x 65,536
embedding and head + 256), between the ``tiny`` preset (dim 128, 4 layers,
0.86M) and ``llama_60m`` (dim 512, 8 layers, 25.6M). Batch 32 sequences of
256 bytes (8,192 bytes a step). Pre-training: 6,000 AdamW steps (49M bytes,
4.8 passes over the 10.2 MB training split of ``python``, 10 bytes per
parameter). Fine-tuning: 250 steps per domain (2.0 MB; ``english``'s
training split is 0.42 MB, so about 5 passes). ``max_bytes`` 12 MB keeps
every domain whole. Evaluation: 4 batches of 32 sequences per domain and
split. Task-boundary samples (EWC's Fisher, GPM's layer inputs, sculpt's
importance): 16 sequences, 4,096 positions.

Basis: the H100 measurements in ``benchmarks/results``. The AdamW train step
of the ``llama_60m`` shape at batch 32 x 256, layers unstacked (as
``continual_lm.network`` builds them), float32 parameters and compute:
steady median 16.99 ms, compile 17.8 s
(``speed_memory_h100_llama60m_unstacked_before_fix.{md,json}``; stacked
22.99 ms and 13.3 s, ``llama_130m`` stacked 53.0 ms). That step is
``6 N T`` + attention ``12 L s d T`` = 6 x 25.57M x 8,192 + 12 x 8 x 256 x
512 x 8,192 = 1.36 TFLOP: about 80 TFLOP/s. Here: 6 x 4.88M x 8,192 + 12 x 6
x 256 x 256 x 8,192 = 0.28 TFLOP, 3.5 ms at that rate; smaller matrices run
less efficiently, so 5 ms per AdamW step and 6 ms per fine-tuning step
averaged over the methods (EWC's penalty, GPM's ``(I - MMᵀ)`` projections,
6.6 GFLOP a step, sculpt's two-sided ones: each well under 1 ms more).

* start-up (CUDA, 17 MB of domains read and split): ~5 s;
* pre-training: compile ~15 s + 6,000 x 5 ms = 30 s: 45 s;
* fine-tuning: 7 methods x 3 domains x 250 steps x 6 ms: 32 s;
* train-step compiles, one per method: 7 x ~12 s = 84 s (below the measured
  17.8 s of a first compile: XLA's autotuning results are reused within the
  process, and every method shares the model's forward and backward pass);
* other compiles (evaluation, per-example gradients for the Fisher, layer
  inputs, block importance, the SVD and Gram–Schmidt programs per shape):
  ~30 s;
* task boundaries, 3 per method: GPM (``gpm``, ``gpm_ewc``) runs an SVD of
  each of 44 layers' inputs (``<= 688 x 4,096``) and a Gram–Schmidt of the
  new directions, ~6 s a boundary; sculpt's SVDs of 44 weights
  (``<= 256 x 688``) and its Gram–Schmidt ~2 s; the Fisher of 16 sequences
  well under 1 s: 2 x 3 x 6 + 2 x 3 x 2 + 2 = 50 s;
* evaluation: 5 x 2 splits x 4 domains x 128 sequences per method, a forward
  pass over 1.3M bytes, ~0.5 s: 4 s;
* **total ~250 s**, 50 s (17 %) below 5 minutes, with pre-training a fifth of
  it. Compiles (~130 s) and the GPU's SVDs are the least certain terms.

The ``llama_60m`` shape does not fit: at 17-20 ms a step, 7 x 3 x 200
fine-tuning steps alone take 84 s, its compiles are at least as long, and its
boundary SVDs (inputs of up to 1,376 features) cost several times more,
leaving no time to pre-train.

Time guard: ``--max-seconds`` (default 285 on the GPU configuration; 600
with ``--smoke``) bounds the wall clock from the start of ``main`` (the
imports before it, a few seconds, are not counted). Before each method the
run predicts its time as 1.25 x the longest method so far (0 for the first,
which so runs unless the budget is already spent); if the clock would pass
the budget, it skips that method and every one after it, and the JSON lists
each skipped method with the elapsed time and the prediction (``skipped``),
never silently. Pre-training always runs.

Usage (from the repository root)::

  python -m benchmarks.continual_gpu                 # on the GPU (~4 min)
  python -m benchmarks.continual_gpu --smoke         # CPU, tiny, < 90 s
  python -m benchmarks.continual_gpu --methods naive,gpm_ewc --out r.json

Prints one JSON object on stdout (progress goes to stderr). The GPU run
writes it to ``benchmarks/results/continual_gpu_<device>.json`` (or
``--out``), with a markdown table next to it (``.md``); ``--smoke`` writes a
file only with ``--out``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import pathlib
import re
import shlex
import statistics
import sys
import time
from typing import Any, Optional, Sequence

import jax
import numpy as np

from benchmarks import continual_methods
from benchmarks import harness
from benchmarks.continual_methods import BASELINES
from benchmarks.continual_methods import METHODS
from benchmarks.continual_methods import RECOMMENDED
from examples import continual_lm

GPU_CONFIG = continual_lm.Config(
    domains=continual_lm.DOMAINS, max_bytes=12_000_000, dim=256, layers=6,
    heads=4, ffn_dim=688, seq_len=256, batch_size=32, steps_per_task=250,
    eval_batches=4, memory_samples=16, pretrain_steps=6000, seed=0)
# CPU smoke run: three domains (pre-training + two fine-tuning domains, so
# two task boundaries), a one-block model, a few steps.
SMOKE_CONFIG = continual_lm.Config(
    domains=continual_lm.DOMAINS[:3], max_bytes=60_000, dim=32, layers=1,
    heads=4, ffn_dim=64, seq_len=32, batch_size=8, steps_per_task=10,
    eval_batches=1, memory_samples=8, pretrain_steps=30, seed=0)

# The baselines and the recommendation first: a budget cut drops the rest.
ORDER = (*BASELINES, RECOMMENDED) + tuple(
    m for m in METHODS if m not in BASELINES and m != RECOMMENDED)
MAX_SECONDS = 285.0
ESTIMATED_SECONDS = 250.0  # GPU_CONFIG on one H100 (module docstring)
SMOKE_MAX_SECONDS = 600.0
MARGIN = 1.25  # a method's predicted time: MARGIN x the longest so far


def _log(message: str) -> None:
  print(message, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------
# Set-up.


def config_from_args(args: argparse.Namespace) -> continual_lm.Config:
  """``GPU_CONFIG`` or ``SMOKE_CONFIG`` with the command line's overrides."""
  config = SMOKE_CONFIG if args.smoke else GPU_CONFIG
  overrides = {'seed': args.seed}
  if args.pretrain_steps is not None:
    overrides['pretrain_steps'] = args.pretrain_steps
  if args.steps is not None:
    overrides['steps_per_task'] = args.steps
  return dataclasses.replace(config, **overrides)


def parse_methods(text: str) -> list[str]:
  methods = [m for m in text.split(',') if m]
  unknown = [m for m in methods if m not in METHODS]
  if unknown or not methods:
    raise ValueError(f'Unknown methods {unknown} (or none given); choose from '
                     f'{METHODS}.')
  return methods


def parse_hyper(text: str) -> dict[str, dict[str, Any]]:
  """``--hyper``: a JSON object ``{method: hyper}``, inline or a file path."""
  if not text:
    return {}
  path = pathlib.Path(text)
  return json.loads(path.read_text() if path.is_file() else text)


def hyper_for(config: continual_lm.Config, methods: Sequence[str],
              overrides: dict[str, dict[str, Any]]
              ) -> dict[str, dict[str, Any]]:
  """Each method's hyper-parameters: ``continual_lm.defaults(config)``, a
  method's whole entry replaced by ``overrides`` (as ``continual_lm.run``).

  Raises:
    ValueError: a method has neither (checked before anything runs).
  """
  hyper = {**continual_lm.defaults(config), **overrides}
  missing = [m for m in methods if m not in hyper]
  if missing:
    raise ValueError(f'No hyper-parameters for {missing} in '
                     'continual_lm.defaults(config); pass them with --hyper.')
  return {m: hyper[m] for m in methods}


def environment() -> dict[str, Any]:
  device = jax.devices()[0]
  return {
      'device': device.device_kind, 'platform': device.platform,
      'device_count': jax.device_count(),
      'date': datetime.datetime.now(datetime.timezone.utc).isoformat(),
      'versions': harness.versions(), 'cpu_count': os.cpu_count(),
  }


def parameter_count(config: continual_lm.Config) -> int:
  return sum(int(np.size(x))
             for x in jax.tree.leaves(continual_lm.network(config).initial))


# ----------------------------------------------------------------------------
# The run.


def predicted_seconds(walls: Sequence[float]) -> float:
  """The next method's predicted wall time: ``MARGIN`` x the longest so far
  (0 before the first)."""
  return MARGIN * max(walls) if walls else 0.0


def run(config: continual_lm.Config, methods: Sequence[str],
        hyper: dict[str, dict[str, Any]], max_seconds: float,
        start: float) -> dict[str, Any]:
  """Load, pre-train once, then each method in turn within ``max_seconds``
  of ``start`` (a ``time.perf_counter()`` value)."""
  clock = lambda: time.perf_counter() - start
  tick = time.perf_counter()
  domains = continual_lm.load_domains(config)
  load_seconds = time.perf_counter() - tick
  _log(f'domains {domains.names} loaded in {load_seconds:.1f} s')

  tick = time.perf_counter()
  jax.block_until_ready(continual_lm.pretrain(config, domains))
  pretrain_seconds = time.perf_counter() - tick
  _log(f'pre-trained {config.pretrain_steps} steps on {domains.names[0]} in '
       f'{pretrain_seconds:.1f} s')

  results, walls, skipped, decisions = {}, [], [], []
  for name in methods:
    elapsed, predicted = clock(), predicted_seconds(walls)
    fits = not skipped and elapsed + predicted <= max_seconds
    decisions.append({'method': name, 'elapsed_seconds': elapsed,
                      'predicted_seconds': predicted, 'ran': fits})
    if not fits:
      skipped.append({'method': name, 'reason': 'time budget',
                      'elapsed_seconds': elapsed,
                      'predicted_seconds': predicted,
                      'max_seconds': max_seconds})
      _log(f'{name}: skipped (at {elapsed:.0f} s, predicted {predicted:.0f} s,'
           f' budget {max_seconds:.0f} s)')
      continue
    tick = time.perf_counter()
    result = continual_lm.run_method(name, hyper[name], domains, config,
                                     make_method=continual_methods.make_method)
    walls.append(time.perf_counter() - tick)
    results[name] = {**result, 'wall_seconds': walls[-1]}
    _log(f'{name}: {walls[-1]:.1f} s, test average loss '
         f'{result["test_summary"]["average_loss"]:.3f}')

  return {
      **continual_lm.report_header(config, domains),
      'methods_requested': list(methods), 'methods_run': list(results),
      'skipped': skipped,
      'budget': {'max_seconds': max_seconds, 'margin': MARGIN,
                 'decisions': decisions},
      'timings': {
          'load_seconds': load_seconds,
          'pretrain_seconds': pretrain_seconds,  # compile included
          'methods': {n: {'wall_seconds': r['wall_seconds'],
                          'train_seconds': r['seconds'],
                          'boundary_seconds': r['boundary_seconds'],
                          'median_boundary_seconds': _median(
                              r['boundary_seconds'])}
                      for n, r in results.items()},
          'total_seconds': clock(),
      },
      'results': results,
  }


def _median(values: Sequence[float]) -> Optional[float]:
  return statistics.median(values) if values else None


# ----------------------------------------------------------------------------
# Reporting.


def _slug(text: str) -> str:
  return re.sub(r'[^a-z0-9]+', '_', text.lower()).strip('_') or 'device'


def default_out(device: str) -> pathlib.Path:
  return pathlib.Path('benchmarks/results') / (
      f'continual_gpu_{_slug(device)}.json')


def _seconds(value: Optional[float]) -> str:
  return '–' if value is None else f'{value:.1f}'


def markdown(report: dict[str, Any]) -> str:
  """The summary table and the recommended method's test loss matrix."""
  config, names = report['config'], report['tasks']
  timings = report['timings']
  lines = [
      '# Continual byte-level LM on one accelerator '
      '(generated by benchmarks/continual_gpu.py)', '',
      f'* command: `{report["command"]}`',
      f'* device: {report["device"]} ({report["platform"]}); date '
      f'{report["date"]}; versions '
      + ', '.join(f'{k} {v}' for k, v in report['versions'].items()),
      f'* model: dim {config["dim"]}, {config["layers"]} layers, '
      f'{config["heads"]} heads, ffn {config["ffn_dim"]}, '
      f'{report["parameters"]:,} params; batch {config["batch_size"]} x '
      f'{config["seq_len"]} bytes',
      f'* pre-training: {config["pretrain_steps"]} steps on {names[0]} in '
      f'{timings["pretrain_seconds"]:.1f} s (compile included); fine-tuning: '
      f'{config["steps_per_task"]} steps on each of {", ".join(names[1:])}',
      f'* wall: {timings["total_seconds"]:.1f} s (budget '
      f'{report["budget"]["max_seconds"]:.0f} s); methods run: '
      f'{", ".join(report["methods_run"])}; skipped: '
      + (', '.join(s['method'] for s in report['skipped']) or 'none'),
      '',
      'Test loss in nats/byte (lower is better). "avg loss": mean of the last '
      'row; "forgetting": mean increase of the loss on earlier domains; '
      '"learned": mean loss right after learning each domain (diagonal). '
      '"seconds": the method\'s wall time, compiles included; "boundary": '
      'median seconds of a task boundary.', '',
      '| method | avg loss | forgetting | learned loss | seconds | '
      'median boundary s |',
      '|---|---|---|---|---|---|',
  ]
  for name, result in report['results'].items():
    s = result['test_summary']
    label = f'{name} (recommended)' if name == RECOMMENDED else name
    lines.append(
        f'| {label} | {s["average_loss"]:.3f} | {s["forgetting"]:+.3f} | '
        f'{s["learned_loss"]:.3f} | {result["wall_seconds"]:.1f} | '
        f'{_seconds(_median(result["boundary_seconds"]))} |')
  for skip in report['skipped']:
    lines.append(f'| {skip["method"]} | skipped ({skip["reason"]}) | | | | |')
  lines += ['', f'## {RECOMMENDED}: test loss after training (row) '
            'on each domain (column)', '']
  recommended = report['results'].get(RECOMMENDED)
  if recommended is None:
    lines.append(f'{RECOMMENDED} did not run.')
  else:
    lines += ['| after \\ on | ' + ' | '.join(names) + ' |',
              '|---' * (len(names) + 1) + '|']
    for name, row in zip(names, recommended['test']):
      lines.append(f'| {name} | ' + ' | '.join(f'{v:.3f}' for v in row)
                   + ' |')
  return '\n'.join(lines) + '\n'


# ----------------------------------------------------------------------------
# Entry point.


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--smoke', action='store_true',
                      help='CPU-sized run (SMOKE_CONFIG, seconds)')
  parser.add_argument('--methods', default=','.join(ORDER))
  parser.add_argument('--hyper', default='',
                      help='JSON {method: hyper} (inline or a file) replacing '
                      "those methods' continual_lm defaults")
  parser.add_argument('--pretrain-steps', type=int, default=None)
  parser.add_argument('--steps', type=int, default=None,
                      help='fine-tuning steps per domain')
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--max-seconds', type=float, default=None,
                      help=f'wall-clock budget (default {MAX_SECONDS:.0f}; '
                      f'{SMOKE_MAX_SECONDS:.0f} with --smoke)')
  parser.add_argument('--out', default='',
                      help='JSON path (a .md is written next to it)')
  return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
  start = time.perf_counter()
  argv = list(sys.argv[1:] if argv is None else argv)
  args = parse_args(argv)
  config = config_from_args(args)
  methods = parse_methods(args.methods)
  hyper = hyper_for(config, methods, parse_hyper(args.hyper))
  max_seconds = args.max_seconds
  if max_seconds is None:
    max_seconds = SMOKE_MAX_SECONDS if args.smoke else MAX_SECONDS
  report = {
      'benchmark': 'continual_gpu', 'smoke': args.smoke,
      'estimated_seconds': (ESTIMATED_SECONDS if config == GPU_CONFIG
                            else None),
      'command': shlex.join(['python', '-m', 'benchmarks.continual_gpu',
                             *argv]),
      **environment(), 'parameters': parameter_count(config),
      'recommended': RECOMMENDED,
      'load_average_start': harness.load_average(),
  }
  report.update(run(config, methods, hyper, max_seconds, start))
  report['peak_device_bytes'] = harness.peak_device_bytes()
  report['load_average_end'] = harness.load_average()
  text = json.dumps(report, indent=1)
  out = args.out or ('' if args.smoke else default_out(report['device']))
  if out:
    out = pathlib.Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text + '\n')
    out.with_suffix('.md').write_text(markdown(report))
    _log(f'wrote {out} and {out.with_suffix(".md")}')
  print(text)
  return report


if __name__ == '__main__':
  main()
