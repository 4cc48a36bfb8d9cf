"""One prepared GPU check of issue #16's speed and memory goals (< 8 min).

Per shape (LLaMA-130M as in the H100 run of benchmarks/README.md, and the
LLaMA-7B shape of ``benchmarks/peak_memory.py`` in bfloat16) and per method,
in its own process so that the device allocator's peak is the method's own:

* the train step (``value_and_grad`` + update + apply, donated), compiled
  once; its ``memory_analysis()`` peak (``argument + output + temp - alias``,
  the AOT prediction) next to ``memory_stats()['peak_bytes_in_use']`` after
  the timed steps;
* ``2 x refresh`` timed train steps: steady median, largest refresh step,
  mean (refreshes amortised), refreshes detected from the state between steps
  (``harness.basis_fingerprint``), outside the timed region;
* the optimizer alone (update + apply) on two cycled real gradients.

``llama_60m_unstacked`` has one leaf per layer, as ``optax.contrib.galore``
needs (its row runs only there): each unstacked leaf's refresh has its own
conditional, so XLA may free its gradient once the leaf is updated, and a GPU
waits on the host for each conditional's predicate; this case measures what
those waits cost beside ``optax.contrib.galore``, which has the same
structure.

Goals checked against ``optax.adamw`` in the same run (``goals`` in the JSON):
optimizer-only steady step <= 1.0x AdamW's; train step mean <= 1.02x; largest
refresh train step <= 2x the method's steady train step.

  python -m benchmarks.gpu_check                    # on the GPU
  python -m benchmarks.gpu_check --cases llama_60m_unstacked
  python -m benchmarks.gpu_check --smoke            # CPU, tiny, seconds
  python -m benchmarks.gpu_check --per-layer        # 1B and 7B per-layer peaks
  python -m benchmarks.gpu_check --per-layer --smoke

``--per-layer`` (issue #25): the per-layer train step
(``subspace_optax.per_layer_train_step``, bfloat16 params, batch 16 x 256) of
LLaMA-1B and 7B, and the whole-tree step of 7B, per method, three real steps;
the device's ``peak_bytes_in_use`` next to the AOT figure (the H100 compile's
table is ``benchmarks/results/per_layer_memory_h100_aot.json``).

Writes ``benchmarks/results/gpu_check_<device>_<date>.json`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import pathlib
import subprocess
import sys
import time
from typing import Any, Optional, Sequence

os.environ.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np
import optax
from flax import nnx

import subspace_optax as so
from benchmarks import peak_memory
from benchmarks import per_layer_memory
from benchmarks import harness
from benchmarks import step_times
from examples.lm import model as model_lib
from benchmarks import methods as lm_optimizers


@dataclasses.dataclass(frozen=True)
class Case:
  shape: peak_memory.Shape
  vocab_size: int
  param_dtype: str
  refresh: int
  per_layer: bool = True  # --per-layer cases: the per-layer or whole-tree step
  stacked: bool = True  # False: one leaf per layer (optax.contrib.galore's)


CASES = {
    'llama_130m': Case(peak_memory.Shape(768, 12, 12, 2048, 32, 256), 256,
                       'float32', 50),
    'llama_7b_bf16': Case(peak_memory.SHAPES['llama_7b'],
                          peak_memory.VOCAB_SIZE, 'bfloat16', 10),
    # One leaf per layer (56 projected matrices), beside optax.contrib.galore:
    # each leaf's refresh has its own conditional (a host sync per leaf on a
    # GPU), which frees each gradient once its leaf is updated.
    'llama_60m_unstacked': Case(peak_memory.Shape(512, 8, 8, 1376, 32, 256),
                                256, 'float32', 50, stacked=False),
}
DEFAULT_CASES = ('llama_130m', 'llama_7b_bf16')
SMOKE_CASES = {'smoke': Case(peak_memory.SMOKE_SHAPES['smoke'], 256,
                             'float32', 3),
               'smoke_unstacked': Case(peak_memory.SMOKE_SHAPES['smoke'], 256,
                                       'float32', 3, stacked=False)}
METHODS = ('adamw', 'galore_randomized', 'optax_galore')
PER_LAYER_CASES = {
    'llama_1b_per_layer': Case(per_layer_memory.SHAPES['llama_1b_b16x256'],
                               peak_memory.VOCAB_SIZE, 'bfloat16', 200),
    'llama_7b_per_layer': Case(per_layer_memory.SHAPES['llama_7b_b16x256'],
                               peak_memory.VOCAB_SIZE, 'bfloat16', 200),
    # The whole-tree step at 7B: GPU lowerings vectorise the unprojection so
    # that QN fuses with p + u (AOT for an H100: 8-bit GaLore 36.6 GB).
    'llama_7b_whole_tree': Case(per_layer_memory.SHAPES['llama_7b_b16x256'],
                                peak_memory.VOCAB_SIZE, 'bfloat16', 200,
                                per_layer=False),
}
PER_LAYER_SMOKE_CASES = {
    'smoke_per_layer': Case(per_layer_memory.SMOKE_SHAPES['smoke'], 256,
                            'bfloat16', 3),
    'smoke_whole_tree': Case(per_layer_memory.SMOKE_SHAPES['smoke'], 256,
                             'bfloat16', 3, per_layer=False)}
PER_LAYER_METHODS = ('adamw', 'galore_svd_8bit', 'galore_randomized_8bit',
                     'apollo_mini')
BOUNDS = {'optimizer_steady_vs_adamw': 1.0, 'train_mean_vs_adamw': 1.02,
          'refresh_max_vs_own_steady': 2.0}


def build(name: str, case: Case) -> optax.GradientTransformation:
  """The method of ``peak_memory.METHODS``; galore gets the case's refresh
  period, the others keep their defaults (so their refreshes are not timed)."""
  if name != 'galore_randomized':
    return peak_memory.METHODS[name].build(case.shape.rank, 0)
  return so.galore(peak_memory.LEARNING_RATE, rank=case.shape.rank,
                   refresh=case.refresh, basis='randomized',
                   dimension_numbers=lm_optimizers.block_matrices)


def _timed(step, carry, args_at, steps, state_of):
  times, refreshed = [], []
  previous = np.asarray(harness.basis_fingerprint(state_of(carry)))
  for i in range(steps):
    args = args_at(i)
    start = time.perf_counter()
    carry = jax.block_until_ready(step(*carry, *args))
    times.append(1e3 * (time.perf_counter() - start))
    current = np.asarray(harness.basis_fingerprint(state_of(carry)))
    refreshed.append(bool(np.any(current != previous)))
    previous = current
  return times, refreshed, carry


def one(name: str, case_name: str, case: Case) -> dict[str, Any]:
  """Compile, time and measure one method on one case (own process)."""
  config = peak_memory.model_config(case.shape, case.stacked,
                                    case.vocab_size)
  graphdef, _ = peak_memory.abstract_params(config, case.param_dtype)

  @jax.jit
  def init():  # jitted, so only the cast params are ever allocated
    state = nnx.split(model_lib.Llama(config, rngs=nnx.Rngs(0)))[1]
    return jax.tree.map(lambda x: x.astype(case.param_dtype),
                        nnx.as_pure(state))

  params = init()
  tx = build(name, case)
  opt_state = jax.jit(tx.init)(params)
  shape = case.shape
  keys = jax.random.split(jax.random.key(0), 4)
  batches = [jax.random.randint(k, (shape.batch_size, shape.seq_len + 1), 0,
                                case.vocab_size) for k in keys]
  args_at = lambda i: (batches[i % 4][:, :-1], batches[i % 4][:, 1:])
  start = time.perf_counter()
  compiled = jax.jit(peak_memory.train_step(graphdef, tx),
                     donate_argnums=(0, 1)).lower(
                         params, opt_state, *args_at(0)).compile()
  compile_seconds = time.perf_counter() - start
  predicted = peak_memory.memory_of(compiled)
  step = lambda p, s, x, y: compiled(p, s, x, y)[:2]
  carry = (params, opt_state)
  _, _, carry = _timed(step, carry, args_at, 3, lambda c: c[1])  # warm-up
  times, refreshed, carry = _timed(step, carry, args_at, 2 * case.refresh,
                                   lambda c: c[1])
  stats = jax.devices()[0].memory_stats() or {}
  peak = stats.get('peak_bytes_in_use')
  result = {
      'method': name, 'case': case_name, 'compile_seconds': compile_seconds,
      'aot_memory': predicted, 'peak_bytes_in_use': peak,
      'peak_over_aot': None if peak is None else peak / predicted['peak'],
      'train_step': step_times.summary(times, refreshed),
  }
  # Optimizer alone, on two real gradients cycled.
  params, opt_state = carry
  gradient = jax.jit(jax.grad(peak_memory.loss_function(graphdef)))
  gradients = [gradient(params, *args_at(i)) for i in range(2)]
  update = jax.jit(peak_memory.optimizer_step(tx), donate_argnums=(0, 1))
  times, refreshed, _ = _timed(
      lambda p, s, g: update(p, s, g), (params, opt_state),
      lambda i: (gradients[i % 2],), 3 + 2 * case.refresh, lambda c: c[1])
  result['optimizer_only'] = step_times.summary(times[3:], refreshed[3:])
  return result


def per_layer_one(name: str, case_name: str, case: Case) -> dict[str, Any]:
  """The per-layer (or, for ``case.per_layer=False``, whole-tree) step of one
  method: AOT peak, then three real steps and the device's peak (own
  process)."""
  config = peak_memory.model_config(case.shape, True, case.vocab_size)

  @jax.jit
  def init():  # only the cast params are ever allocated
    state = nnx.split(model_lib.Llama(config, rngs=nnx.Rngs(0)))[1]
    return jax.tree.map(lambda x: x.astype(case.param_dtype),
                        nnx.as_pure(state))

  params = init()
  tx = per_layer_memory.build(name, case.shape.rank)
  opt_state = jax.jit(tx.init)(params)
  shape = case.shape
  tokens = jax.random.randint(jax.random.key(0),
                              (shape.batch_size, shape.seq_len + 1), 0,
                              case.vocab_size)
  inputs, targets = tokens[:, :-1], tokens[:, 1:]
  start = time.perf_counter()
  step = (per_layer_memory.per_layer_step(config, tx) if case.per_layer else
          peak_memory.train_step(
              peak_memory.abstract_params(config, case.param_dtype)[0], tx))
  compiled = jax.jit(step, donate_argnums=(0, 1)).lower(
                         params, opt_state, inputs, targets).compile()
  compile_seconds = time.perf_counter() - start
  predicted = peak_memory.memory_of(compiled)
  times = []
  for _ in range(3):
    start = time.perf_counter()
    params, opt_state, loss = jax.block_until_ready(
        compiled(params, opt_state, inputs, targets))
    times.append(1e3 * (time.perf_counter() - start))
  stats = jax.devices()[0].memory_stats() or {}
  peak = stats.get('peak_bytes_in_use')
  return {'method': name, 'case': case_name, 'per_layer': case.per_layer,
          'compile_seconds': compile_seconds, 'aot_memory': predicted,
          'peak_bytes_in_use': peak,
          'peak_over_aot': None if peak is None else peak / predicted['peak'],
          'step_ms': times, 'loss': float(loss)}


def _ratio(a, b):
  return None if a is None or b is None else a / b


def goals(rows: list[dict[str, Any]]) -> dict[str, Any]:
  out = {}
  for case in {r['case'] for r in rows}:
    by_name = {r['method']: r for r in rows if r['case'] == case}
    adamw = by_name.get(peak_memory.BASELINE)
    for name, row in by_name.items():
      if name == peak_memory.BASELINE or not adamw or 'error' in row:
        continue
      train, optimizer = row['train_step'], row['optimizer_only']
      ratios = {
          'optimizer_steady_vs_adamw': _ratio(
              optimizer['steady_median_ms'] or optimizer['median_ms'],
              adamw['optimizer_only']['median_ms']),
          'train_mean_vs_adamw': _ratio(train['mean_ms'],
                                        adamw['train_step']['mean_ms']),
          'refresh_max_vs_own_steady': _ratio(
              train['refresh_max_ms'],
              train['steady_median_ms'] or train['median_ms']),
      }
      out[f'{case}/{name}'] = {
          'ratios': ratios,
          'met': {k: v is not None and v <= BOUNDS[k]
                  for k, v in ratios.items()}}
  return out


def run_all(args) -> dict[str, Any]:
  if args.per_layer:
    cases = PER_LAYER_SMOKE_CASES if args.smoke else PER_LAYER_CASES
  else:
    cases = SMOKE_CASES if args.smoke else {k: CASES[k]
                                            for k in args.cases.split(',')}
  rows = []
  for case_name, case in cases.items():
    for name in args.methods.split(','):
      if case.stacked and name == 'optax_galore':
        continue  # it refuses stacked kernels
      command = [sys.executable, '-m', 'benchmarks.gpu_check', '--one',
                 f'{name}:{case_name}'] + (['--smoke'] if args.smoke else []) + (
                     ['--per-layer'] if args.per_layer else [])
      done = subprocess.run(command, capture_output=True, text=True,
                            timeout=args.timeout, check=False)
      if done.returncode:
        rows.append({'method': name, 'case': case_name,
                     'error': done.stderr[-2000:]})
      else:
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
      print(f'{case_name} {name}: done', file=sys.stderr, flush=True)
  device = jax.devices()[0]
  return {
      'benchmark': 'gpu_check', 'device': device.device_kind,
      'platform': device.platform,
      'date': datetime.datetime.now(datetime.timezone.utc).isoformat(),
      'versions': {'jax': jax.__version__, 'optax': optax.__version__},
      'cases': {k: dataclasses.asdict(v) for k, v in cases.items()},
      'bounds': BOUNDS, 'rows': rows,
      'goals': {} if args.per_layer else goals(rows),
  }


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--smoke', action='store_true')
  parser.add_argument('--cases', default=','.join(DEFAULT_CASES),
                      help=f'comma list of {", ".join(CASES)}')
  parser.add_argument('--methods', default='',
                      help=f'default {",".join(METHODS)} (--per-layer: '
                      f'{",".join(PER_LAYER_METHODS)})')
  parser.add_argument('--timeout', type=float, default=300.0,
                      help='seconds per method and case')
  parser.add_argument('--per-layer', action='store_true',
                      help='per-layer peaks of LLaMA-1B and 7B (issue #25)')
  parser.add_argument('--one', default='', help=argparse.SUPPRESS)
  parser.add_argument('--out', default='')
  args = parser.parse_args(argv)
  if args.one:
    name, case_name = args.one.split(':')
    if args.per_layer:
      case = (PER_LAYER_SMOKE_CASES if args.smoke else PER_LAYER_CASES)[
          case_name]
      result = per_layer_one(name, case_name, case)
    else:
      case = (SMOKE_CASES if args.smoke else CASES)[case_name]
      result = one(name, case_name, case)
    print(json.dumps(result))
    return result
  args.methods = args.methods or ','.join(
      PER_LAYER_METHODS if args.per_layer else METHODS)
  result = run_all(args)
  text = json.dumps(result, indent=1)
  out = args.out or (
      'benchmarks/results/gpu_check_'
      f'{result["device"].replace(" ", "_")}_{result["date"][:10]}.json')
  pathlib.Path(out).parent.mkdir(parents=True, exist_ok=True)
  pathlib.Path(out).write_text(text + '\n')
  print(text)
  return result


if __name__ == '__main__':
  main()
