"""One method of the speed and memory benchmark: its train step on the
example model, its optimizer alone on real gradients, and on standalone
weight shapes (``python -m benchmarks.speed_memory`` runs them)."""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from benchmarks import harness
from benchmarks import quality
from benchmarks import step_times
from examples.lm import data as data_lib
from examples.lm import model as model_lib
from benchmarks import methods as lm_optimizers

LEARNING_RATE = 1e-3  # speed does not depend on it; one value for all

# Standalone weight shapes: one transformer block of the GaLore paper's
# LLaMA-60M (dim 512, MLP 1376, rank 128) and LLaMA-130M (768, 2048, 256).
SHAPE_SETS = {
    'llama_60m_block': (512, 1376, 128),
    'llama_130m_block': (768, 2048, 256),
}
QUICK_SHAPE_SETS = {'quick_block': (64, 160, 16)}
# Standalone shape sets of the default run: both on a GPU, the LLaMA-60M
# block only on a CPU (the 130M block's refreshes dominate a CPU run).
CPU_SHAPE_SETS = ('llama_60m_block',)


def make_tx(method: lm_optimizers.Method, rank, refresh: int,
            seed: int) -> optax.GradientTransformation:
  """The method alone (no clipping), at ``LEARNING_RATE``, no weight decay."""
  return method.build(learning_rate=LEARNING_RATE, rank=rank,
                      refresh=refresh, weight_decay=0.0, seed=seed)


def _analytic(method: lm_optimizers.Method, params, rank, row) -> None:
  analytic = method.state_bytes(params, rank) if method.state_bytes else None
  row['analytic_state_bytes'] = analytic
  row['state_bytes_vs_analytic'] = (
      None if not analytic else row['state_bytes'] / analytic)


def optimizer_only(tx, params, gradients, warmup, timed) -> dict[str, Any]:
  """``tx.update`` + ``apply_updates`` on cycled precomputed gradients."""

  def opt_step(params, opt_state, grads):
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  params = jax.tree.map(jnp.copy, params)
  opt_state = jax.jit(tx.init)(params)
  step = jax.jit(opt_step, donate_argnums=(0, 1))
  times, refreshed, carry = harness.timed_loop(
      step, (params, opt_state), lambda i: (gradients[i % len(gradients)],),
      lambda carry: carry[1], warmup, timed)
  return {**step_times.summary(times, refreshed),
          'overdue_refresh_leaves': harness.overdue_refreshes(carry[1])}


# ----------------------------------------------------------------------------
# Set-up.


@dataclasses.dataclass(frozen=True)
class Setup:
  model_config: model_lib.Config
  batch_size: int
  seq_len: int
  refresh: int
  warmup_steps: int
  timed_steps: int
  rank: int
  shape_sets: dict[str, tuple[int, int, int]]
  shape_layers: int
  stacked: bool  # layers stacked in one leaf per weight (nnx.scan/nnx.vmap)
  max_bytes: int


def make_setup(args) -> Setup:
  if args.quick:
    config = model_lib.Config(dim=32, layers=2, heads=2, ffn_dim=64,
                              max_seq_len=32, scan_layers=args.scan_layers)
    return Setup(config, batch_size=4, seq_len=32, refresh=3,
                 warmup_steps=1, timed_steps=6, rank=8,
                 shape_sets=QUICK_SHAPE_SETS, shape_layers=1,
                 stacked=args.scan_layers,
                 max_bytes=200_000)
  config = model_lib.config_from_preset(args.model,
                                        scan_layers=args.scan_layers)
  timed = args.timed_steps or 2 * args.refresh
  return Setup(config, batch_size=args.batch_size,
               seq_len=args.seq_len or config.max_seq_len,
               refresh=args.refresh, warmup_steps=args.warmup_steps,
               timed_steps=timed, rank=args.rank or config.dim // 4,
               shape_sets=_shape_sets(args), shape_layers=args.shape_layers,
               stacked=args.scan_layers,
               max_bytes=args.max_bytes)


def _shape_sets(args) -> dict[str, tuple[int, int, int]]:
  if args.shape_sets:
    names = [n.strip() for n in args.shape_sets.split(',') if n.strip()]
  elif jax.default_backend() == 'cpu':
    names = list(CPU_SHAPE_SETS)
  else:
    names = list(SHAPE_SETS)
  unknown = [n for n in names if n not in SHAPE_SETS]
  if unknown:
    raise SystemExit(f'error: unknown shape set(s) {unknown}; known: '
                     f'{", ".join(SHAPE_SETS)}')
  return {n: SHAPE_SETS[n] for n in names}


def block_shapes(dim: int, ffn_dim: int, layers: int, stacked: bool = False):
  """Zeros shaped like ``layers`` LLaMA blocks, with paths that
  ``block_matrices`` projects (``blocks/<i>/.../kernel``, or with ``stacked``
  ``blocks/.../kernel`` of shape ``(layers, d_in, d_out)``)."""
  if stacked:
    return jax.tree.map(
        lambda x: jnp.zeros((layers,) + x.shape, x.dtype),
        {'blocks': block_shapes(dim, ffn_dim, 1)['blocks']['0']})
  block = {
      'attention': {n: {'kernel': (dim, dim)} for n in ('wq', 'wk', 'wv', 'wo')},
      'mlp': {'w_gate': {'kernel': (dim, ffn_dim)},
              'w_up': {'kernel': (dim, ffn_dim)},
              'w_down': {'kernel': (ffn_dim, dim)}},
      'attention_norm': {'scale': (dim,)},
  }
  tree = {'blocks': {str(i): block for i in range(layers)}}
  return jax.tree.map(lambda s: jnp.zeros(s, jnp.float32), tree,
                      is_leaf=lambda x: isinstance(x, tuple))


def shape_gradients(params, count: int, seed: int):
  """Gradients with a decaying spectrum (like real ones), ``count`` of them."""
  out = []
  for c in range(count):
    keys = iter(jax.random.split(jax.random.key(seed + c), 2 * len(
        jax.tree.leaves(params))))

    def one(p):
      if p.ndim < 2:
        return jax.random.normal(next(keys), p.shape)
      *layers, m, n = p.shape
      k = min(m, n)
      left = jax.random.normal(next(keys), (*layers, m, k)) * (
          0.9 ** jnp.arange(k))
      return left @ jax.random.normal(next(keys), (*layers, k, n)) / math.sqrt(k)

    out.append(jax.tree.map(one, params))
  return out


# ----------------------------------------------------------------------------
# One method.


def run_method(name: str, method: lm_optimizers.Method, setup: Setup, corpus,
               bandwidth, seed: int = 0) -> dict[str, Any]:
  rank = method.fixed_rank or setup.rank
  tx = make_tx(method, rank, setup.refresh, seed)
  graphdef, params = quality.init_params(quality_setup(setup), seed)
  result: dict[str, Any] = {'description': method.description, 'rank': rank}
  opt_state = jax.jit(tx.init)(params)
  param_size = harness.tree_bytes(params)
  result['state_bytes'] = harness.tree_bytes(opt_state)
  result['param_bytes'] = param_size
  _analytic(method, params, rank, result)

  def loss_fn(params, inputs, targets):
    return model_lib.cross_entropy(nnx.merge(graphdef, params)(inputs), targets)

  def train_step(params, opt_state, inputs, targets):
    loss, grads = jax.value_and_grad(loss_fn)(params, inputs, targets)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  def batch(i):
    return tuple(jnp.asarray(x) for x in data_lib.batch_at(
        corpus.train, seed=seed, step=i, batch_size=setup.batch_size,
        seq_len=setup.seq_len))

  start = time.perf_counter()
  compiled = jax.jit(train_step, donate_argnums=(0, 1)).lower(
      params, opt_state, *batch(0)).compile()
  result['compile_seconds'] = time.perf_counter() - start
  result['compiled_memory'] = harness.compiled_memory(compiled)
  times, refreshed, carry = harness.timed_loop(
      compiled, (params, opt_state), batch, lambda carry: carry[1],
      setup.warmup_steps, setup.timed_steps)
  result['train_step'] = {
      **step_times.summary(times, refreshed),
      'overdue_refresh_leaves': harness.overdue_refreshes(carry[1])}
  result['peak_device_bytes'] = harness.peak_device_bytes()

  # Optimizer alone on three real gradients of the same model.
  _, params = quality.init_params(quality_setup(setup), seed)
  grad_fn = jax.jit(jax.grad(loss_fn))
  gradients = [grad_fn(params, *batch(1000 + i))
               for i in range(step_times.gradient_count(setup.refresh))]
  result['optimizer_only'] = optimizer_only(
      tx, params, gradients, setup.warmup_steps, setup.timed_steps)
  result['roofline'] = harness.roofline(
      result['state_bytes'], param_size,
      result['optimizer_only']['steady_median_ms']
      or result['optimizer_only']['median_ms'], bandwidth)
  return result


def run_shapes(name: str, method: lm_optimizers.Method, setup: Setup,
               bandwidth, seed: int = 0) -> dict[str, Any]:
  out = {}
  for set_name, (dim, ffn_dim, rank) in setup.shape_sets.items():
    params = block_shapes(dim, ffn_dim, setup.shape_layers, setup.stacked)
    rank = method.fixed_rank or rank
    tx = make_tx(method, rank, setup.refresh, seed)
    state = jax.eval_shape(tx.init, params)
    row = {'rank': rank, 'state_bytes': harness.tree_bytes(state),
           'param_bytes': harness.tree_bytes(params)}
    _analytic(method, params, rank, row)
    row['optimizer_only'] = optimizer_only(
        tx, params, shape_gradients(
            params, step_times.gradient_count(setup.refresh), seed),
        setup.warmup_steps,
        setup.timed_steps)
    timing = row['optimizer_only']
    row['roofline'] = harness.roofline(
        row['state_bytes'], row['param_bytes'],
        timing['steady_median_ms'] or timing['median_ms'], bandwidth)
    out[set_name] = row
  return out


def quality_setup(setup: Setup):
  """The object ``quality.init_params`` reads (only ``model_config``)."""
  return quality.Setup(setup.model_config, steps=1, batch_size=setup.batch_size,
                       seq_len=setup.seq_len, eval_batches=1,
                       refresh=setup.refresh, adamw_lr=LEARNING_RATE,
                       max_bytes=setup.max_bytes)
