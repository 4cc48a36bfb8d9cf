"""Quality drift: every method's validation loss over AdamW's, against a baseline.

Runs every row of the benchmarks' method table (``benchmarks/methods.py``) on a
short run of the quality benchmark's small LM (``benchmarks/quality.py``: the
byte-level LLaMA, dim 128, 4 layers, on the CPython sources), computes each
method's validation-loss ratio to AdamW's in the same run (per seed: same
initial weights and batches), and compares the mean over seeds with the
committed baseline ``benchmarks/results/quality_drift_baseline_cpu.json``::

  python -m benchmarks.quality_drift        # check (about 25 min CPU, 2 cores)
  python -m benchmarks.quality_drift --methods galore,fira   # some rows only
  python -m benchmarks.quality_drift --update-baseline  # accept the new numbers
  python -m benchmarks.quality_drift --from-results run.json  # re-check a run

A method drifts when ``|ratio - baseline| > tolerance``, with, per method,

  tolerance = max(FLOOR, K * sqrt(2 / n) * max(std_method, std_pooled))

where ``std_method`` is the across-seed standard deviation of the method's
ratio in the baseline, ``std_pooled`` the root-mean-square of those over all
methods (a method whose few seeds happened to agree still gets the typical
seed noise) and ``n`` the number of seeds (``sqrt(2 / n)`` std: the seed noise
of the difference of two means over ``n`` seeds). The run exits 1 with a table of the offenders when a method
drifts or stops being finite, 2 when the run cannot be compared (a different
set-up, or a method without a baseline: add it with ``--update-baseline``),
else 0. It is a release check, not a unit test: the numbers are those of this
CPU set-up, and only a run with the baseline's set-up is compared.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import pathlib
import platform
import shlex
import statistics
import subprocess
import sys
import time
from typing import Any, Optional, Sequence

import jax
import optax

from benchmarks import methods as lm_optimizers
from benchmarks import quality
from examples.lm import data as data_lib
from examples.lm import model as model_lib

DEFAULT_BASELINE = 'benchmarks/results/quality_drift_baseline_cpu.json'
BASELINE_METHOD = 'adamw'
# Tolerance: K standard deviations of the seed noise of the drift, at least
# FLOOR. The means over n seeds of a run and of the baseline differ by
# sqrt(2/n) per-seed std from seed noise alone (1 std at n = 2), so K = 4 flags
# a method by chance with probability ~1e-4 per method (Gaussian), ~0.3 % over
# the whole table; FLOOR keeps a method whose seeds all agree from failing on
# the last digit.
K = 4.0
FLOOR = 0.005
# Keys of the set-up that must match the baseline's for the ratios to compare.
SETUP_KEYS = ('model', 'steps', 'batch_size', 'seq_len', 'eval_batches',
              'refresh', 'adamw_lr', 'seeds', 'max_bytes', 'corpus_fingerprint')


def all_methods() -> list[str]:
  """Every row of the table, AdamW first."""
  return [BASELINE_METHOD] + [n for n in lm_optimizers.REGISTRY
                              if n != BASELINE_METHOD]


def make_setup(args) -> quality.Setup:
  if args.tiny:  # the test's configuration: seconds, meaningless numbers
    config = model_lib.Config(dim=32, layers=2, heads=2, ffn_dim=64,
                              max_seq_len=32)
    return quality.Setup(config, steps=args.steps or 6, batch_size=4,
                         seq_len=32, eval_batches=2, refresh=3,
                         adamw_lr=args.adamw_lr, max_bytes=200_000)
  config = model_lib.config_from_preset(args.model, scan_layers=False)
  return quality.Setup(config, steps=args.steps or 100,
                       batch_size=args.batch_size, seq_len=args.seq_len,
                       eval_batches=args.eval_batches, refresh=args.refresh,
                       adamw_lr=args.adamw_lr, max_bytes=args.max_bytes)


def _git_commit() -> Optional[str]:
  root = pathlib.Path(__file__).resolve().parents[1]
  try:
    commit = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], cwd=root,
                            capture_output=True, text=True, check=True,
                            timeout=10).stdout.strip()
    dirty = subprocess.run(['git', 'status', '--porcelain', '--untracked-files=no'],
                           cwd=root, capture_output=True, text=True,
                           check=True, timeout=30).stdout.strip()
  except (OSError, subprocess.SubprocessError):
    return None
  return commit + ('+dirty' if dirty else '')


def _mean_std(values: Sequence[float]) -> tuple[Optional[float], Optional[float]]:
  finite = [v for v in values if v is not None and math.isfinite(v)]
  if len(finite) < len(values) or not finite:
    return None, None
  std = statistics.stdev(finite) if len(finite) > 1 else 0.0
  return statistics.fmean(finite), std


def run(args) -> dict[str, Any]:
  """Train every method on every seed; the ratios to AdamW per seed."""
  began_wall, began_cpu = time.perf_counter(), time.process_time()
  setup = make_setup(args)
  seeds = [int(s) for s in args.seeds.split(',')]
  names = ([n.strip() for n in args.methods.split(',') if n.strip()]
           if args.methods else all_methods())
  unknown = [n for n in names if n not in lm_optimizers.REGISTRY]
  if unknown:
    raise SystemExit(f'error: unknown method(s) {unknown}; '
                     f'known: {", ".join(lm_optimizers.REGISTRY)}')
  if BASELINE_METHOD in names:
    names.remove(BASELINE_METHOD)
  names.insert(0, BASELINE_METHOD)
  corpus = data_lib.load_corpus(None, max_bytes=setup.max_bytes,
                                seq_len=setup.seq_len)
  _, params = quality.init_params(setup, seeds[0])
  ranks, budget = quality.resolve_ranks(names, setup, params)
  rows, baseline_loss = {}, {}
  for name in names:
    method = lm_optimizers.get(name)
    lr = setup.adamw_lr * method.lr_ratio
    runs = []
    for seed in seeds:
      result = quality.train(name, setup, corpus, rank=ranks[name], lr=lr,
                             seed=seed)
      if name == BASELINE_METHOD:
        baseline_loss[seed] = result['val_loss']
      ratio = result['val_loss'] / baseline_loss[seed]
      runs.append({'seed': seed, 'val_loss': result['val_loss'],
                   'ratio': ratio if math.isfinite(ratio) else None,
                   'cpu_seconds': round(result['cpu_seconds'], 1)})
      print(f'[quality_drift] {name:>30} seed={seed} '
            f'val={result["val_loss"]:.4f} ratio={ratio:.4f} '
            f'cpu={result["cpu_seconds"]:.0f}s', file=sys.stderr)
    mean, std = _mean_std([r['ratio'] for r in runs])
    rows[name] = {'rank': ranks[name], 'learning_rate': lr,
                  'ratio_mean': mean, 'ratio_std': std, 'runs': runs}
  return {
      'benchmark': 'quality_drift',
      'device': 'cpu',
      'backend': jax.default_backend(),
      'cores': os.cpu_count(),
      'date': args.date or datetime.date.today().isoformat(),
      'commit': _git_commit(),
      'command': args.command,
      'versions': {'python': platform.python_version(), 'jax': jax.__version__,
                   'optax': optax.__version__},
      'seeds': seeds,
      'steps': setup.steps,
      'setup': {
          'model': dataclasses.asdict(setup.model_config),
          'steps': setup.steps, 'batch_size': setup.batch_size,
          'seq_len': setup.seq_len, 'eval_batches': setup.eval_batches,
          'refresh': setup.refresh, 'adamw_lr': setup.adamw_lr,
          'seeds': seeds, 'max_bytes': setup.max_bytes,
          'corpus_fingerprint': corpus.fingerprint,
          'schedule': 'warmup 10% then cosine to 10% of peak',
          'clip_by_global_norm': 1.0, 'weight_decay': 0.0,
          'state_budget_bytes': budget,
      },
      'tolerance': {'k': K, 'floor': FLOOR,
                    'rule': 'max(floor, k * sqrt(2 / n_seeds) * '
                            'max(std_method, std_pooled))'},
      'rows': rows,
      'wall_seconds': round(time.perf_counter() - began_wall, 1),
      'cpu_seconds': round(time.process_time() - began_cpu, 1),
  }


def pooled_std(baseline: dict[str, Any]) -> float:
  """Root-mean-square of the baseline's across-seed stds (AdamW excluded:
  its ratio is 1 by construction)."""
  stds = [r['ratio_std'] for n, r in baseline['rows'].items()
          if n != BASELINE_METHOD and r.get('ratio_std') is not None]
  return math.sqrt(statistics.fmean(s * s for s in stds)) if stds else 0.0


def tolerance(baseline: dict[str, Any], name: str) -> float:
  k = baseline.get('tolerance', {}).get('k', K)
  floor = baseline.get('tolerance', {}).get('floor', FLOOR)
  std = baseline['rows'][name].get('ratio_std') or 0.0
  seeds = len(baseline.get('seeds') or [0, 1])
  return max(floor, k * math.sqrt(2 / seeds) * max(std, pooled_std(baseline)))


def _comparable(result: dict[str, Any], baseline: dict[str, Any]) -> list[str]:
  """The set-up keys on which the run and the baseline differ."""
  return [k for k in SETUP_KEYS
          if json.loads(json.dumps(result['setup'].get(k)))
          != baseline['setup'].get(k)]


def compare(result: dict[str, Any], baseline: dict[str, Any]) -> dict[str, Any]:
  """Each method's drift from the baseline: rows, offenders, missing."""
  rows, offenders, missing = [], [], []
  for name, row in result['rows'].items():
    if name == BASELINE_METHOD:
      continue
    if name not in baseline['rows']:
      missing.append(name)
      continue
    base = baseline['rows'][name]
    tol = tolerance(baseline, name)
    now, then = row['ratio_mean'], base['ratio_mean']
    if now is None or then is None:
      drift, ok = None, now is None and then is None
    else:
      drift = now - then
      ok = abs(drift) <= tol
    entry = {'method': name, 'ratio': now, 'baseline': then, 'drift': drift,
             'tolerance': tol, 'ok': ok}
    rows.append(entry)
    if not ok:
      offenders.append(entry)
  return {'rows': rows, 'offenders': offenders, 'missing': missing,
          'pooled_std': pooled_std(baseline)}


def _fmt(value, spec='.4f'):
  return '-' if value is None else format(value, spec)


def table(entries: Sequence[dict[str, Any]]) -> str:
  lines = ['| method | ratio | baseline | drift | tolerance | |',
           '| --- | --- | --- | --- | --- | --- |']
  for e in entries:
    lines.append(f"| {e['method']} | {_fmt(e['ratio'])} | "
                 f"{_fmt(e['baseline'])} | {_fmt(e['drift'], '+.4f')} | "
                 f"{e['tolerance']:.4f} | {'ok' if e['ok'] else 'DRIFT'} |")
  return '\n'.join(lines)


def update_baseline(result: dict[str, Any], path: pathlib.Path) -> None:
  """Write ``result`` as the baseline; a run of some methods only replaces
  their rows when the set-up is the baseline's (else the whole file)."""
  if path.exists():
    old = json.loads(path.read_text())
    if not _comparable(result, old):
      merged = dict(result, rows={**old['rows'], **result['rows']})
      merged['commands'] = sorted(set(old.get('commands', [old['command']])
                                      + [result['command']]))
      result = merged
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(result, indent=2) + '\n')


def check(result: dict[str, Any], baseline_path: pathlib.Path) -> int:
  """Print the comparison; the exit status (0 ok, 1 drift, 2 not comparable)."""
  if not baseline_path.exists():
    print(f'No baseline at {baseline_path}; create it with --update-baseline.')
    return 2
  baseline = json.loads(baseline_path.read_text())
  differ = _comparable(result, baseline)
  if differ:
    print(f'The run cannot be compared with {baseline_path}: its set-up '
          f'differs in {differ}. Re-run with the baseline\'s flags '
          f"({baseline['command']}), or --update-baseline.")
    return 2
  report = compare(result, baseline)
  print(f'Quality drift against {baseline_path} (baseline commit '
        f"{baseline.get('commit')}, {baseline.get('date')}; pooled seed std "
        f"{report['pooled_std']:.4f}):\n")
  print(table(report['rows']))
  status = 0
  if report['offenders']:
    print(f"\n{len(report['offenders'])} method(s) drifted beyond seed noise:\n")
    print(table(report['offenders']))
    status = 1
  if report['missing']:
    print(f"\nNo baseline for {report['missing']}: add it with "
          '--update-baseline (after checking the numbers).')
    status = status or 2
  return status


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(
      prog='python -m benchmarks.quality_drift',
      description=__doc__.split('\n')[0],
      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  p.add_argument('--methods', default=None,
                 help='comma-separated rows of benchmarks/methods.py (default: '
                 'all; adamw is always run)')
  p.add_argument('--seeds', default='0,1', help='comma-separated seeds')
  p.add_argument('--model', default='tiny', choices=sorted(model_lib.PRESETS))
  p.add_argument('--steps', type=int, default=None, help='default 100')
  p.add_argument('--batch-size', type=int, default=8)
  p.add_argument('--seq-len', type=int, default=64)
  p.add_argument('--eval-batches', type=int, default=32)
  p.add_argument('--refresh', type=int, default=25)
  p.add_argument('--adamw-lr', type=float, default=3e-3)
  p.add_argument('--max-bytes', type=int, default=data_lib.DEFAULT_MAX_BYTES)
  p.add_argument('--tiny', action='store_true',
                 help='a 2-layer dim-32 model, 6 steps (tests only)')
  p.add_argument('--baseline', default=DEFAULT_BASELINE,
                 help='baseline JSON to compare with (or to write)')
  p.add_argument('--update-baseline', action='store_true',
                 help='write this run as the baseline (a run of some methods '
                 'replaces only their rows) instead of comparing')
  p.add_argument('--out', default=None, help='also write the run JSON here')
  p.add_argument('--from-results', default=None, metavar='RUN_JSON',
                 help='compare (or --update-baseline with) a previous run\'s '
                 '--out JSON instead of training')
  p.add_argument('--date', default=None, help='default: today')
  args = p.parse_args(argv)
  args.command = 'python -m benchmarks.quality_drift' + (
      ' ' + shlex.join(argv) if argv else '')
  return args


def main(argv: Optional[Sequence[str]] = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  args = parse_args(argv)
  if args.from_results:
    result = json.loads(pathlib.Path(args.from_results).read_text())
  else:
    result = run(args)
  if args.out:
    pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(args.out).write_text(json.dumps(result, indent=2) + '\n')
  baseline = pathlib.Path(args.baseline)
  if args.update_baseline:
    update_baseline(result, baseline)
    print(f'Baseline written: {baseline} ({len(result["rows"])} methods, '
          f"seeds {result['seeds']}, {result['steps']} steps).")
    return 0
  return check(result, baseline)


if __name__ == '__main__':
  sys.exit(main())
