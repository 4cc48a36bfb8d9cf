"""Speed and memory benchmark: step times, optimizer-only time, state bytes.

Every method trains the byte-level LLaMA-style model of ``examples/lm`` from
the same initial weights on the same batches, then runs its optimizer alone on
fixed real gradients of that model and on standalone weight shapes (one
LLaMA-60M block at rank 128 and one LLaMA-130M block at rank 256, the GaLore
paper's settings; a CPU run does only the 60M block by default)::

  python -m benchmarks.speed_memory                     # default CPU run
  python -m benchmarks.speed_memory --quick             # smoke test
  python -m benchmarks.speed_memory --model llama_130m --batch-size 32 \\
      --refresh-every 200 --timed-steps 400 --scan-layers --skip-shapes \\
      --methods adamw,galore_randomized,galore_svd --torch-reference  # GPU
  python -m benchmarks.speed_memory --model llama_60m --batch-size 32 \\
      --refresh-every 200 --timed-steps 400 --scan-layers \\
      --shape-sets llama_130m_block --shape-layers 12 --methods all \\
      --torch-reference                                               # GPU

``--torch-reference`` adds galore-torch's ``GaLoreAdamW`` and
``torch.optim.AdamW`` (optimizer only, same shapes, rank and refresh period,
in their own process, before the JAX methods) and each method's ratio to
galore-torch.

The default run (10 methods, ``DEFAULT_METHODS``) takes 7 to 13 minutes on 2
CPU cores and writes ``benchmarks/results/speed_memory_cpu.json`` and a
markdown table next to it (``.md``); any ``--out FILE.json`` also gets its
``FILE.md``.

Reported per method (medians over the timed steps, milliseconds):

* ``train_step``: one jitted ``value_and_grad`` + ``tx.update`` +
  ``apply_updates`` with donated params and state;
* ``optimizer_only``: ``tx.update`` + ``apply_updates`` on precomputed
  gradients (a few real gradients, cycled, so bases really change);
* for both: ``steady_median_ms`` (steps where no basis changed),
  ``refresh_median_ms`` / ``refresh_max_ms`` (steps where one did, detected
  from the state, outside the timed region), ``mean_ms`` over a window of
  ``2 x refresh`` steps (refreshes amortised) and the ratios to
  ``optax.adamw`` and ``optax.contrib.galore``;
* ``state_bytes`` (``subspace_optax.state_bytes``) against AdamW's and against
  the method's analytic formula (``subspace_optax.<method>_bytes``);
* ``compiled_memory``: XLA's memory analysis of the compiled train step;
  ``peak_device_bytes``: the device allocator's peak (GPU only; each method
  then runs in its own process so the peaks do not mix);
* ``roofline`` (GPU, or with ``--hbm-bandwidth-gbs``): the optimizer must at
  least read and write its state and the params and read the gradients,
  ``2 x state_bytes + 3 x param_bytes``; that over the HBM bandwidth is the
  roofline time, and ``ratio`` is the measured optimizer-only step over it.

Output: one JSON object on stdout, also written to ``--out``.

Modules: the rows are ``benchmarks.methods.REGISTRY`` entries
(``SPEED_METHODS``); ``benchmarks/speed.py`` measures one method,
``benchmarks/harness.py`` holds the timing and memory helpers,
``benchmarks/torch_reference.py`` the galore-torch process and
``benchmarks/speed_report.py`` the ratios, goals and markdown.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import pathlib
import shlex
import subprocess
import sys
import time
from typing import Any, Optional, Sequence

# On a GPU, allocate device memory as needed rather than 75 % up front: the
# allocator's peak is then the method's own, and the galore-torch process of
# --torch-reference finds the device free.
os.environ.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

from benchmarks import harness  # pylint: disable=g-import-not-at-top,wrong-import-position
from benchmarks import quality  # pylint: disable=g-import-not-at-top,wrong-import-position
from benchmarks import speed  # pylint: disable=g-import-not-at-top,wrong-import-position
from benchmarks import speed_report  # pylint: disable=g-import-not-at-top,wrong-import-position
from benchmarks import torch_reference  # pylint: disable=g-import-not-at-top,wrong-import-position
from examples.lm import data as data_lib  # pylint: disable=g-import-not-at-top,wrong-import-position
from examples.lm import model as model_lib  # pylint: disable=g-import-not-at-top,wrong-import-position
from benchmarks import methods as lm_optimizers  # pylint: disable=g-import-not-at-top,wrong-import-position

DEFAULT_OUT = 'benchmarks/results/speed_memory_cpu.json'
BASELINE, CONTRIB = speed_report.BASELINE, speed_report.CONTRIB

# Benchmark name -> row of the one method table. The GaLore rows are named by
# their basis; then every row of the quality benchmark.
SPEED_METHODS = {
    BASELINE: 'adamw',
    CONTRIB: 'optax_galore',
    'galore_svd': 'galore',
    'galore_svd_no_stagger': 'galore_no_stagger',
    'galore_randomized': 'galore_randomized',
    'galore_randomized_no_stagger': 'galore_randomized_no_stagger',
    **{name: name for name in quality.QUALITY_METHODS
       if name not in (BASELINE, CONTRIB, 'galore')},
}


def methods() -> dict[str, lm_optimizers.Method]:
  """Every method benchmarked, in order (a missing row is a KeyError)."""
  return {name: lm_optimizers.get(row) for name, row in SPEED_METHODS.items()}


QUICK_METHODS = (BASELINE, CONTRIB, 'galore_svd', 'galore_randomized')
# The default run (about 10 minutes on 2 CPU cores); ``--methods all`` runs
# every method of methods().
DEFAULT_METHODS = (BASELINE, CONTRIB, 'galore_svd', 'galore_svd_no_stagger',
                   'galore_randomized', 'galore_randomized_no_stagger',
                   'online_subspace_descent', 'fira', 'apollo', 'q_galore')


def _isolate(args) -> bool:
  if args.isolate == 'auto':
    return jax.default_backend() == 'gpu'
  return args.isolate == 'yes'


def _one_in_subprocess(name: str, argv: Sequence[str]) -> dict[str, Any]:
  """Run one method in a fresh process (clean device peak memory)."""
  command = [sys.executable, '-m', 'benchmarks.speed_memory', *argv,
             '--methods', name, '--isolate', 'no', '--raw']
  done = subprocess.run(command, capture_output=True, text=True, check=False,
                        cwd=pathlib.Path(__file__).resolve().parents[1])
  if done.returncode != 0:
    return {'model': {'error': done.stderr[-2000:]}, 'shapes': {}}
  return json.loads(done.stdout)


def _safely(fn, *args) -> dict[str, Any]:
  try:
    return fn(*args)
  except Exception as error:  # pylint: disable=broad-except
    return {'error': f'{type(error).__name__}: {error}'[:2000]}


def run(args, argv: Sequence[str]) -> dict[str, Any]:
  began_wall, began_cpu = time.perf_counter(), time.process_time()
  load_at_start = harness.load_average()
  setup = speed.make_setup(args)
  table = methods()
  if args.methods == 'all':
    names = list(table)
  elif args.methods:
    names = [n.strip() for n in args.methods.split(',') if n.strip()]
    unknown = [n for n in names if n not in table]
    if unknown:
      raise SystemExit(f'error: unknown method(s) {unknown}; known: '
                       f'{", ".join(table)}')
  else:
    names = list(QUICK_METHODS if args.quick else DEFAULT_METHODS)
  bandwidth = harness.hbm_bandwidth(args.hbm_bandwidth_gbs)
  corpus = data_lib.load_corpus(None, max_bytes=setup.max_bytes,
                                seq_len=setup.seq_len)

  # The model's parameters: their count, and their shapes for galore-torch.
  model_params = None if args.raw else quality.init_params(
      speed.quality_setup(setup), 0)[1]
  reference = None
  if args.torch_reference and not args.raw:
    print('[speed_memory] galore-torch', file=sys.stderr, flush=True)
    reference = torch_reference.run(setup, model_params, args.torch_timeout,
                                    not args.skip_shapes)
    if args.out:
      pathlib.Path(args.out).with_suffix('.torch.json').write_text(
          json.dumps(reference))

  model_rows, shape_rows = {}, {s: {} for s in setup.shape_sets}
  isolate = _isolate(args) and not args.raw
  passthrough = [a for a in argv if a not in ('--raw',)]
  passthrough = _drop_option(passthrough, '--methods')
  passthrough = _drop_option(passthrough, '--isolate')
  passthrough = _drop_option(passthrough, '--out')
  for name in names:
    print(f'[speed_memory] {name} at {time.perf_counter() - began_wall:.0f} s',
          file=sys.stderr, flush=True)
    if args.out and not args.raw:  # what is done so far, if the run is cut off
      pathlib.Path(args.out).with_suffix('.partial.json').write_text(
          json.dumps({'model': model_rows, 'shapes': shape_rows}))
    if isolate:
      one = _one_in_subprocess(name, passthrough)
      model_rows[name] = one['model'].get(name, one['model'])
      for s, rows in one.get('shapes', {}).items():
        if rows:  # empty with --skip-shapes
          shape_rows.setdefault(s, {})[name] = rows.get(name, rows)
      continue
    model_rows[name] = _safely(speed.run_method, name, table[name], setup,
                               corpus, bandwidth)
    if not args.skip_shapes:
      for s, row in _safely(speed.run_shapes, name, table[name], setup,
                            bandwidth).items():
        if s == 'error':
          for set_name in shape_rows:
            shape_rows[set_name][name] = {'error': row}
        else:
          shape_rows[s][name] = row
  if args.raw:
    return {'model': model_rows, 'shapes': shape_rows}

  speed_report.add_ratios(model_rows)
  for rows in shape_rows.values():
    speed_report.add_ratios(rows)
  on_gpu = jax.default_backend() == 'gpu'
  param_count = sum(int(np.prod(x.shape))
                    for x in jax.tree.leaves(model_params))
  result = {
      'benchmark': 'speed_memory',
      'date': args.date or datetime.date.today().isoformat(),
      'machine': args.machine or f'{os.cpu_count()} CPU cores',
      'command': 'python -m benchmarks.speed_memory' + (
          ' ' + shlex.join(argv) if argv else ''),
      'versions': harness.versions(),
      'backend': jax.default_backend(),
      'device_kind': jax.devices()[0].device_kind,
      'load_average': {'start': load_at_start, 'end': harness.load_average()},
      'setup': {
          'model': dataclasses.asdict(setup.model_config),
          'params': param_count, 'batch_size': setup.batch_size,
          'seq_len': setup.seq_len, 'rank': setup.rank,
          'refresh': setup.refresh,
          'warmup_steps': setup.warmup_steps, 'timed_steps': setup.timed_steps,
          'projected': 'transformer block kernels (attention, MLP)',
          'stacked_layers': setup.stacked,
          'shape_sets': {k: {'dim': v[0], 'ffn_dim': v[1], 'rank': v[2],
                             'layers': setup.shape_layers}
                         for k, v in setup.shape_sets.items()},
          'hbm_bandwidth_gbs': bandwidth,
          'isolated_processes': isolate,
          'blas_threads': args.blas_threads or 'library default',
          'corpus': corpus.description,
      },
      'model': model_rows,
      'shapes': shape_rows,
      'torch_reference': reference,
      'goals': speed_report.goals(model_rows, on_gpu),
      'wall_seconds': time.perf_counter() - began_wall,
      'cpu_seconds': time.process_time() - began_cpu,
  }
  torch_reference.add_ratios(result)
  return result


def _drop_option(argv: list[str], option: str) -> list[str]:
  out, skip = [], False
  for a in argv:
    if skip:
      skip = False
      continue
    if a == option:
      skip = True
      continue
    if a.startswith(option + '='):
      continue
    out.append(a)
  return out


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(
      prog='python -m benchmarks.speed_memory',
      description=__doc__.split('\n')[0],
      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  p.add_argument('--methods', default=None,
                 help="comma-separated names, or 'all' (see methods()); "
                 f'default: {",".join(DEFAULT_METHODS)}')
  p.add_argument('--model', default='tiny', choices=sorted(model_lib.PRESETS))
  p.add_argument('--batch-size', type=int, default=8)
  p.add_argument('--seq-len', type=int, default=None,
                 help="default: the model's max_seq_len")
  p.add_argument('--rank', type=int, default=None, help='default dim // 4')
  p.add_argument('--refresh', '--refresh-every', type=int, default=20)
  p.add_argument('--warmup-steps', type=int, default=2,
                 help='untimed steps after compilation (includes refresh 0)')
  p.add_argument('--timed-steps', type=int, default=None,
                 help='default 2 x refresh')
  p.add_argument('--shape-layers', type=int, default=1,
                 help='blocks per standalone shape set')
  p.add_argument('--shape-sets', default=None,
                 help=f'comma-separated subset of {",".join(speed.SHAPE_SETS)}; '
                 f'default: all on a GPU, {",".join(speed.CPU_SHAPE_SETS)} on a CPU')
  p.add_argument('--skip-shapes', action='store_true')
  p.add_argument('--scan-layers', action='store_true',
                 help='stack the layers (one leaf per weight, batched '
                 'refreshes), in the model and the shape sets; '
                 'optax.contrib.galore refuses such params')
  p.add_argument('--hbm-bandwidth-gbs', type=float, default=None,
                 help='HBM bandwidth for the roofline; default by device kind '
                 f'({harness.HBM_BANDWIDTH_GBS}), none on CPU')
  p.add_argument('--isolate', choices=('auto', 'yes', 'no'), default='auto',
                 help='one process per method (auto: on GPU, for peak memory)')
  p.add_argument('--blas-threads', type=int, default=1,
                 help='OpenBLAS threads for the CPU LAPACK calls (SVD, eigh) '
                 'via threadpoolctl; 0 leaves the library default. One thread '
                 'keeps XLA and OpenBLAS from oversubscribing the cores')
  p.add_argument('--max-bytes', type=int, default=1_000_000,
                 help='corpus bytes read')
  p.add_argument('--quick', action='store_true',
                 help='smoke test: 2-layer dim-32 model, 6 timed steps, '
                 f'methods {",".join(QUICK_METHODS)}')
  p.add_argument('--torch-reference', action='store_true',
                 help='also time galore-torch GaLoreAdamW and torch AdamW on '
                 'the same shapes (needs the reference extra), in a separate '
                 'process before the JAX methods')
  p.add_argument('--torch-timeout', type=float, default=900,
                 help='seconds allowed for the galore-torch process')
  p.add_argument('--raw', action='store_true', help=argparse.SUPPRESS)
  p.add_argument('--out', default=None,
                 help=f'JSON output (the default run writes {DEFAULT_OUT})')
  p.add_argument('--date', default=None, help='default: today')
  p.add_argument('--machine', default=None, help="default: '<n> CPU cores'")
  return p.parse_args(argv)


def is_default_run(args: argparse.Namespace) -> bool:
  defaults = parse_args([])
  ignored = ('out', 'date', 'machine', 'isolate', 'raw')
  return all(getattr(args, k) == getattr(defaults, k)
             for k in vars(defaults) if k not in ignored)


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
  argv = list(sys.argv[1:] if argv is None else argv)
  args = parse_args(argv)
  with harness.blas_threads(args.blas_threads):
    result = run(args, argv)
  text = json.dumps(result, indent=2)
  print(text)
  out = args.out
  if out is None and is_default_run(args) and not args.raw:
    out = DEFAULT_OUT
  if out:
    pathlib.Path(out).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(out).write_text(text + '\n')
    if not args.raw:
      pathlib.Path(out).with_suffix('.md').write_text(speed_report.markdown(result))
    # The progress files of run() (kept if the run is cut off) are in `out` now.
    for progress in ('.partial.json', '.torch.json'):
      pathlib.Path(out).with_suffix(progress).unlink(missing_ok=True)
  return result


if __name__ == '__main__':
  main()
