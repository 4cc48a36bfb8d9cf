"""The physical limit of one optimizer step (update + apply, no model).

An optimizer step cannot be faster than the larger of

  ``bytes moved / HBM bandwidth``  and  ``flops / peak at the precision used``.

Analytic counts, per leaf, with ``b`` the params' item size and Adam moments in
the state's item size ``s``:

* AdamW, per element: read ``g``, ``p``, ``m``, ``v``; write ``p``, ``m``,
  ``v``: ``3 b + 4 s`` bytes and about ``ADAM_FLOPS`` element-wise flops.
* GaLore, per projected ``k x l`` matrix (``k`` the projected, longer side,
  rank ``r``, moments ``r x l`` in float32, basis ``k x r`` in float32):
  project ``C = QᵀG`` is ``2 r k l`` flops, unproject ``QU`` another
  ``2 r k l``, Adam on ``r x l`` element-wise; bytes: read ``G`` and ``p``,
  write ``p`` (``3 b k l``), read the basis (``4 k r``), read and write both
  moments (``16 r l``). Leaves that are not projected get Adam with float32
  moments.

So GaLore's arithmetic intensity on a block matrix is about ``4 r k l /
(3 b k l) = 4 r / (3 b)`` flop per byte (``r / 3`` in float32): at rank 192 that
is 64 flop/byte, above the H100's float32 (CUDA-core) ridge of
67 TFLOP/s / 3.35 TB/s = 20 flop/byte and below its TF32 ridge (148).

Peaks (dense; NVIDIA's datasheets quote the tensor-core figures with 2:4
sparsity, twice these): H100 SXM5 and H200 SXM: FP32 67 TFLOP/s, TF32 494.7,
BF16 989.4 TFLOP/s; HBM3 3.35 TB/s (H100 SXM5 80 GB), HBM3e 4.8 TB/s (H200,
141 GB). Precision modes: ``highest_f32`` is XLA:GPU's true float32 dot
(``F32_F32_F32``, CUDA cores); ``highest_bf16x6`` the six-pass bf16 algorithm
on tensor cores (``BF16_BF16_F32_X6``, 1/6 of the bf16 peak); ``default_tf32``
JAX's default for float32 matmuls on Ampere and later GPUs (TF32 tensor
cores); ``bf16`` bfloat16 operands.

XLA's ``cost_analysis()`` of three compiled programs checks the formulas:
``optax.adamw``; a steady GaLore step written out (project, Adam on the
coefficients, unproject, apply); and ``subspace_optax.galore``'s real update,
whose figure also counts its refresh branch (a randomized range finder),
which a steady step does not run.

  python -m benchmarks.roofline --out benchmarks/results/roofline.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import optax

import subspace_optax as so
from benchmarks import peak_memory
from benchmarks import methods as lm_optimizers

ADAM_FLOPS = 12  # per element: two moment updates, sqrt, divide, scale, add
TFLOPS = {'highest_f32': 66.9, 'highest_bf16x6': 989.4 / 6,
          'default_tf32': 494.7, 'bf16': 989.4}
HARDWARE = {
    'H100_SXM_80GB': {'hbm_tb_per_s': 3.35, 'tflops': TFLOPS},
    'H200_SXM_141GB': {'hbm_tb_per_s': 4.8, 'tflops': TFLOPS},
}


@dataclasses.dataclass(frozen=True)
class Case:
  """A model whose optimizer step is bounded (stacked layers)."""

  shape: peak_memory.Shape
  vocab_size: int


CASES = {
    # The H100 run of benchmarks/README.md: byte-level LLaMA-130M, rank 192.
    'llama_130m_bytes': Case(peak_memory.Shape(768, 12, 12, 2048, 32, 256),
                             256),
    'llama_7b': Case(peak_memory.SHAPES['llama_7b'], peak_memory.VOCAB_SIZE),
}
SMOKE_CASES = {'smoke': Case(peak_memory.SMOKE_SHAPES['smoke'], 256)}


def leaves(params) -> list[tuple[bool, tuple[int, ...]]]:
  """``(is projected block matrix, shape)`` per leaf."""
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  return [(lm_optimizers.is_block_matrix(path, x), tuple(x.shape))
          for path, x in flat]


def _size(shape) -> int:
  out = 1
  for d in shape:
    out *= d
  return out


def adamw_counts(params, param_bytes: int) -> dict[str, float]:
  """Analytic bytes and flops of one AdamW update + apply."""
  n = sum(_size(s) for _, s in leaves(params))
  return {'bytes': n * (3 * param_bytes + 4 * param_bytes),
          'matmul_flops': 0.0, 'elementwise_flops': float(ADAM_FLOPS * n)}


def galore_counts(params, rank: int, param_bytes: int) -> dict[str, float]:
  """Analytic bytes and flops of one steady GaLore update + apply."""
  total = {'bytes': 0.0, 'matmul_flops': 0.0, 'elementwise_flops': 0.0}
  for projected, shape in leaves(params):
    if not projected:
      n = _size(shape)
      total['bytes'] += n * (3 * param_bytes + 16)
      total['elementwise_flops'] += ADAM_FLOPS * n
      continue
    batch = _size(shape[:-2])
    k, l = max(shape[-2:]), min(shape[-2:])
    r = min(rank, l)
    total['bytes'] += batch * (3 * param_bytes * k * l + 4 * k * r + 16 * r * l)
    total['matmul_flops'] += batch * 4 * r * k * l
    total['elementwise_flops'] += batch * (ADAM_FLOPS * r * l + 2 * k * l)
  return total


def limit(counts: dict[str, float], hardware: dict[str, Any],
          precision: str) -> dict[str, Any]:
  """``max(bytes / bandwidth, matmul flops / peak)`` in milliseconds."""
  memory_ms = 1e3 * counts['bytes'] / (hardware['hbm_tb_per_s'] * 1e12)
  compute_ms = 1e3 * counts['matmul_flops'] / (
      hardware['tflops'][precision] * 1e12)
  return {'memory_ms': memory_ms, 'compute_ms': compute_ms,
          'limit_ms': max(memory_ms, compute_ms),
          'bound': 'compute' if compute_ms > memory_ms else 'memory'}


def steady_galore(rank: int, learning_rate: float = 1e-3, b1: float = 0.9,
                  b2: float = 0.999, eps: float = 1e-6):
  """GaLore's steady step written out, for XLA's cost analysis only.

  ``(params, grads, bases, moments) -> (params, moments)``; block matrices
  are projected along their longer side, the others get plain Adam.
  """

  def one(path, p, g, q, m, v):
    if not lm_optimizers.is_block_matrix(path, p):
      m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
      return p - learning_rate * m / (jnp.sqrt(v) + eps), m, v
    g32 = g.astype(jnp.float32)
    tall = p.shape[-2] >= p.shape[-1]
    c = (jnp.einsum('...kr,...kl->...rl', q, g32) if tall
         else jnp.einsum('...lr,...kl->...kr', q, g32))
    m, v = b1 * m + (1 - b1) * c, b2 * v + (1 - b2) * c * c
    u = m / (jnp.sqrt(v) + eps)
    full = (jnp.einsum('...kr,...rl->...kl', q, u) if tall
            else jnp.einsum('...lr,...kr->...kl', q, u))
    return (p - learning_rate * 0.25 * full).astype(p.dtype), m, v

  def step(params, grads, bases, first, second):
    out = jax.tree_util.tree_map_with_path(one, params, grads, bases, first,
                                           second)
    pick = lambda i: jax.tree.map(lambda t: t[i], out,
                                  is_leaf=lambda t: isinstance(t, tuple))
    return pick(0), pick(1), pick(2)

  def abstract_state(params):
    def basis(path, p):
      if not lm_optimizers.is_block_matrix(path, p):
        return jax.ShapeDtypeStruct((), jnp.float32)
      k, l = max(p.shape[-2:]), min(p.shape[-2:])
      return jax.ShapeDtypeStruct(p.shape[:-2] + (k, min(rank, l)),
                                  jnp.float32)

    def moment(path, p):
      if not lm_optimizers.is_block_matrix(path, p):
        return jax.ShapeDtypeStruct(p.shape, jnp.float32)
      l = min(p.shape[-2:])
      tall = p.shape[-2] >= p.shape[-1]
      coefficient = (min(rank, l), p.shape[-1]) if tall else (
          p.shape[-2], min(rank, l))
      return jax.ShapeDtypeStruct(p.shape[:-2] + coefficient, jnp.float32)

    bases = jax.tree_util.tree_map_with_path(basis, params)
    moments = jax.tree_util.tree_map_with_path(moment, params)
    return bases, moments, moments

  return step, abstract_state


def xla_costs(params, rank: int) -> dict[str, dict[str, float]]:
  """XLA's cost analysis of the three optimizer-only programs."""
  out = {}
  for name, tx in (('adamw', optax.adamw(1e-3, eps=1e-8)),
                   ('galore_randomized', so.galore(
                       1e-3, rank=rank, basis='randomized',
                       dimension_numbers=lm_optimizers.block_matrices))):
    opt_state = jax.eval_shape(tx.init, params)
    compiled, _ = peak_memory.compile_program(
        peak_memory.optimizer_step(tx), params, opt_state, params)
    out[name] = peak_memory.cost_of(compiled)
  step, abstract_state = steady_galore(rank)
  compiled, _ = peak_memory.compile_program(
      step, params, params, *abstract_state(params))
  out['galore_steady_written_out'] = peak_memory.cost_of(compiled)
  return out


def analyse(case: Case, param_dtype: str = 'float32') -> dict[str, Any]:
  _, params = peak_memory.abstract_params(
      peak_memory.model_config(case.shape, True, case.vocab_size), param_dtype)
  param_bytes = jnp.dtype(param_dtype).itemsize
  rank = case.shape.rank
  counts = {'adamw': adamw_counts(params, param_bytes),
            'galore': galore_counts(params, rank, param_bytes)}
  limits = {}
  for hardware_name, hardware in HARDWARE.items():
    adamw = limit(counts['adamw'], hardware, 'highest_f32')
    limits[hardware_name] = {'adamw': adamw}
    for precision in hardware['tflops']:
      galore = limit(counts['galore'], hardware, precision)
      limits[hardware_name][f'galore_{precision}'] = {
          **galore, 'vs_adamw_limit': galore['limit_ms'] / adamw['limit_ms']}
  xla = xla_costs(params, rank)
  checks = {
      'adamw_bytes_xla_over_analytic':
          xla['adamw']['bytes_accessed'] / counts['adamw']['bytes'],
      'galore_steady_matmul_flops_xla_over_analytic':
          xla['galore_steady_written_out']['flops']
          / (counts['galore']['matmul_flops']
             + counts['galore']['elementwise_flops']),
      'galore_steady_bytes_xla_over_analytic':
          xla['galore_steady_written_out']['bytes_accessed']
          / counts['galore']['bytes'],
      'galore_real_flops_over_steady_xla':
          xla['galore_randomized']['flops']
          / xla['galore_steady_written_out']['flops'],
  }
  return {'shape': dataclasses.asdict(case.shape),
          'vocab_size': case.vocab_size,
          'rank': rank, 'param_dtype': param_dtype,
          'param_count': sum(_size(s) for _, s in leaves(params)),
          'analytic': counts,
          'galore_bytes_vs_adamw': (counts['galore']['bytes']
                                    / counts['adamw']['bytes']),
          'limits': limits, 'xla_cost_analysis': xla, 'checks': checks}


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--smoke', action='store_true')
  parser.add_argument('--out', default='')
  args = parser.parse_args(argv)
  cases = SMOKE_CASES if args.smoke else CASES
  result = {'benchmark': 'roofline (optimizer update + apply only)',
            'hardware': HARDWARE, 'adam_flops_per_element': ADAM_FLOPS,
            'cases': {name: analyse(case) for name, case in cases.items()}}
  text = json.dumps(result, indent=1)
  print(text)
  if args.out:
    pathlib.Path(args.out).write_text(text + '\n')
  return result


if __name__ == '__main__':
  main()
