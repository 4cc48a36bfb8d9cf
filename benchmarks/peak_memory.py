"""Peak memory of a full train step at real LLaMA shapes, without a GPU.

The whole train step (``value_and_grad`` + ``tx.update`` +
``apply_updates``, params and optimizer state donated) is compiled ahead of
time from abstract shapes::

  jax.jit(step, donate_argnums=(0, 1)).lower(*ShapeDtypeStructs).compile()

and XLA's buffer assignment is read with ``compiled.memory_analysis()``.
Nothing is executed and no large array is allocated, so a 65B step can be
sized on a laptop. The peak of one step is

  ``peak = argument + output + temp - alias``

``argument`` holds params, optimizer state and the token batch; ``output``
the new params and state (and the loss); ``alias`` the outputs written in
place of donated arguments (params and state), so ``output - alias`` is only
the loss. ``temp`` is XLA's single temporary allocation, packed by liveness:
gradients, activations and the optimizer's own temporaries. The script checks
that ``argument`` and ``alias`` equal the tree sizes computed with
``jax.eval_shape`` (``checks`` in each row).

The split of ``temp`` comes from two more compilations of the same shapes:
the model alone (``value_and_grad``, whose ``temp`` is the activations and
whose output is the gradients) and the optimizer alone (``update`` +
``apply_updates`` on given gradients, whose ``temp`` is the optimizer's
temporaries). The optimizer-only program's ``cost_analysis()`` also feeds
``benchmarks/roofline.py``.

Model: ``examples/lm``'s LLaMA with the GaLore paper's shapes (Zhao et al.
2024, arXiv 2403.03507, Table 5 / jiaweizzhao/GaLore configs) and a 32,000
token vocabulary (the LLaMA / T5 tokenizer size) instead of the example's 256
bytes; layers stacked (``nnx.scan``, one ``(layers, m, n)`` kernel per
weight) and each block rematerialised; matmuls in bfloat16. Params are
float32 (mixed precision, as the example trains) or bfloat16 (pure bf16, as
the GaLore paper's 7B run). Rank ``dim / 4`` (the paper's 256, 512, 1024 for
350M, 1B, 7B); only the block matrices are projected.

This is XLA:CPU's buffer assignment. XLA:GPU fuses and schedules differently
(the activations part differs most); the params, gradients and state parts
are layout facts. On CPU, XLA also computes many bfloat16 element-wise ops in
float32, so the bf16 rows' temporaries are an upper bound (see the README).

  python -m benchmarks.peak_memory --methods adamw,q_galore --shapes llama_7b
  python -m benchmarks.peak_memory --smoke         # tiny shape, for tests
  python -m benchmarks.peak_memory --real-check    # run once, compare RSS

Each compilation takes seconds to a few minutes on two CPU cores (more with
``--target h100`` and with one leaf per layer); benchmarks/README.md lists
the subsets that were run and their wall times.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import pathlib
import platform
import sys
import time
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from examples.lm import model as model_lib
from benchmarks import gpu_target
from benchmarks import methods as lm_optimizers

DEFAULT_OUT = 'benchmarks/results/peak_memory_cpu_aot.json'
VOCAB_SIZE = 32_000  # LLaMA's tokenizer, not the example's 256 bytes
BASELINE = 'adamw'
REFRESH = 200  # refresh period (the step compiles its refresh branch)
LEARNING_RATE = 1e-3  # memory does not depend on it


@dataclasses.dataclass(frozen=True)
class Shape:
  """A LLaMA configuration and the per-device batch a user would run."""

  dim: int
  layers: int
  heads: int
  ffn_dim: int
  batch_size: int
  seq_len: int

  @property
  def rank(self) -> int:
    return self.dim // 4


# 350M, 1B, 7B: the GaLore paper's configs. 13B, 30B, 65B: LLaMA-1's widths
# and depths (Touvron et al. 2023, Table 2) with LLaMA's ffn = 8/3 dim rounded
# up to a multiple of 256. Per-device batch: 16 x 1024 tokens at 350M, 8 x 1024
# at 1B, 2 x 1024 from 7B on (a micro-batch; larger batches accumulate).
SHAPES = {
    'llama_350m': Shape(1024, 24, 16, 2736, 16, 1024),
    'llama_1b': Shape(2048, 24, 32, 5461, 8, 1024),
    'llama_7b': Shape(4096, 32, 32, 11008, 2, 1024),
    'llama_13b': Shape(5120, 40, 40, 13824, 2, 1024),
    'llama_30b': Shape(6656, 60, 52, 17920, 2, 1024),
    'llama_65b': Shape(8192, 80, 64, 22016, 2, 1024),
}
TABLE_SHAPES = ('llama_350m', 'llama_1b', 'llama_7b')
SMOKE_SHAPES = {'smoke': Shape(64, 2, 2, 160, 2, 32)}
SMOKE_VOCAB_SIZE = 256
PARAM_DTYPES = ('float32', 'bfloat16')

# Device memory in bytes as nvidia-smi reports it (H100 SXM 80GB: 81,559 MiB;
# H200: 143,771 MiB). XLA's allocator also needs some of it for itself.
BUDGETS = {'h100_80gb': 81_559 * 2**20, 'h200_141gb': 143_771 * 2**20}


# ----------------------------------------------------------------------------
# Methods: (rank, seed) -> transform. Defaults of each method otherwise, so a
# re-run after a default changes (e.g. q_galore's moment format) measures it.


def _from_table(name: str, **options) -> Callable[[int, int],
                                                 optax.GradientTransformation]:
  """``(rank, seed) -> transform``: row ``name`` of the shared method table
  (:mod:`benchmarks.methods`: block matrices projected, no clipping, no
  weight decay)."""
  method = lm_optimizers.get(name)
  return lambda rank, seed: method.build(
      learning_rate=LEARNING_RATE, rank=rank, refresh=REFRESH,
      weight_decay=0.0, seed=seed, **options)


@dataclasses.dataclass(frozen=True)
class Method:
  build: Callable[[int, int], optax.GradientTransformation]
  description: str
  stacked: bool = True  # False: the model is built with one leaf per layer


METHODS = {
    BASELINE: Method(_from_table('adamw'), 'optax.adamw'),
    # contrib galore cannot treat a layer axis as a batch axis: one leaf per
    # layer for this row.
    'optax_galore': Method(
        _from_table('optax_galore'),
        'optax.contrib.galore, scale 0.25 (layers unstacked)', stacked=False),
    # optax.contrib.galore's layout, for a like-for-like row beside it.
    'adamw_unstacked': Method(_from_table('adamw'),
                              'optax.adamw (layers unstacked)', stacked=False),
    'galore_randomized_unstacked': Method(
        _from_table('galore', basis='randomized'),
        'subspace_optax.galore, randomized basis, compact side (layers '
        'unstacked)', stacked=False),
    'galore_randomized': Method(
        _from_table('galore', basis='randomized'),
        'subspace_optax.galore, randomized basis, compact side'),
    'galore_svd': Method(_from_table('galore', basis='svd'),
                         'subspace_optax.galore, SVD basis, compact side'),
    'frugal': Method(_from_table('frugal'), 'subspace_optax.frugal'),
    'fira': Method(_from_table('fira'), 'subspace_optax.fira'),
    'apollo': Method(_from_table('apollo'), 'subspace_optax.apollo'),
    'apollo_mini': Method(_from_table('apollo_mini'),
                          'subspace_optax.apollo_mini (rank 1)'),
    'q_galore': Method(_from_table('q_galore'),
                       'subspace_optax.q_galore: int4 basis, lazy refresh, '
                       'float32 moments, compact side'),
    'online_subspace_descent': Method(
        _from_table('online_subspace_descent'),
        'subspace_optax.online_subspace_descent, Adam inner, compact side'),
}
SMOKE_METHODS = (BASELINE, 'galore_randomized')


# ----------------------------------------------------------------------------
# Abstract model and programs.


def model_config(shape: Shape, stacked: bool, vocab_size: int = VOCAB_SIZE):
  return model_lib.Config(
      vocab_size=vocab_size, dim=shape.dim, layers=shape.layers,
      heads=shape.heads, ffn_dim=shape.ffn_dim, max_seq_len=shape.seq_len,
      scan_layers=stacked, compute_dtype='bfloat16', remat=True)


def abstract_params(config: model_lib.Config, param_dtype: str):
  """``(graphdef, params)``: params as ``ShapeDtypeStruct``s, nothing built."""
  abstract = nnx.eval_shape(lambda: model_lib.Llama(config, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  params = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, jnp.dtype(param_dtype)),
      nnx.as_pure(state))
  return graphdef, params


def tree_bytes(tree) -> int:
  """Bytes of every array leaf (concrete or ``ShapeDtypeStruct``)."""
  return sum(int(x.size) * jnp.dtype(x.dtype).itemsize
             for x in jax.tree.leaves(tree))


def loss_function(graphdef):
  def loss_fn(params, inputs, targets):
    logits = nnx.merge(graphdef, params)(inputs)
    return model_lib.cross_entropy(logits, targets)
  return loss_fn


def train_step(graphdef, tx: optax.GradientTransformation):
  """``(params, state, inputs, targets) -> (params, state, loss)``."""
  loss_fn = loss_function(graphdef)

  def step(params, opt_state, inputs, targets):
    loss, grads = jax.value_and_grad(loss_fn)(params, inputs, targets)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return step


def optimizer_step(tx: optax.GradientTransformation):
  """``(params, state, grads) -> (params, state)``: the optimizer alone."""

  def step(params, opt_state, grads):
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  return step


# Where compile_program compiles: None for JAX's default backend, or a
# compile-only GPU device (benchmarks/gpu_target.py).
COMPILE_DEVICE: Optional[jax.Device] = None


def compile_for(target: str) -> None:
  """Compile for ``target``: ``'cpu'`` (this machine) or a GPU of
  ``gpu_target.TARGETS`` (ahead of time, on a compile-only device)."""
  global COMPILE_DEVICE  # pylint: disable=global-statement
  if target != 'cpu':
    COMPILE_DEVICE = gpu_target.compile_only_device(target)


def compiled_for() -> str:
  """What compile_program compiles for: a GPU's kind, or the backend."""
  if COMPILE_DEVICE is not None:
    return COMPILE_DEVICE.device_kind
  return jax.default_backend()


def result_header(benchmark: str, date: str,
                  argv: Optional[Sequence[str]]) -> dict[str, Any]:
  """The keys every AOT result file here starts with: what, when, where."""
  return {
      'benchmark': f'{benchmark} (AOT, XLA memory_analysis)',
      'date': date or datetime.date.today().isoformat(),
      'command': f'python -m benchmarks.{benchmark} ' + ' '.join(
          sys.argv[1:] if argv is None else argv),
      'machine': platform.processor() or platform.machine(),
      'device': str(jax.devices()[0]), 'backend': jax.default_backend(),
      'compiled_for': compiled_for(),
      'versions': {'jax': jax.__version__, 'optax': optax.__version__}}


def compile_program(fn, *args, donate=()):
  if COMPILE_DEVICE is not None:
    sharding = jax.sharding.SingleDeviceSharding(COMPILE_DEVICE)
    args = jax.tree.map(lambda x: jax.ShapeDtypeStruct(
        jnp.shape(x), x.dtype, sharding=sharding), args)
  start = time.perf_counter()
  compiled = jax.jit(fn, donate_argnums=donate).lower(*args).compile()
  return compiled, time.perf_counter() - start


def memory_of(compiled) -> dict[str, int]:
  """XLA's memory analysis and ``peak = argument + output + temp - alias``."""
  analysis = compiled.memory_analysis()
  fields = ('argument_size_in_bytes', 'output_size_in_bytes',
            'temp_size_in_bytes', 'alias_size_in_bytes')
  out = {f.removesuffix('_size_in_bytes'): int(getattr(analysis, f))
         for f in fields}
  out['peak'] = out['argument'] + out['output'] + out['temp'] - out['alias']
  return out


def cost_of(compiled) -> Optional[dict[str, float]]:
  """XLA's flop and byte counts of a compiled program (None where the
  backend has none: a compile-only GPU device)."""
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # older jax: one dict per computation
    cost = cost[0]
  if cost is None:
    return None
  return {'flops': float(cost.get('flops', 0.0)),
          'bytes_accessed': float(cost.get('bytes accessed', 0.0)),
          'transcendentals': float(cost.get('transcendentals', 0.0))}


def tokens(shape: Shape) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct((shape.batch_size, shape.seq_len), jnp.int32)


# ----------------------------------------------------------------------------
# Measurements.


class Meter:
  """Compiles and caches the programs of (method, shape, param dtype)."""

  def __init__(self, shapes: dict[str, Shape], vocab_size: int = VOCAB_SIZE,
               seed: int = 0):
    self.shapes = shapes
    self.vocab_size = vocab_size
    self.seed = seed
    self._models: dict[Any, dict[str, Any]] = {}
    self._rows: dict[Any, dict[str, Any]] = {}

  def model(self, shape_name: str, param_dtype: str, stacked: bool):
    """Abstract params and the model-only program's memory (cached)."""
    key = (shape_name, param_dtype, stacked)
    if key not in self._models:
      shape = self.shapes[shape_name]
      graphdef, params = abstract_params(
          model_config(shape, stacked, self.vocab_size), param_dtype)
      gradient = jax.value_and_grad(loss_function(graphdef))
      compiled, seconds = compile_program(
          gradient, params, tokens(shape), tokens(shape))
      self._models[key] = dict(graphdef=graphdef, params=params,
                               memory=memory_of(compiled),
                               compile_seconds=seconds)
    return self._models[key]

  def peaks(self) -> dict[str, int]:
    """``'method/shape/dtype' -> peak bytes`` of every step compiled."""
    return {'/'.join(key): row['peak_bytes'] for key, row in self._rows.items()}

  def row(self, name: str, shape_name: str, param_dtype: str,
          optimizer_only: bool = True) -> dict[str, Any]:
    """Peak, split and checks of one method's full train step (cached)."""
    key = (name, shape_name, param_dtype)
    if key in self._rows:
      return self._rows[key]
    method, shape = METHODS[name], self.shapes[shape_name]
    model = self.model(shape_name, param_dtype, method.stacked)
    params = model['params']
    tx = method.build(shape.rank, self.seed)
    opt_state = jax.eval_shape(tx.init, params)
    sizes = {'params': tree_bytes(params), 'gradients': tree_bytes(params),
             'optimizer_state': tree_bytes(opt_state),
             'tokens': 2 * tree_bytes(tokens(shape))}
    compiled, seconds = compile_program(
        train_step(model['graphdef'], tx), params, opt_state, tokens(shape),
        tokens(shape), donate=(0, 1))
    memory = memory_of(compiled)
    row = {
        'method': name, 'description': method.description,
        'shape': shape_name, 'param_dtype': param_dtype,
        'layers_stacked': method.stacked, 'rank': shape.rank,
        'peak_bytes': memory['peak'], 'memory_analysis': memory,
        'sizes': sizes,
        'model_only': {'activation_temp': model['memory']['temp'],
                       'gradient_output': model['memory']['output']},
        'checks': {
            'argument_is_params_state_tokens': memory['argument'] == (
                sizes['params'] + sizes['optimizer_state'] + sizes['tokens']),
            'alias_is_params_state': memory['alias'] == (
                sizes['params'] + sizes['optimizer_state']),
        },
        'compile_seconds': seconds,
    }
    if optimizer_only:
      compiled, seconds = compile_program(
          optimizer_step(tx), params, opt_state, params, donate=(0, 1))
      row['optimizer_only'] = {'temp': memory_of(compiled)['temp'],
                               'cost': cost_of(compiled),
                               'compile_seconds': seconds}
    self._rows[key] = row
    return row


def largest_fitting(meter: Meter, name: str, param_dtype: str,
                    sequence: Sequence[str], budget: int):
  """Bisection over ``sequence`` (increasing sizes) for the last shape whose
  compiled peak is at most ``budget``; None if even the first does not fit."""
  low, high = -1, len(sequence)  # sequence[low] fits, sequence[high] doesn't
  while high - low > 1:
    middle = (low + high) // 2
    peak = meter.row(name, sequence[middle], param_dtype,
                     optimizer_only=False)['peak_bytes']
    if peak <= budget:
      low = middle
    else:
      high = middle
  return sequence[low] if low >= 0 else None


def add_ratios(rows: list[dict[str, Any]]) -> None:
  """Each row's peak and state over AdamW's at the same shape and dtype, and
  the floor of a step that holds every gradient at once: params + gradients +
  state (``floor_all_gradients``), over AdamW's peak."""
  baseline = {(r['shape'], r['param_dtype']): r for r in rows
              if r['method'] == BASELINE}
  for row in rows:
    sizes = row['sizes']
    row['floor_all_gradients'] = (sizes['params'] + sizes['gradients']
                                  + sizes['optimizer_state'])
    reference = baseline.get((row['shape'], row['param_dtype']))
    if reference:
      row['peak_vs_adamw'] = row['peak_bytes'] / reference['peak_bytes']
      row['state_vs_adamw'] = (sizes['optimizer_state']
                               / reference['sizes']['optimizer_state'])
      row['floor_all_gradients_vs_adamw_peak'] = (
          row['floor_all_gradients'] / reference['peak_bytes'])


# Goals of issue #16 at the 7B shape: peak over AdamW's.
GOALS = {
    'galore_class_le_0.6': (('galore_randomized', 'galore_svd', 'frugal',
                             'fira', 'apollo', 'optax_galore',
                             'online_subspace_descent'), 0.6),
    'apollo_mini_q_galore_le_0.45': (('apollo_mini', 'q_galore'), 0.45),
}


def goals(rows: list[dict[str, Any]], shape: str) -> dict[str, Any]:
  out = {}
  for goal, (names, bound) in GOALS.items():
    for dtype in PARAM_DTYPES:
      ratios = {r['method']: r.get('peak_vs_adamw') for r in rows
                if r['shape'] == shape and r['param_dtype'] == dtype
                and r['method'] in names}
      if ratios:
        out[f'{goal}_{dtype}'] = {
            'bound': bound, 'ratios': ratios,
            'met': {k: v is not None and v <= bound for k, v in ratios.items()}}
  return out


# ----------------------------------------------------------------------------
# Check against a real run.

REAL_CHECK_SHAPE = Shape(256, 4, 4, 688, 8, 256)


def proc_status_bytes(field: str) -> int:
  """``VmRSS`` / ``VmHWM`` of this process from /proc, in bytes."""
  for line in pathlib.Path('/proc/self/status').read_text().splitlines():
    if line.startswith(field + ':'):
      return int(line.split()[1]) * 1024
  raise RuntimeError(f'{field} not in /proc/self/status')


def real_run_check(name: str = 'galore_randomized',
                   shape: Shape = REAL_CHECK_SHAPE,
                   vocab_size: int = VOCAB_SIZE) -> dict[str, Any]:
  """Runs the compiled step once on real arrays and compares.

  CPU devices report no ``memory_stats()``, so the check is (1) the real
  state's bytes against ``jax.eval_shape``'s and the compiled argument size,
  and (2) the process's resident-memory high-water mark during the step
  (``VmHWM`` after resetting it through ``/proc/self/clear_refs``) over the
  resident memory before it, against the predicted extra bytes
  ``temp + output - alias``. (2) is approximate: the allocator may keep
  freed pages and untouched temp pages are not resident.
  """
  config = model_config(shape, METHODS[name].stacked, vocab_size)
  graphdef, state = nnx.split(model_lib.Llama(config, rngs=nnx.Rngs(0)))
  params = nnx.as_pure(state)
  tx = METHODS[name].build(shape.rank, 0)
  opt_state = jax.jit(tx.init)(params)
  inputs = jnp.zeros((shape.batch_size, shape.seq_len), jnp.int32)
  compiled, _ = compile_program(train_step(graphdef, tx), params, opt_state,
                                inputs, inputs, donate=(0, 1))
  memory = memory_of(compiled)
  abstract_state = jax.eval_shape(tx.init, params)
  jax.block_until_ready((params, opt_state))
  clear_refs = pathlib.Path('/proc/self/clear_refs')
  clear_refs.write_text('5')  # resets VmHWM to the current VmRSS
  before = proc_status_bytes('VmRSS')
  jax.block_until_ready(compiled(params, opt_state, inputs, inputs))
  high_water = proc_status_bytes('VmHWM')
  predicted = memory['temp'] + memory['output'] - memory['alias']
  return {
      'method': name, 'shape': dataclasses.asdict(shape),
      'vocab_size': vocab_size, 'memory_analysis': memory,
      'device_memory_stats': jax.devices()[0].memory_stats(),
      'real_state_bytes': tree_bytes(opt_state),
      'eval_shape_state_bytes': tree_bytes(abstract_state),
      'argument_bytes_real': tree_bytes((params, opt_state, inputs, inputs)),
      'rss_before_step': before, 'rss_high_water_in_step': high_water,
      'measured_extra_bytes': high_water - before,
      'predicted_extra_bytes': predicted,
      'measured_over_predicted': (high_water - before) / predicted,
  }


# ----------------------------------------------------------------------------
# Markdown.


def _gb(value) -> str:
  return '–' if value is None else f'{value / 1e9:.2f}'


def markdown(result: dict[str, Any]) -> str:
  lines = ['| shape | params | method | peak GB | × adamw | params | grads '
           '| state (× adamw) | step temp | model temp | optimizer temp |',
           '|---|---|---|---|---|---|---|---|---|---|---|']
  for r in result['rows']:
    s = r['sizes']
    lines.append(
        f"| {r['shape']} | {r['param_dtype']} | {r['method']} "
        f"| {_gb(r['peak_bytes'])} | {r.get('peak_vs_adamw', 0):.3f} "
        f"| {_gb(s['params'])} | {_gb(s['gradients'])} "
        f"| {_gb(s['optimizer_state'])} ({r.get('state_vs_adamw', 0):.3f}) "
        f"| {_gb(r['memory_analysis']['temp'])} "
        f"| {_gb(r['model_only']['activation_temp'])} "
        f"| {_gb((r.get('optimizer_only') or {}).get('temp'))} |")
  fits = result.get('fits') or {}
  if fits:
    budgets = list(BUDGETS)
    lines += ['', '| method | params | ' + ' | '.join(budgets) + ' |',
              '|---|---|' + '---|' * len(budgets)]
    for key, entry in fits.items():
      lines.append(f"| {entry['method']} | {entry['param_dtype']} | "
                   + ' | '.join(str(entry[b]) for b in budgets) + ' |')
  return '\n'.join(lines) + '\n'


# ----------------------------------------------------------------------------
# Command line.


def run(args: argparse.Namespace) -> dict[str, Any]:
  start = time.perf_counter()
  if args.real_check:
    return {'benchmark': 'peak_memory real-run check (CPU)',
            'date': args.date or datetime.date.today().isoformat(),
            'checks': [real_run_check(name) for name in
                       (args.methods.split(',') if args.methods
                        else (BASELINE, 'galore_randomized'))],
            'wall_seconds': time.perf_counter() - start}
  shapes = SMOKE_SHAPES if args.smoke else SHAPES
  table_shapes = list(shapes) if args.smoke else args.shapes.split(',')
  names = (list(SMOKE_METHODS) if args.smoke and not args.methods
           else args.methods.split(',') if args.methods else list(METHODS))
  unknown = [n for n in names if n not in METHODS]
  if unknown:
    raise ValueError(f'Unknown methods {unknown}; choose from {list(METHODS)}.')
  dtypes = args.param_dtypes.split(',')
  vocab_size = SMOKE_VOCAB_SIZE if args.smoke else args.vocab_size
  meter = Meter(shapes, vocab_size=vocab_size)
  rows, fits = [], {}
  result = {
      **result_header('peak_memory', args.date, None),
      'vocab_size': vocab_size,
      'shapes': {k: dataclasses.asdict(v) | {'rank': v.rank}
                 for k, v in shapes.items()},
      'budgets_bytes': BUDGETS,
      'peak_formula': 'argument + output + temp - alias',
      'rows': rows, 'fits': fits, 'complete': False,
  }

  def save():  # after every row, so a run cut short keeps what it measured
    add_ratios(rows)
    result['goals_7b'] = goals(rows, 'llama_7b')
    result['fit_peaks_bytes'] = meter.peaks()
    result['wall_seconds'] = time.perf_counter() - start
    write(result, args.out)

  for shape_name in table_shapes:
    for dtype in dtypes:
      for name in names:
        rows.append(meter.row(name, shape_name, dtype,
                              optimizer_only=args.optimizer_only))
        print(f"{shape_name} {dtype} {name}: "
              f"{rows[-1]['peak_bytes'] / 1e9:.2f} GB", file=sys.stderr,
              flush=True)
        save()
  if args.fit_dtypes and not args.smoke:
    for dtype in args.fit_dtypes.split(','):
      for name in names:
        fits[f'{name}/{dtype}'] = {
            'method': name, 'param_dtype': dtype,
            **{budget: largest_fitting(meter, name, dtype, list(SHAPES), limit)
               for budget, limit in BUDGETS.items()}}
        save()
  result['complete'] = True
  save()
  return result


def write(result: dict[str, Any], out: str) -> None:
  if not out:
    return
  path = pathlib.Path(out)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(result, indent=1) + '\n')
  if 'rows' in result:
    path.with_suffix('.md').write_text(markdown(result))


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--smoke', action='store_true',
                      help='tiny shape, two methods, no fit search')
  parser.add_argument('--methods', default='',
                      help=f'comma list of {", ".join(METHODS)} (default all)')
  parser.add_argument('--shapes', default=','.join(TABLE_SHAPES))
  parser.add_argument('--param-dtypes', default=','.join(PARAM_DTYPES))
  parser.add_argument('--fit-dtypes', default=','.join(PARAM_DTYPES),
                      help='param dtypes of the fits-in-budget search ("" = '
                      'none)')
  parser.add_argument('--vocab-size', type=int, default=VOCAB_SIZE)
  gpu_target.add_target_argument(parser)
  parser.add_argument('--real-check', action='store_true',
                      help='run the compiled step once at a small shape and '
                      'compare the resident memory with the prediction')
  parser.add_argument('--no-optimizer-only', dest='optimizer_only',
                      action='store_false',
                      help='skip the optimizer-only compilation (its temp '
                      'and cost analysis)')
  parser.add_argument('--date', default='')
  parser.add_argument('--out', default='')
  return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
  args = parse_args(argv)
  if args.real_check and args.target != 'cpu':
    raise SystemExit('--real-check runs on this machine: drop --target.')
  compile_for(args.target)
  result = run(args)
  write(result, args.out)
  print(json.dumps(result, indent=1))
  return result


if __name__ == '__main__':
  main()
