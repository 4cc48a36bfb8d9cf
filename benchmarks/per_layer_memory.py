"""Peak memory of per-layer against whole-tree train steps, AOT (issue #25).

Each row compiles one train step ahead of time (as
``benchmarks/peak_memory.py``: abstract shapes, params and state donated,
``peak = argument + output + temp - alias``) in one of two forms:

* whole-tree: ``value_and_grad`` of the scanned, rematerialised LLaMA, then
  ``tx.update`` and ``apply_updates`` (every gradient exists at once);
* per-layer: :func:`subspace_optax.per_layer_train_step` (each layer's
  gradient is consumed by its update inside the reverse scan).

Keys of a row: ``shape, method, param_dtype, per_layer, batch, seq_len,
peak_bytes`` (GPU-valid: the compiled peak less ``cpu_only_bytes``),
``cpu_only_bytes``, ``optimizer_temp_bytes`` and ``largest_matrix_bytes``.

CPU-only buffers. XLA:CPU computes bfloat16 arithmetic in float32 and hoists
float32 copies of bfloat16 arrays (the saved layer inputs, weights); a GPU
runs those ops in bfloat16 and never holds the copies. With ``--dump-dir``
the script has XLA dump the buffer assignment of each step and reads the
temporary allocation: a value is CPU-only when it is a float32 array made by
a conversion (a ``convert`` instruction, or a fusion whose computation is
named after one). ``cpu_only_bytes`` is the part of the temporary
allocation's address range used by CPU-only values and by no other value
(interval arithmetic on the values' offsets), so removing them frees exactly
that; the largest are listed (``cpu_only_buffers``). ``compiled_peak_bytes``
keeps the figure before the correction.

``optimizer_temp_bytes``: temporaries of the optimizer alone (``update`` +
``apply_updates`` on given gradients) of the whole tree, or, per-layer, of a
one-layer model of the same widths (one layer's update plus the non-stack
leaves'). ``largest_matrix_bytes``: the largest 2-D matrix of the model in
the param dtype (one layer of a stack counts as one matrix).

``--target h100`` compiles for an H100 instead, ahead of time on this
machine (``benchmarks/gpu_target.py``: XLA's GPU compiler, no GPU needed):
``peak_bytes`` is then the GPU compile's own peak and ``cpu_only_bytes`` is
0. ``compiled_for`` says which compiler made a row.

``--time`` also runs both steps at a small CPU shape and records the median
step times and their ratio (one run, interleaved).

  python -m benchmarks.per_layer_memory --smoke
  python -m benchmarks.per_layer_memory --shapes llama_7b_b16x256 \\
      --methods adamw,galore_8bit_moments --dump-dir /tmp/xla_dump
  python -m benchmarks.per_layer_memory --target h100 \\
      --out benchmarks/results/per_layer_memory_h100_aot.json
"""

from __future__ import annotations

import argparse
import functools
import glob
import json
import os
import pathlib
import re
import statistics
import sys
import time
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import subspace_optax as so
from benchmarks import gpu_target
from benchmarks import methods as lm_optimizers
from benchmarks import peak_memory
from examples.lm import model as model_lib

DEFAULT_OUT = 'benchmarks/results/per_layer_memory_cpu_aot.json'
# The 7B setting: batch 16 x 256 tokens.
SHAPES = {
    'llama_1b_b16x256': peak_memory.Shape(2048, 24, 32, 5461, 16, 256),
    'llama_7b_b16x256': peak_memory.Shape(4096, 32, 32, 11008, 16, 256),
}
SMOKE_SHAPES = {'smoke': peak_memory.Shape(128, 3, 2, 344, 2, 32)}
TIME_SHAPE = peak_memory.Shape(128, 4, 4, 344, 8, 64)
# GaLore's README: 7B pre-training in 22.8 GB with 8-bit GaLore, per-layer
# weight updates and activation checkpointing.
GALORE_README_7B_BYTES = 22.8e9


def _q_galore_every(*, learning_rate, rank, refresh, weight_decay, seed):
  """q_galore with 8-bit moments and a fixed refresh period (its lazy policy
  is not separable over layers)."""
  return so.q_galore(learning_rate, rank=rank, refresh=so.refresh.every(
      refresh), scale=0.25, side='compact', seed=seed,
                     dimension_numbers=lm_optimizers.block_matrices,
                     **lm_optimizers.decay(weight_decay))


# Entries from which the 8-bit rows quantize a moment: every leaf (with
# blocks of >= 32 entries). A size threshold would quantize a stacked norm
# (L x dim) but not one layer's (dim), and the per-layer step refuses that;
# from LLaMA-350M up every leaf has >= 1024 entries, so the rows there are
# those of min_size=1024.
MIN_QUANTIZED = 0


def _galore_8bit(*, learning_rate, rank, refresh, weight_decay, seed,
                 basis='randomized'):
  """GaLore's pipeline, basis stored in bfloat16, Adam moments of every leaf
  in 8 bits (``MIN_QUANTIZED``): the GaLore README's 7B recipe with
  ``basis='svd'``. The randomized basis is the default here: XLA:CPU's SVD
  of 4096 x 11008 matrices needs terabytes of temporaries (XLA:GPU's,
  cuSOLVER's, does not: the ``galore_svd_8bit`` rows)."""
  inner = so.quantize_moments(so.transforms.scale_by_torch_adam(),
                              min_size=MIN_QUANTIZED)
  return optax.chain(
      so.low_rank(inner, rank=rank, refresh=refresh, basis=basis,
                  scale=0.25, seed=seed, basis_dtype=jnp.bfloat16,
                  dimension_numbers=lm_optimizers.block_matrices),
      optax.add_decayed_weights(weight_decay, lm_optimizers.matrices),
      optax.scale_by_learning_rate(learning_rate))


def _galore_randomized_bf16(*, learning_rate, rank, refresh, weight_decay,
                            seed):
  """GaLore, randomized basis and first moment in bfloat16 (second moment
  float32)."""
  return so.galore(learning_rate, rank=rank, refresh=refresh, scale=0.25,
                   basis='randomized', side='compact', seed=seed,
                   mu_dtype=jnp.bfloat16, basis_dtype=jnp.bfloat16,
                   dimension_numbers=lm_optimizers.block_matrices,
                   **lm_optimizers.decay(weight_decay))


# Micro-batches per update in the gradient-accumulation rows.
ACCUMULATE_STEPS = 4


def _galore_randomized_8bit_accumulate(*, learning_rate, rank, refresh,
                                       weight_decay, seed):
  """galore_randomized_8bit accumulating ``QᵀG`` over ACCUMULATE_STEPS
  micro-batches (``low_rank(accumulate_steps=...)``; the stages after it
  act once per update)."""
  inner = so.quantize_moments(so.transforms.scale_by_torch_adam(),
                              min_size=MIN_QUANTIZED)
  k = ACCUMULATE_STEPS
  return optax.chain(
      so.low_rank(inner, rank=rank, refresh=refresh, basis='randomized',
                  scale=0.25, seed=seed, basis_dtype=jnp.bfloat16,
                  dimension_numbers=lm_optimizers.block_matrices,
                  accumulate_steps=k),
      optax.conditionally_mask(optax.chain(
          optax.add_decayed_weights(weight_decay, lm_optimizers.matrices),
          optax.scale_by_learning_rate(learning_rate)),
          lambda step: step % k == k - 1))


def _galore_randomized_8bit_multisteps(**options):
  """galore_randomized_8bit under optax.MultiSteps (a full-size sum of the
  gradients; whole-tree only: it is not separable over layers)."""
  return optax.MultiSteps(_galore_8bit(**options),
                          ACCUMULATE_STEPS).gradient_transformation()


BUILDERS = {
    'galore_randomized_8bit_accumulate': _galore_randomized_8bit_accumulate,
    'galore_randomized_8bit_multisteps': _galore_randomized_8bit_multisteps,
    'galore_randomized_bf16': _galore_randomized_bf16,
    'q_galore_8bit_every': _q_galore_every,
    'galore_randomized_8bit': _galore_8bit,
    'galore_svd_8bit': functools.partial(_galore_8bit, basis='svd'),
}
# SVD-basis methods (galore, fira, frugal, q_galore, galore_svd_8bit) are
# left out of the default 7B rows: XLA:CPU's batched SVD at 4096 x 11008
# compiles to terabytes of temporaries, a CPU artifact. With --target h100
# they compile (cuSOLVER): pass them with --methods.
METHODS = ('adamw', 'galore_randomized_8bit', 'apollo_mini', 'golore',
           'galore_randomized')
SMOKE_METHODS = ('adamw', 'galore_randomized_8bit')


def build(name: str, rank: int) -> optax.GradientTransformation:
  options = {'basis': 'randomized'} if name == 'galore_randomized' else {}
  method = BUILDERS.get(name) or lm_optimizers.get(
      'galore' if name == 'galore_randomized' else name).build
  return method(learning_rate=peak_memory.LEARNING_RATE, rank=rank,
                refresh=peak_memory.REFRESH, weight_decay=0.0, seed=0,
                **options)


def per_layer_step(config, tx):
  embed, layer, head_loss = model_lib.per_layer_functions(config)
  step = so.per_layer_train_step(tx, embed=embed, layer=layer,
                                 head_loss=head_loss, stack='blocks')

  def step_fn(params, opt_state, inputs, targets):
    return step(params, opt_state, (inputs, targets))
  step_fn.__name__ = 'step'  # the dump filter matches jit_step
  return step_fn


# ----------------------------------------------------------------------------
# CPU-only buffers from XLA's buffer-assignment dump.

_VALUE = re.compile(
    r'value: <(\d+) (\S+) @\d+> \(size=(\d+),offset=(\d+)\): (\S+)')
_INSTRUCTION = re.compile(r'from instruction: %(\S+) = (\S+) (\w[\w-]*)\(')


def latest_dump(dump_dir: str, after: float) -> Optional[str]:
  files = [f for f in glob.glob(os.path.join(
      dump_dir, '*after_optimizations-buffer-assignment.txt'))
           if os.path.getmtime(f) >= after]
  return max(files, key=os.path.getmtime) if files else None


def _union(intervals: list[tuple[int, int]]) -> list[tuple[int, int]]:
  out: list[tuple[int, int]] = []
  for start, end in sorted(intervals):
    if out and start <= out[-1][1]:
      out[-1] = (out[-1][0], max(out[-1][1], end))
    else:
      out.append((start, end))
  return out


def _exclusive(mine: list[tuple[int, int]],
               others: list[tuple[int, int]]) -> int:
  """Bytes covered by ``mine`` and not by ``others`` (both unions)."""
  total = 0
  for start, end in mine:
    covered = sum(max(0, min(end, e) - max(start, s)) for s, e in others)
    total += (end - start) - covered
  return total


def cpu_only(buffer_assignment: str) -> dict[str, Any]:
  """``cpu_only_bytes`` and the largest CPU-only values of a dump."""
  text = pathlib.Path(buffer_assignment).read_text()
  values_file = buffer_assignment.replace('buffer-assignment.txt',
                                          'buffer-assignment-values.txt')
  kinds = {}  # value name -> (result type, opcode, called computation)
  if os.path.exists(values_file):
    for line in pathlib.Path(values_file).read_text().splitlines():
      match = _INSTRUCTION.search(line)
      if match:
        calls = re.search(r'calls=%(\S+?)[,\s]', line + ' ')
        kinds[match.group(1)] = (match.group(2), match.group(3),
                                 calls.group(1) if calls else '')
  temp, in_temp = [], False
  for line in text.splitlines():
    if line.startswith('allocation '):
      in_temp = 'preallocated-temp' in line
      continue
    match = _VALUE.search(line) if in_temp else None
    if match:
      _, name, size, offset, shape = match.groups()
      temp.append((name, int(size), int(offset), shape))

  def is_cpu_only(name: str, shape: str) -> bool:
    result, opcode, calls = kinds.get(name, (shape, '', ''))
    return shape.startswith('f32') and (
        opcode == 'convert' or 'convert' in calls or (
            not kinds and 'convert' in name))

  mine = [v for v in temp if is_cpu_only(v[0], v[3])]
  others = [v for v in temp if not is_cpu_only(v[0], v[3])]
  exclusive = _exclusive(_union([(o, o + s) for _, s, o, _ in mine]),
                         _union([(o, o + s) for _, s, o, _ in others]))
  largest = sorted(mine, key=lambda v: -v[1])[:8]
  return {'cpu_only_bytes': int(exclusive),
          'cpu_only_buffers': [{'value': n, 'shape': sh, 'bytes': s}
                               for n, s, _, sh in largest],
          'dump': os.path.basename(buffer_assignment)}


# ----------------------------------------------------------------------------
# Rows.


def largest_matrix_bytes(params) -> int:
  sizes = [(x.shape[-2] * x.shape[-1]) * jnp.dtype(x.dtype).itemsize
           for x in jax.tree.leaves(params) if len(x.shape) >= 2]
  return int(max(sizes))


def optimizer_temp(shape, param_dtype, vocab_size, tx_name, per_layer):
  if per_layer:
    shape = peak_memory.Shape(shape.dim, 1, shape.heads, shape.ffn_dim,
                              shape.batch_size, shape.seq_len)
  _, params = peak_memory.abstract_params(
      peak_memory.model_config(shape, True, vocab_size), param_dtype)
  tx = build(tx_name, shape.rank)
  state = jax.eval_shape(tx.init, params)
  compiled, _ = peak_memory.compile_program(
      peak_memory.optimizer_step(tx), params, state, params, donate=(0, 1))
  return peak_memory.memory_of(compiled)['temp']


def row(name: str, shape_name: str, shape, param_dtype: str, per_layer: bool,
        vocab_size: int, dump_dir: str = '') -> dict[str, Any]:
  config = peak_memory.model_config(shape, True, vocab_size)
  graphdef, params = peak_memory.abstract_params(config, param_dtype)
  tx = build(name, shape.rank)
  state = jax.eval_shape(tx.init, params)
  tokens = peak_memory.tokens(shape)
  step = (per_layer_step(config, tx) if per_layer
          else peak_memory.train_step(graphdef, tx))
  started = time.time()
  compiled, seconds = peak_memory.compile_program(
      step, params, state, tokens, tokens, donate=(0, 1))
  memory = peak_memory.memory_of(compiled)
  sizes = {'params': peak_memory.tree_bytes(params),
           'optimizer_state': peak_memory.tree_bytes(state),
           'tokens': 2 * peak_memory.tree_bytes(tokens)}
  on_gpu = peak_memory.COMPILE_DEVICE is not None
  found = latest_dump(dump_dir, started) if dump_dir and not on_gpu else None
  cpu = cpu_only(found) if found else {'cpu_only_bytes': 0,
                                       'cpu_only_buffers': [], 'dump': None}
  return {
      'shape': shape_name, 'method': name, 'param_dtype': param_dtype,
      'per_layer': per_layer, 'batch': shape.batch_size,
      'seq_len': shape.seq_len, 'rank': shape.rank,
      'accumulate_steps': ACCUMULATE_STEPS if name in (
          'galore_randomized_8bit_accumulate',
          'galore_randomized_8bit_multisteps') else 1,
      'peak_bytes': memory['peak'] - cpu['cpu_only_bytes'],
      'cpu_only_bytes': cpu['cpu_only_bytes'],
      'optimizer_temp_bytes': optimizer_temp(shape, param_dtype, vocab_size,
                                             name, per_layer),
      'largest_matrix_bytes': largest_matrix_bytes(params),
      'compiled_peak_bytes': memory['peak'],
      'compiled_for': peak_memory.compiled_for(),
      'cpu_only_buffers': cpu['cpu_only_buffers'],
      'cpu_only_measured': found is not None, 'dump': cpu['dump'],
      'memory_analysis': memory, 'sizes': sizes,
      'checks': {'alias_is_params_state': memory['alias'] == (
          sizes['params'] + sizes['optimizer_state'])},
      'compile_seconds': seconds,
  }


def step_time_ratio(name: str, shape=TIME_SHAPE, vocab_size: int = 256,
                    steps: int = 12) -> dict[str, Any]:
  """Median step times of both forms at a small shape, interleaved."""
  config = peak_memory.model_config(shape, True, vocab_size)
  graphdef, state = nnx.split(model_lib.Llama(config, rngs=nnx.Rngs(0)))
  params = nnx.as_pure(state)
  tx = build(name, shape.rank)
  inputs = jax.random.randint(jax.random.key(0),
                              (shape.batch_size, shape.seq_len), 0, vocab_size)
  steps_of = {'whole_tree': jax.jit(peak_memory.train_step(graphdef, tx)),
              'per_layer': jax.jit(per_layer_step(config, tx))}
  carries = {k: (params, tx.init(params)) for k in steps_of}
  times = {k: [] for k in steps_of}
  for i in range(steps + 2):
    for key, step in steps_of.items():
      start = time.perf_counter()
      p, s, loss = step(*carries[key], inputs, inputs)
      jax.block_until_ready((p, s, loss))
      if i >= 2:  # compilation and warm-up
        times[key].append(time.perf_counter() - start)
      carries[key] = (p, s)
  medians = {k: statistics.median(v) for k, v in times.items()}
  return {'method': name, 'shape': shape.__dict__, 'steps': steps,
          'median_seconds': medians,
          'per_layer_over_whole_tree': medians['per_layer']
          / medians['whole_tree']}


def real_check(name: str = 'galore_randomized_bf16',
               shape=peak_memory.REAL_CHECK_SHAPE,
               vocab_size: int = peak_memory.VOCAB_SIZE) -> dict[str, Any]:
  """The per-layer step run once on real arrays: the resident-memory high
  water mark over the step against the compiled ``temp + output - alias``
  (as ``peak_memory.real_run_check`` does for the whole-tree step)."""
  config = peak_memory.model_config(shape, True, vocab_size)
  params = nnx.as_pure(nnx.split(model_lib.Llama(config,
                                                  rngs=nnx.Rngs(0)))[1])
  tx = build(name, shape.rank)
  opt_state = jax.jit(tx.init)(params)
  inputs = jnp.zeros((shape.batch_size, shape.seq_len), jnp.int32)
  compiled, _ = peak_memory.compile_program(
      per_layer_step(config, tx), params, opt_state, inputs, inputs,
      donate=(0, 1))
  memory = peak_memory.memory_of(compiled)
  jax.block_until_ready((params, opt_state))
  pathlib.Path('/proc/self/clear_refs').write_text('5')  # VmHWM := VmRSS
  before = peak_memory.proc_status_bytes('VmRSS')
  jax.block_until_ready(compiled(params, opt_state, inputs, inputs))
  measured = peak_memory.proc_status_bytes('VmHWM') - before
  predicted = memory['temp'] + memory['output'] - memory['alias']
  return {'method': name, 'per_layer': True, 'shape': shape.__dict__,
          'memory_analysis': memory, 'measured_extra_bytes': measured,
          'predicted_extra_bytes': predicted,
          'measured_over_predicted': measured / predicted}


def add_goals(result: dict[str, Any]) -> None:
  rows = result['rows']
  adamw = {(r['shape'], r['param_dtype'], r['per_layer']): r['peak_bytes']
           for r in rows if r['method'] == 'adamw'}
  for r in rows:
    base = adamw.get((r['shape'], r['param_dtype'], False))
    if base:
      r['peak_vs_adamw_whole_tree'] = r['peak_bytes'] / base
  result['goals'] = {
      f"{r['method']}/{r['shape']}/{r['param_dtype']}": {
          'peak_bytes': r['peak_bytes'],
          'le_galore_readme_22.8gb': r['peak_bytes'] <= GALORE_README_7B_BYTES,
          'le_20gb': r['peak_bytes'] <= 20e9,
          'le_half_adamw': r.get('peak_vs_adamw_whole_tree', 1) <= 0.5}
      for r in rows if r['per_layer'] and r['method'] != 'adamw'
      and r['shape'].startswith('llama_7b')}


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--smoke', action='store_true')
  parser.add_argument('--shapes', default='llama_7b_b16x256')
  parser.add_argument('--methods', default='')
  parser.add_argument('--param-dtype', default='bfloat16')
  parser.add_argument('--forms', default='whole_tree,per_layer')
  parser.add_argument('--dump-dir', default='',
                      help='XLA dump directory: measure the CPU-only buffers')
  gpu_target.add_target_argument(parser)
  parser.add_argument('--time', default='',
                      help='comma list of methods to time at a small shape')
  parser.add_argument('--real-check', action='store_true',
                      help='run the per-layer step once at a small shape '
                      'and compare the resident memory with the prediction')
  parser.add_argument('--date', default='')
  parser.add_argument('--out', default='')
  return parser.parse_args(argv)


def dump_buffer_assignments(dump_dir: str) -> None:
  """Have XLA dump each train step's buffer assignment into ``dump_dir``
  (for :func:`cpu_only`); before the backend starts, which reads the flag."""
  if dump_dir:
    os.environ['XLA_FLAGS'] = (
        os.environ.get('XLA_FLAGS', '') + f' --xla_dump_to={dump_dir}'
        ' --xla_dump_hlo_module_re=.*step.*')


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
  args = parse_args(argv)
  if args.target != 'cpu':
    if args.time or args.real_check:
      raise SystemExit('--time and --real-check run steps: not with --target '
                       f'{args.target} (a compile-only device).')
  peak_memory.compile_for(args.target)
  dump_buffer_assignments(args.dump_dir)
  shapes = SMOKE_SHAPES if args.smoke else SHAPES
  names = (args.methods.split(',') if args.methods
           else list(SMOKE_METHODS if args.smoke else METHODS))
  shape_names = list(shapes) if args.smoke else args.shapes.split(',')
  vocab = peak_memory.SMOKE_VOCAB_SIZE if args.smoke else peak_memory.VOCAB_SIZE
  result = {
      **peak_memory.result_header('per_layer_memory', args.date, argv),
      'vocab_size': vocab, 'rows': [], 'step_times': [],
      'galore_readme_7b_bytes': GALORE_README_7B_BYTES}
  start = time.perf_counter()
  for shape_name in shape_names:
    for name in names:
      for form in args.forms.split(','):
        result['rows'].append(row(
            name, shape_name, shapes[shape_name], args.param_dtype,
            form == 'per_layer', vocab, args.dump_dir))
        r = result['rows'][-1]
        print(f"{shape_name} {name} {form}: {r['peak_bytes'] / 1e9:.2f} GB "
              f"(compiled {r['compiled_peak_bytes'] / 1e9:.2f})",
              file=sys.stderr, flush=True)
        add_goals(result)
        result['wall_seconds'] = time.perf_counter() - start
        write(result, args.out)
  if args.real_check:
    result['real_check'] = real_check()
  for name in filter(None, args.time.split(',')):
    result['step_times'].append(step_time_ratio(name))
  add_goals(result)
  result['wall_seconds'] = time.perf_counter() - start
  write(result, args.out)
  print(json.dumps({k: v for k, v in result.items() if k != 'rows'}, indent=1))
  return result


def write(result: dict[str, Any], out: str) -> None:
  if out:
    path = pathlib.Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + '\n')


if __name__ == '__main__':
  main()
