"""Optimizer temporaries against the largest matrix, per registry method, AOT.

Issue #25's bound: the temporaries of ``tx.update`` alone (the state donated;
``memory_analysis().temp_size_in_bytes``) at most 2x the float32 bytes of the
largest single matrix, one layer of a stacked ``(L, m, n)`` leaf counting as
one matrix. The tree is small (a 64 x 96 kernel, a stacked ``(4, 64, 128)``
kernel, stacked norms, a 16 x 64 embedding), so each row is a ratio, not a
size; each row also has the float32 ratio for a stack of ``DEEP_LAYERS``
layers (the bound holds for any depth, or the temporaries grow with the
stack). ``tests/optimizer_temporaries_test.py`` asserts the bound on this
machine's XLA:CPU compile (strict xfails, with reasons, for the rows over
it); this script records every row's ratio, on XLA:CPU or, with
``--target h100``, on XLA's GPU compile for an H100
(``benchmarks/gpu_target.py``), whose fusions, library calls (cuSOLVER for
the SVD and QR) and scheduling differ.

  python -m benchmarks.optimizer_temporaries --methods adamw,galore
  python -m benchmarks.optimizer_temporaries --target h100 \\
      --out benchmarks/results/optimizer_temporaries_h100_aot.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import optax

from benchmarks import gpu_target
from benchmarks import methods as registry
from benchmarks import peak_memory
from benchmarks import per_layer_memory

M, N = 64, 128  # one layer of the stack: the largest single matrix
LARGEST_BYTES = M * N * 4  # its float32 bytes
BOUND = 2.0
LAYERS = 4
# A deeper stack, in float32: temporaries of one layer do not grow with it.
DEEP_LAYERS = 16
DTYPES = ('float32', 'bfloat16')
DEEP = f'float32_{DEEP_LAYERS}_layers'  # the row key of the deeper stack
# optax.contrib.galore refuses stacked (L, m, n) kernels by design.
UNSTACKABLE = ('optax_galore',)


def params(dtype, layers: int = LAYERS) -> dict[str, Any]:
  """The abstract params: a plain matrix, a stack, norms, an embedding."""
  shape = lambda *s: jax.ShapeDtypeStruct(s, jnp.dtype(dtype))
  return {'blocks': {'attn': {'kernel': shape(64, 96)},
                     'mlp': {'kernel': shape(layers, M, N)},
                     'norm': {'scale': shape(layers, M)}},
          'embed': {'embedding': shape(16, 64)}}


def build(name: str) -> optax.GradientTransformation:
  """The registry's method, without ``make_optimizer``'s clipping (the
  clipped gradient tree is that transform's temporary, not the method's)."""
  method = registry.get(name)
  rank = method.rank if isinstance(method.rank, (int, float)) else 8
  return method.build(learning_rate=1e-3, rank=rank, refresh=10,
                      weight_decay=0.0, seed=0)


def temp_ratio(name: str, dtype, layers: int = LAYERS) -> float:
  """Temporaries of ``tx.update`` over the largest matrix's float32 bytes."""
  tx = build(name)
  tree = params(dtype, layers)
  state = jax.eval_shape(tx.init, tree)
  compiled, _ = peak_memory.compile_program(
      lambda s, g, p: tx.update(g, s, p), state, tree, tree, donate=(0,))
  return peak_memory.memory_of(compiled)['temp'] / LARGEST_BYTES


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--methods', default='',
                      help='comma list (default: the whole registry)')
  gpu_target.add_target_argument(parser)
  parser.add_argument('--date', default='')
  parser.add_argument('--out', default='')
  return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
  args = parse_args(argv)
  peak_memory.compile_for(args.target)
  names = (args.methods.split(',') if args.methods else
           [n for n in registry.REGISTRY if n not in UNSTACKABLE])
  result: dict[str, Any] = {
      **peak_memory.result_header('optimizer_temporaries', args.date, argv),
      'largest_matrix_bytes': LARGEST_BYTES, 'bound': BOUND,
      'params': jax.tree.map(lambda x: list(x.shape), params('float32')),
      'rows': []}
  start = time.perf_counter()
  for name in names:
    row: dict[str, Any] = {'method': name}
    with warnings.catch_warnings():
      warnings.simplefilter('ignore')  # FullSizeWarning of the small tree
      for dtype in DTYPES:
        row[dtype] = temp_ratio(name, dtype)
      row[DEEP] = temp_ratio(name, 'float32', DEEP_LAYERS)
    row['within_bound'] = all(row[d] <= BOUND for d in DTYPES + (DEEP,))
    result['rows'].append(row)
    print(f"{name}: {row['float32']:.2f}x float32, {row['bfloat16']:.2f}x "
          f'bfloat16, {row[DEEP]:.2f}x float32 with {DEEP_LAYERS} layers',
          file=sys.stderr, flush=True)
  result['wall_seconds'] = time.perf_counter() - start
  per_layer_memory.write(result, args.out)
  print(json.dumps(result['rows'], indent=1))
  return result


if __name__ == '__main__':
  main()
