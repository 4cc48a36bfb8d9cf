"""The largest LLaMA whose train step fits 24, 80 and 141 GB, AOT (issue #25).

For each method and step form (whole-tree or per-layer,
``benchmarks/per_layer_memory.py``), a bisection over the LLaMA shapes
350M < 1B < 7B < 13B < 30B < 65B (bf16 params, remat, batch 16 x 256) finds
the last one whose GPU-valid peak (the compiled peak less the CPU-only
buffers, read from XLA's buffer-assignment dump) is within the budget. Peaks
grow with the shape, so the bisection compiles about three shapes per
budget; every compiled row is kept (``rows``).

Budgets: 24 GB (24·10⁹ bytes, a 24 GB consumer card), and an H100's and an
H200's memory as nvidia-smi reports it (``peak_memory.BUDGETS``). Nothing is
run on a GPU: "fits" means the ahead-of-time XLA:CPU compile's peak, with the
CPU-only buffers excluded, is within the budget; with ``--target h100``, the
peak of XLA's GPU compile for an H100 (``benchmarks/gpu_target.py``).

  python -m benchmarks.per_layer_fits --smoke
  python -m benchmarks.per_layer_fits --cases adamw:per_layer \\
      --dump-dir /tmp/xla_dump --out benchmarks/results/per_layer_fits_cpu_aot.json
  python -m benchmarks.per_layer_fits --target h100 \\
      --out benchmarks/results/per_layer_fits_h100_aot.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any, Optional, Sequence

from benchmarks import gpu_target
from benchmarks import peak_memory
from benchmarks import per_layer_memory

DEFAULT_OUT = 'benchmarks/results/per_layer_fits_cpu_aot.json'
BATCH, SEQ_LEN = 16, 256
SHAPES = {f'{name}_b{BATCH}x{SEQ_LEN}': peak_memory.Shape(
    s.dim, s.layers, s.heads, s.ffn_dim, BATCH, SEQ_LEN)
          for name, s in peak_memory.SHAPES.items()}  # increasing sizes
BUDGETS = {'24gb': 24 * 10**9, **peak_memory.BUDGETS}
# (method, step form): AdamW both ways, the GaLore-class methods per layer.
CASES = ('adamw:whole_tree', 'adamw:per_layer', 'galore_randomized_8bit:per_layer',
         'apollo_mini:per_layer')
SMOKE_SHAPES = {
    'smoke_s': peak_memory.Shape(64, 2, 2, 160, 2, 32),
    'smoke_m': peak_memory.Shape(128, 3, 2, 344, 2, 32),
    'smoke_l': peak_memory.Shape(256, 4, 4, 688, 2, 32),
}
SMOKE_BUDGETS = {'small': 8 * 2**20, 'large': 64 * 2**20}


def largest_fitting(peak_of, shapes: Sequence[str], budget: float):
  """Bisection over ``shapes`` (increasing peaks) for the last one whose
  ``peak_of(shape)`` is within ``budget``; None if the first is not."""
  low, high = -1, len(shapes)  # shapes[low] fits, shapes[high] does not
  while high - low > 1:
    middle = (low + high) // 2
    if peak_of(shapes[middle]) <= budget:
      low = middle
    else:
      high = middle
  return shapes[low] if low >= 0 else None


def fits(cases, shapes, budgets, vocab, dump_dir, on_row=None):
  """``(rows, fits)`` for ``cases`` of ``(method, form)``:
  ``fits[method][form][budget]`` is a shape name or None; ``rows`` every
  compiled row (one per method, form and shape)."""
  rows, cache = [], {}
  result: dict[str, Any] = {}
  for method, form in cases:
    def peak_of(shape_name, method=method, form=form):
      key = (method, form, shape_name)
      if key not in cache:
        cache[key] = per_layer_memory.row(
            method, shape_name, shapes[shape_name], 'bfloat16',
            form == 'per_layer', vocab, dump_dir)
        rows.append(cache[key])
        if on_row is not None:
          on_row(rows)
      return cache[key]['peak_bytes']
    result.setdefault(method, {})[form] = {
        budget: largest_fitting(peak_of, list(shapes), value)
        for budget, value in budgets.items()}
  return rows, result


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--smoke', action='store_true')
  parser.add_argument('--cases', default=','.join(CASES),
                      help='comma list of METHOD:FORM, FORM whole_tree or '
                      'per_layer')
  parser.add_argument('--dump-dir', default='',
                      help='XLA dump directory: subtract the CPU-only buffers')
  gpu_target.add_target_argument(parser)
  parser.add_argument('--date', default='')
  parser.add_argument('--out', default='')
  return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
  args = parse_args(argv)
  peak_memory.compile_for(args.target)
  per_layer_memory.dump_buffer_assignments(args.dump_dir)
  shapes = SMOKE_SHAPES if args.smoke else SHAPES
  budgets = SMOKE_BUDGETS if args.smoke else BUDGETS
  vocab = peak_memory.SMOKE_VOCAB_SIZE if args.smoke else peak_memory.VOCAB_SIZE
  result: dict[str, Any] = {
      **peak_memory.result_header('per_layer_fits', args.date, argv),
      'vocab_size': vocab, 'param_dtype': 'bfloat16',
      'shapes': {name: s.__dict__ for name, s in shapes.items()},
      'budgets_bytes': budgets, 'cpu_only_measured': bool(args.dump_dir)}
  start = time.perf_counter()

  def save(rows):
    result['rows'] = rows
    result['wall_seconds'] = time.perf_counter() - start
    per_layer_memory.write(result, args.out)
    r = rows[-1]
    print(f"{r['shape']} {r['method']} "
          f"{'per-layer' if r['per_layer'] else 'whole tree'}: "
          f"{r['peak_bytes'] / 1e9:.2f} GB", file=sys.stderr, flush=True)

  cases = [tuple(case.split(':')) for case in args.cases.split(',')]
  rows, result['fits'] = fits(cases, shapes, budgets, vocab, args.dump_dir,
                              on_row=save)
  result['rows'] = rows
  result['wall_seconds'] = time.perf_counter() - start
  per_layer_memory.write(result, args.out)
  print(json.dumps(result['fits'], indent=1))
  return result


if __name__ == '__main__':
  main()
