"""Continual-learning benchmark: naive, L2, EWC, GPM and sculpt on digits.

Runs ``examples/continual.py`` (a flax NNX MLP on scikit-learn's bundled
digits, same seeds, data order and initial weights for every method) and
checks the issue's bar on the default task sequence (5 permuted-digit tasks):

* sculpt's backward transfer >= -2 percentage points,
* naive fine-tuning's backward transfer clearly worse (<= -10 pp),
* sculpt's average accuracy >= every baseline's.

Every number is on the test split; hyper-parameters come from
``examples/continual.py``'s ``DEFAULTS``, chosen per method on the validation
split by ``--tune`` (a small grid, the same learning-rate values for every
method; the criterion is validation average accuracy)::

  python -m benchmarks.continual                     # writes results/continual_cpu.*
  python -m benchmarks.continual --tune              # validation grid -> JSON
  python -m benchmarks.continual --tasks split --out /tmp/split.json
  python -m benchmarks.continual --seeds 0,1,2       # mean over seeds

Output: one JSON object on stdout, also written to ``--out`` (default
``benchmarks/results/continual_cpu.json``) with a heatmap next to it (``.png``).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import itertools
import json
import pathlib
import platform
import sys
import time
from typing import Any, Optional, Sequence

import jax
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS = ROOT / 'benchmarks' / 'results'


def _example():
  spec = importlib.util.spec_from_file_location(
      'continual_example', ROOT / 'examples' / 'continual.py')
  module = importlib.util.module_from_spec(spec)
  sys.modules['continual_example'] = module
  spec.loader.exec_module(module)
  return module


GRID = {
    'naive': {'learning_rate': [1e-3, 3e-3]},
    'l2': {'learning_rate': [1e-3, 3e-3], 'strength': [1e-3, 1e-2, 1e-1, 1.0]},
    # Wide: the empirical Fisher of a well-fit task is tiny (~1e-10 on split).
    'ewc': {'learning_rate': [1e-3, 3e-3],
            'strength': [1.0, 10.0, 100.0, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8]},
    'gpm': {'learning_rate': [1e-3, 3e-3], 'threshold': [0.9, 0.95, 0.97, 0.99]},
    'sculpt': {'learning_rate': [1e-3, 3e-3], 'max_fraction': [0.3, 0.5, 0.8],
               'min_fraction': [0.1], 'weight_decay': [0.0, 0.1]},
}


# GPM is also tuned with its paper's optimizer, plain SGD (larger rates).
GRID_EXTRA = {
    'gpm': {'optimizer': ['sgd'], 'learning_rate': [0.03, 0.1, 0.3],
            'threshold': [0.9, 0.95, 0.97, 0.99]},
}


def _grid(method: str):
  for grid in (GRID[method], GRID_EXTRA.get(method)):
    if grid is None:
      continue
    keys = list(grid)
    for values in itertools.product(*(grid[k] for k in keys)):
      yield dict(zip(keys, values))


def tune(example, config, methods, previous=None) -> dict[str, Any]:
  """Validation grid per method; returns every run and the best per method.

  Grid points already in ``previous`` (runs of an earlier call with the same
  config) are reused, not rerun.
  """
  tasks = example.load_tasks(config)
  runs, best = {}, {}
  for method in methods:
    runs[method] = []
    done = {json.dumps(r['hyper'], sort_keys=True): r
            for r in (previous or {}).get(method, [])}
    for hyper in _grid(method):
      if json.dumps(hyper, sort_keys=True) in done:
        runs[method].append(done[json.dumps(hyper, sort_keys=True)])
        continue
      result = example.run_method(method, hyper, tasks, config)
      runs[method].append({'hyper': hyper, 'val': result['val_summary']})
      print(method, hyper, {k: round(v, 4) for k, v in
                            result['val_summary'].items()}, file=sys.stderr,
            flush=True)
    best[method] = max(runs[method],
                       key=lambda r: r['val']['average_accuracy'])['hyper']
  return {'criterion': 'validation average accuracy', 'runs': runs,
          'best': best}


def diagnose(example, config) -> dict[str, Any]:
  """How much of the first task's input energy each memory would protect.

  After training task 0 (plain Adam, the default recipe), for the first layer
  ``W_in`` (64 x width) and its inputs ``X``: the share ``‖X U_k‖² / ‖X‖²``
  captured by ``U_k`` = the top-k left singular vectors of ``W_in`` (what
  ``sculpt_memory`` protects) and by the top-k principal directions of ``X``
  (what ``gpm_memory`` protects), for a few ``k``; a random k-dim subspace
  captures ``k / 64`` on average.
  """
  one = dataclasses.replace(config, num_tasks=1)
  tasks = example.load_tasks(one)
  params = example.run_method(
      'naive', example.DEFAULTS[config.tasks]['naive'], tasks, one,
      return_params=True)['params']
  weights = np.asarray(params['inputs']['kernel'], np.float64)
  x = np.asarray(tasks.train_x[0][:int(tasks.train_size[0])], np.float64)
  total = np.sum(x * x)
  u_weights = np.linalg.svd(weights, full_matrices=False)[0]
  u_inputs = np.linalg.svd(x, full_matrices=False)[2].T
  out = {}
  for k in (8, 16, 32, 51):
    out[f'k={k}'] = {
        'weights_svd': float(np.sum((x @ u_weights[:, :k]) ** 2) / total),
        'input_pca': float(np.sum((x @ u_inputs[:, :k]) ** 2) / total),
        'random': k / 64,
    }
  return {'first_layer_input_energy_captured': out}


def check_bar(summaries: dict[str, dict[str, float]]) -> dict[str, Any]:
  sculpt, naive = summaries['sculpt'], summaries['naive']
  others = {k: v['average_accuracy'] for k, v in summaries.items()
            if k != 'sculpt'}
  checks = {
      'sculpt_backward_transfer_ge_minus_2pp':
          sculpt['backward_transfer'] >= -0.02,
      'naive_backward_transfer_le_minus_10pp':
          naive['backward_transfer'] <= -0.10,
      'sculpt_average_accuracy_ge_every_baseline':
          all(sculpt['average_accuracy'] >= v for v in others.values()),
  }
  return {'checks': checks, 'passed': all(checks.values()),
          'best_baseline': max(others, key=others.get)}


def _mean_summaries(reports) -> dict[str, dict[str, float]]:
  methods = reports[0]['results'].keys()
  return {m: {k: float(np.mean([r['results'][m]['test_summary'][k]
                                for r in reports]))
              for k in reports[0]['results'][m]['test_summary']}
          for m in methods}


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--tasks', choices=('permuted', 'split'),
                      default='permuted')
  parser.add_argument('--methods', default='naive,l2,ewc,gpm,sculpt')
  parser.add_argument('--seeds', default='0')
  parser.add_argument('--tune', action='store_true')
  parser.add_argument('--quick', action='store_true')
  parser.add_argument('--out', default=None)
  args = parser.parse_args(argv)
  example = _example()
  config = example.Config(tasks=args.tasks)
  if args.quick:
    config = dataclasses.replace(config, num_tasks=3, width=32, depth=1,
                                 steps_per_task=100, memory_samples=100)
  methods = [m for m in args.methods.split(',') if m]
  seeds = [int(s) for s in args.seeds.split(',')]
  environment = {'jax': jax.__version__, 'backend': jax.default_backend(),
                 'devices': len(jax.devices()), 'machine': platform.machine(),
                 'python': platform.python_version()}
  start = time.perf_counter()
  if args.tune:
    path = pathlib.Path(args.out or RESULTS / f'continual_tuning_{args.tasks}.json')
    previous = json.loads(path.read_text()) if path.exists() else {}
    if previous and previous.get('config') != dataclasses.asdict(config):
      previous = {}  # another configuration: start over
    out = tune(example, dataclasses.replace(config, seed=seeds[0]), methods,
               previous.get('runs'))
    if previous:  # tuning a subset of methods updates the file
      out['runs'] = {**previous.get('runs', {}), **out['runs']}
      out['best'] = {**previous.get('best', {}), **out['best']}
    out.update(config=dataclasses.asdict(config), environment=environment,
               seconds=time.perf_counter() - start)
  else:
    reports = [example.run(dataclasses.replace(config, seed=s), methods)
               for s in seeds]
    summaries = _mean_summaries(reports)
    out = {'config': dataclasses.asdict(config), 'seeds': seeds,
           'environment': environment, 'tasks': reports[0]['tasks'],
           'summary': summaries, 'reports': reports,
           'seconds': time.perf_counter() - start}
    if set(methods) >= {'naive', 'sculpt'}:
      out['bar'] = check_bar(summaries)
    out['diagnosis'] = diagnose(example, dataclasses.replace(config, seed=seeds[0]))
    print(example.format_report(reports[0]), file=sys.stderr)
    path = pathlib.Path(args.out or RESULTS / 'continual_cpu.json')
    example.plot(reports[0], path.with_suffix('.png'))
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(out, indent=1))
  print(json.dumps({k: v for k, v in out.items() if k not in ('reports', 'runs')},
                   indent=1))
  return out


if __name__ == '__main__':
  main()
