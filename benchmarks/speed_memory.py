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
  ``2 x refresh_every`` steps (refreshes amortised) and the ratios to
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
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import math
import os
import pathlib
import platform
import shlex
import subprocess
import sys
import time
from typing import Any, Callable, Optional, Sequence

# On a GPU, allocate device memory as needed rather than 75 % up front: the
# allocator's peak is then the method's own, and the galore-torch process of
# --torch-reference finds the device free.
os.environ.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import subspace_optax as so
from benchmarks import quality
from benchmarks import step_times
from examples.lm import data as data_lib
from examples.lm import model as model_lib
from examples.lm import optimizers as lm_optimizers

DEFAULT_OUT = 'benchmarks/results/speed_memory_cpu.json'
BASELINE = 'adamw'
CONTRIB = 'optax_galore'
LEARNING_RATE = 1e-3  # speed does not depend on it; one value for all

# HBM bandwidth in GB/s by device kind (vendor figures, SXM parts).
HBM_BANDWIDTH_GBS = {'H100': 3350.0, 'H200': 4800.0, 'A100': 2039.0}

# Standalone weight shapes: one transformer block of the GaLore paper's
# LLaMA-60M (dim 512, MLP 1376, rank 128) and LLaMA-130M (768, 2048, 256).
SHAPE_SETS = {
    'llama_60m_block': (512, 1376, 128),
    'llama_130m_block': (768, 2048, 256),
}
QUICK_SHAPE_SETS = {'quick_block': (64, 160, 16)}


# ----------------------------------------------------------------------------
# Methods.


@dataclasses.dataclass(frozen=True)
class Method:
  """``build(rank, refresh_every, seed)`` -> the method's optax transform."""

  build: Callable[[int, int, int], optax.GradientTransformation]
  description: str
  analytic: Optional[Callable[[Any, int], int]] = None  # (params, rank) -> bytes
  fixed_rank: Optional[int] = None


def _blocks():
  return dict(dimension_numbers=lm_optimizers.block_matrices)


def _adamw_bytes(params, rank) -> int:
  del rank
  return 4 + 2 * 4 * sum(int(np.prod(jnp.shape(p))) for p in jax.tree.leaves(params))


def _galore(basis: str, stagger: bool) -> Method:
  return Method(
      lambda r, t, s: so.galore(
          LEARNING_RATE, rank=r, refresh_every=t, scale=0.25, basis=basis,
          stagger=stagger, seed=s, **_blocks()),
      f'subspace_optax.galore, {basis} basis, stagger '
      f'{"on" if stagger else "off"}, compact side, scale 0.25',
      lambda params, r: so.galore_bytes(params, r, **_blocks()))


def _preset(name: str) -> Method:
  """A row of benchmarks/quality.py's table (the presets present now)."""
  entry = quality.METHODS[name]
  formula = getattr(so, f'{name}_bytes', None)

  def analytic(params, rank):
    if formula is None:
      return None
    try:
      return int(formula(params, rank, **_blocks()))
    except TypeError:
      return None

  return Method(
      lambda r, t, s: entry.build(LEARNING_RATE, r, t, s), entry.description,
      analytic, entry.rank if isinstance(entry.rank, int) else None)


def methods() -> dict[str, Method]:
  """Every method benchmarked, in order; presets found at run time."""
  table = {
      BASELINE: Method(
          lambda r, t, s: optax.adamw(LEARNING_RATE, eps=1e-8), 'optax.adamw',
          _adamw_bytes),
      CONTRIB: _preset(CONTRIB),
      'galore_svd': _galore('svd', True),
      'galore_svd_no_stagger': _galore('svd', False),
      'galore_randomized': _galore('randomized', True),
      'galore_randomized_no_stagger': _galore('randomized', False),
  }
  for name in quality.available_methods():
    if name not in (BASELINE, CONTRIB, 'galore'):
      table[name] = _preset(name)
  return table


QUICK_METHODS = (BASELINE, CONTRIB, 'galore_svd', 'galore_randomized')
# The default run (about 10 minutes on 2 CPU cores); ``--methods all`` runs
# every method of methods().
DEFAULT_METHODS = (BASELINE, CONTRIB, 'galore_svd', 'galore_svd_no_stagger',
                   'galore_randomized', 'galore_randomized_no_stagger',
                   'online_subspace_descent', 'fira', 'apollo', 'q_galore')
# Standalone shape sets of the default run: both on a GPU, the LLaMA-60M
# block only on a CPU (the 130M block's refreshes dominate a CPU run).
CPU_SHAPE_SETS = ('llama_60m_block',)


# ----------------------------------------------------------------------------
# Timing.


_BASIS_FIELDS = ('basis', 'refresh', 'projector')


def _is_basis_holder(x) -> bool:
  return any(f in getattr(x, '_fields', ()) for f in _BASIS_FIELDS)


@jax.jit
def basis_fingerprint(opt_state) -> jax.Array:
  """One number per basis leaf and refresh-schedule leaf.

  Covers subspace_optax states (``basis`` and the refresh policy's state, which
  changes exactly when a leaf refreshes) and optax.contrib's ``projector``.
  Computed between timed steps, never inside them.
  """
  sums = [jnp.zeros([], jnp.float32)]
  for node in jax.tree.leaves(opt_state, is_leaf=_is_basis_holder):
    if _is_basis_holder(node):
      for field in _BASIS_FIELDS:
        if field in node._fields:
          sums += [jnp.sum(jnp.abs(x.astype(jnp.float32)))
                   for x in jax.tree.leaves(getattr(node, field))
                   if hasattr(x, 'dtype')]
  return jnp.stack(sums)


def overdue_refreshes(opt_state) -> int:
  """Leaves whose scheduled refresh is overdue after the run.

  A refresh whose result is not finite is discarded and stays due (the old
  basis is kept), so a leaf that stays overdue runs its refresh on every step
  and never gets a new basis. Counts ``refresh.every`` schedules
  (``next_refresh``) of every ``SubspaceState`` in ``opt_state``.
  """
  overdue = 0
  holders = [x for x in jax.tree.leaves(
      opt_state, is_leaf=lambda x: isinstance(x, so.SubspaceState))
             if isinstance(x, so.SubspaceState)]
  for state in holders:
    last = int(state.count) - 1  # the count of the last update
    for schedule in jax.tree.leaves(
        state.refresh, is_leaf=lambda x: hasattr(x, 'next_refresh')):
      if hasattr(schedule, 'next_refresh') and int(schedule.next_refresh) <= last:
        overdue += 1
  return overdue


def _timed_loop(step, carry, inputs_at, opt_state_of, warmup, timed):
  """Run ``warmup + timed`` steps; per timed step: (ms, basis changed?)."""
  times, refreshed = [], []
  previous = np.asarray(basis_fingerprint(opt_state_of(carry)))
  for i in range(warmup + timed):
    args = inputs_at(i)
    start = time.perf_counter()
    carry = jax.block_until_ready(step(*carry, *args))
    elapsed = 1e3 * (time.perf_counter() - start)
    current = np.asarray(basis_fingerprint(opt_state_of(carry)))
    if i >= warmup:
      times.append(elapsed)
      refreshed.append(bool(np.any(current != previous)))
    previous = current
  return times, refreshed, carry


def _compiled_memory(compiled) -> Optional[dict[str, int]]:
  try:
    analysis = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except
    return None
  if analysis is None:
    return None
  fields = ('argument_size_in_bytes', 'output_size_in_bytes',
            'temp_size_in_bytes', 'alias_size_in_bytes')
  out = {f: int(getattr(analysis, f, 0) or 0) for f in fields}
  out['estimated_peak_bytes'] = (
      out['argument_size_in_bytes'] + out['output_size_in_bytes']
      + out['temp_size_in_bytes'] - out['alias_size_in_bytes'])
  return out


def _peak_device_bytes() -> Optional[int]:
  try:
    stats = jax.local_devices()[0].memory_stats()
  except Exception:  # pylint: disable=broad-except
    return None
  return int(stats['peak_bytes_in_use']) if stats and (
      'peak_bytes_in_use' in stats) else None


def _tree_bytes(tree) -> int:
  return int(so.state_bytes(tree))


def _roofline(state_size: int, param_size: int, measured_ms: Optional[float],
              bandwidth_gbs: Optional[float]) -> Optional[dict[str, Any]]:
  if not bandwidth_gbs:
    return None
  moved = 2 * state_size + 3 * param_size
  roofline_ms = 1e3 * moved / (bandwidth_gbs * 1e9)
  return {'bytes_moved': moved, 'bandwidth_gbs': bandwidth_gbs,
          'roofline_ms': roofline_ms,
          'ratio': None if measured_ms is None else measured_ms / roofline_ms}


def optimizer_only(tx, params, gradients, warmup, timed) -> dict[str, Any]:
  """``tx.update`` + ``apply_updates`` on cycled precomputed gradients."""

  def opt_step(params, opt_state, grads):
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  params = jax.tree.map(jnp.copy, params)
  opt_state = jax.jit(tx.init)(params)
  step = jax.jit(opt_step, donate_argnums=(0, 1))
  times, refreshed, carry = _timed_loop(
      step, (params, opt_state), lambda i: (gradients[i % len(gradients)],),
      lambda carry: carry[1], warmup, timed)
  return {**step_times.summary(times, refreshed),
          'overdue_refresh_leaves': overdue_refreshes(carry[1])}


# ----------------------------------------------------------------------------
# Set-up.


@dataclasses.dataclass(frozen=True)
class Setup:
  model_config: model_lib.Config
  batch_size: int
  seq_len: int
  refresh_every: int
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
    return Setup(config, batch_size=4, seq_len=32, refresh_every=3,
                 warmup_steps=1, timed_steps=6, rank=8,
                 shape_sets=QUICK_SHAPE_SETS, shape_layers=1,
                 stacked=args.scan_layers,
                 max_bytes=200_000)
  config = model_lib.config_from_preset(args.model,
                                        scan_layers=args.scan_layers)
  timed = args.timed_steps or 2 * args.refresh_every
  return Setup(config, batch_size=args.batch_size,
               seq_len=args.seq_len or config.max_seq_len,
               refresh_every=args.refresh_every, warmup_steps=args.warmup_steps,
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


def run_method(name: str, method: Method, setup: Setup, corpus, bandwidth,
               seed: int = 0) -> dict[str, Any]:
  rank = method.fixed_rank or setup.rank
  tx = method.build(rank, setup.refresh_every, seed)
  graphdef, params = quality.init_params(_quality_setup(setup), seed)
  result: dict[str, Any] = {'description': method.description, 'rank': rank}
  opt_state = jax.jit(tx.init)(params)
  param_size = _tree_bytes(params)
  result['state_bytes'] = _tree_bytes(opt_state)
  result['param_bytes'] = param_size
  analytic = method.analytic(params, rank) if method.analytic else None
  result['analytic_state_bytes'] = analytic
  result['state_bytes_vs_analytic'] = (
      None if not analytic else result['state_bytes'] / analytic)

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
  result['compiled_memory'] = _compiled_memory(compiled)
  times, refreshed, carry = _timed_loop(
      compiled, (params, opt_state), batch, lambda carry: carry[1],
      setup.warmup_steps, setup.timed_steps)
  result['train_step'] = {**step_times.summary(times, refreshed),
                          'overdue_refresh_leaves': overdue_refreshes(carry[1])}
  result['peak_device_bytes'] = _peak_device_bytes()

  # Optimizer alone on three real gradients of the same model.
  _, params = quality.init_params(_quality_setup(setup), seed)
  grad_fn = jax.jit(jax.grad(loss_fn))
  gradients = [grad_fn(params, *batch(1000 + i))
               for i in range(step_times.gradient_count(setup.refresh_every))]
  result['optimizer_only'] = optimizer_only(
      tx, params, gradients, setup.warmup_steps, setup.timed_steps)
  result['roofline'] = _roofline(
      result['state_bytes'], param_size,
      result['optimizer_only']['steady_median_ms']
      or result['optimizer_only']['median_ms'], bandwidth)
  return result


def run_shapes(name: str, method: Method, setup: Setup, bandwidth,
               seed: int = 0) -> dict[str, Any]:
  out = {}
  for set_name, (dim, ffn_dim, rank) in setup.shape_sets.items():
    params = block_shapes(dim, ffn_dim, setup.shape_layers, setup.stacked)
    rank = method.fixed_rank or rank
    tx = method.build(rank, setup.refresh_every, seed)
    state = jax.eval_shape(tx.init, params)
    row = {'rank': rank, 'state_bytes': _tree_bytes(state),
           'param_bytes': _tree_bytes(params)}
    analytic = method.analytic(params, rank) if method.analytic else None
    row['analytic_state_bytes'] = analytic
    row['state_bytes_vs_analytic'] = (
        None if not analytic else row['state_bytes'] / analytic)
    row['optimizer_only'] = optimizer_only(
        tx, params, shape_gradients(
            params, step_times.gradient_count(setup.refresh_every), seed),
        setup.warmup_steps,
        setup.timed_steps)
    timing = row['optimizer_only']
    row['roofline'] = _roofline(
        row['state_bytes'], row['param_bytes'],
        timing['steady_median_ms'] or timing['median_ms'], bandwidth)
    out[set_name] = row
  return out


def _quality_setup(setup: Setup):
  """The object ``quality.init_params`` reads (only ``model_config``)."""
  return quality.Setup(setup.model_config, steps=1, batch_size=setup.batch_size,
                       seq_len=setup.seq_len, eval_batches=1,
                       refresh_every=setup.refresh_every, adamw_lr=LEARNING_RATE,
                       max_bytes=setup.max_bytes)


# ----------------------------------------------------------------------------
# Ratios.


def _ratio(a, b):
  return None if a is None or b is None or b == 0 else a / b


def _timing_ratios(row, reference, key) -> dict[str, Any]:
  mine, theirs = row.get(key), reference.get(key)
  if not mine or not theirs:
    return {}
  steady = lambda t: t['steady_median_ms'] or t['median_ms']
  return {
      'median': _ratio(mine['median_ms'], theirs['median_ms']),
      'steady': _ratio(steady(mine), steady(theirs)),
      'amortised_mean': _ratio(mine['mean_ms'], theirs['mean_ms']),
      'refresh_max': _ratio(mine['refresh_max_ms'] or mine['max_ms'],
                            theirs['refresh_max_ms'] or theirs['max_ms']),
  }


def add_ratios(rows: dict[str, dict[str, Any]]) -> None:
  for row in rows.values():
    if 'error' in row:
      continue
    for reference_name, label in ((BASELINE, 'vs_adamw'),
                                  (CONTRIB, 'vs_optax_galore')):
      reference = rows.get(reference_name)
      if not reference or 'error' in reference:
        continue
      row[label] = {
          key: _timing_ratios(row, reference, key)
          for key in ('train_step', 'optimizer_only') if key in row}
      row[label]['state_bytes'] = _ratio(row['state_bytes'],
                                         reference['state_bytes'])
      if row.get('peak_device_bytes') and reference.get('peak_device_bytes'):
        row[label]['peak_device_bytes'] = _ratio(
            row['peak_device_bytes'], reference['peak_device_bytes'])
    for key in ('train_step', 'optimizer_only'):
      timing = row.get(key)
      if timing:  # the refresh spike against the method's own normal step
        timing['refresh_over_steady'] = _ratio(
            timing['refresh_max_ms'], timing['steady_median_ms'])


def goals(rows: dict[str, dict[str, Any]], on_gpu: bool) -> dict[str, Any]:
  """The issue's speed goals, evaluated on the measured medians."""
  out = {'evaluated_on': 'gpu' if on_gpu else 'cpu (goals are for a GPU)'}
  for name, row in rows.items():
    if 'error' in row or name in (BASELINE, CONTRIB):
      continue
    vs = row.get('vs_adamw', {})
    entry = {
        'train_step_amortised_vs_adamw': vs.get('train_step', {}).get(
            'amortised_mean'),
        'refresh_over_steady_train_step': row['train_step'].get(
            'refresh_over_steady'),
        'optimizer_only_vs_roofline': (row.get('roofline') or {}).get('ratio'),
        'state_bytes_vs_adamw': vs.get('state_bytes'),
        'peak_device_bytes_vs_adamw': vs.get('peak_device_bytes'),
    }
    entry['meets'] = {
        'train_step_le_1.05x_adamw': _le(entry['train_step_amortised_vs_adamw'],
                                         1.05),
        'refresh_le_3x_step': _le(entry['refresh_over_steady_train_step'], 3.0),
        'optimizer_only_le_2x_roofline': _le(
            entry['optimizer_only_vs_roofline'], 2.0),
        'peak_memory_below_adamw': _le(entry['peak_device_bytes_vs_adamw'],
                                       0.999),
    }
    out[name] = entry
  return out


def _le(value, bound):
  return None if value is None else bool(value <= bound)


# ----------------------------------------------------------------------------
# The PyTorch reference (galore-torch), same shapes, rank and refresh period.


def _split_shapes(params) -> dict[str, list[list[int]]]:
  """Leaf shapes, the projected ones (GaLore's parameter group) first; a
  stacked ``(layers, m, n)`` leaf is ``layers`` tensors for PyTorch."""
  projected, other = [], []
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    if lm_optimizers.is_block_matrix(path, leaf):
      projected += [list(leaf.shape[-2:])] * int(np.prod(leaf.shape[:-2]))
    else:
      other.append(list(leaf.shape))
  return {'projected': projected, 'other': other}


def torch_reference(setup: Setup, model_params, timeout: float,
                    with_shapes: bool = True) -> dict[str, Any]:
  """``benchmarks/reference/galore_torch_speed.py`` in its own process, on the
  model's parameter shapes and (``with_shapes``) on every shape set."""
  tables = {'model': _split_shapes(model_params)}
  ranks = {'model': setup.rank}
  for set_name, (dim, ffn_dim, rank) in (
      setup.shape_sets.items() if with_shapes else ()):
    tables[set_name] = _split_shapes(block_shapes(dim, ffn_dim,
                                                  setup.shape_layers,
                                                  setup.stacked))
    ranks[set_name] = rank
  config = {'tables': tables, 'rank': ranks,
            'refresh_every': setup.refresh_every,
            'warmup': setup.warmup_steps, 'timed': setup.timed_steps, 'seed': 0}
  try:
    done = subprocess.run(
        [sys.executable, '-m', 'benchmarks.reference.galore_torch_speed'],
        input=json.dumps(config), capture_output=True, text=True, check=False,
        timeout=timeout, cwd=pathlib.Path(__file__).resolve().parents[1])
  except subprocess.TimeoutExpired:
    return {'error': f'timed out after {timeout:.0f} s'}
  if done.returncode != 0:
    return {'error': done.stderr[-2000:]}
  return json.loads(done.stdout)


def _jax_rows(result: dict[str, Any], table: str) -> dict[str, Any]:
  """The JAX rows measured on the shapes of torch table ``table``."""
  return (result['model'] if table == 'model'
          else result['shapes'].get(table, {}))


def add_torch_ratios(result: dict[str, Any]) -> None:
  """``vs_galore_torch``: each JAX row's optimizer-only times over
  galore-torch's on the same shapes (and ``torch_adamw``'s over it)."""
  reference = result.get('torch_reference') or {}
  for table, torch_rows in (reference.get('tables') or {}).items():
    galore = torch_rows['galore_torch']
    for row in list(_jax_rows(result, table).values()) + [
        torch_rows['torch_adamw']]:
      if 'error' in row:
        continue
      timing = row.get('optimizer_only', row)
      row['vs_galore_torch'] = _timing_ratios(
          {'optimizer_only': timing}, {'optimizer_only': galore},
          'optimizer_only')


# ----------------------------------------------------------------------------
# Markdown.


def _ms(value) -> str:
  return '–' if value is None else f'{value:.2f}'


def _times(value) -> str:
  if value is None:
    return '–'
  return f'{value:.3f}×' if value < 0.1 else f'{value:.2f}×'


def _mib(value) -> str:
  return '–' if value is None else f'{value / 2**20:.2f}'


def _rank(name, row) -> str:
  return '–' if name == BASELINE else str(row['rank'])


def _analytic_cell(row) -> str:
  analytic = row.get('analytic_state_bytes')
  if not analytic:
    return 'no formula'
  return 'equal' if row['state_bytes'] == analytic else (
      f'{row["state_bytes"] / analytic:.4f}×')


def _timing_cells(row, key) -> list[str]:
  timing = row[key]
  refresh = (f'{timing["refresh_steps"]}/{timing["timed_steps"]}')
  if timing.get('overdue_refresh_leaves'):
    refresh += f' ({timing["overdue_refresh_leaves"]} stuck)'

  return [_ms(timing['steady_median_ms']), _ms(timing['refresh_median_ms']),
          refresh, _ms(timing['mean_ms']),
          _times(row.get('vs_adamw', {}).get(key, {}).get('amortised_mean')),
          _times(row.get('vs_optax_galore', {}).get(key, {}).get(
              'amortised_mean'))]


def _state_cells(row) -> list[str]:
  return [_mib(row['state_bytes']),
          _times(row.get('vs_adamw', {}).get('state_bytes')),
          _analytic_cell(row)]


_TIMING_HEADER = ('steady median ms', 'refresh median ms', 'refresh steps',
                  'mean ms', 'mean × adamw', 'mean × optax galore')


def _table(header, rows) -> list[str]:
  lines = ['| ' + ' | '.join(header) + ' |',
           '|' + '|'.join(['---'] * len(header)) + '|']
  lines += ['| ' + ' | '.join(r) + ' |' for r in rows]
  return lines


def markdown(result: dict[str, Any]) -> str:
  """The JSON result as markdown tables (benchmarks/README.md quotes them)."""
  setup = result['setup']
  model = setup['model']
  load = result.get('load_average') or {}
  lines = [
      '# Speed and memory (generated by benchmarks/speed_memory.py)', '',
      f'* command: `{result["command"]}`',
      f'* date: {result["date"]}; machine: {result["machine"]}; backend '
      f'{result["backend"]} ({result["device_kind"]})',
      '* versions: ' + ', '.join(f'{k} {v}' for k, v in
                                 result['versions'].items()),
      f'* load average (1, 5, 15 min) at start {load.get("start")}, at end '
      f'{load.get("end")}; wall {result["wall_seconds"]:.0f} s',
      f'* model: dim {model["dim"]}, {model["layers"]} layers, ffn '
      f'{model["ffn_dim"]}, {setup["params"]:,} params; batch '
      f'{setup["batch_size"]} x {setup["seq_len"]} tokens; rank '
      f'{setup["rank"]} (unless fixed by the method); refresh every '
      f'{setup["refresh_every"]}; {setup["warmup_steps"]} warm-up + '
      f'{setup["timed_steps"]} timed steps; BLAS threads '
      f'{setup["blas_threads"]}; layers '
      f'{"stacked" if setup.get("stacked_layers") else "one leaf each"}',
      '',
      'Times are medians in milliseconds. "steady" excludes the steps on '
      'which some basis changed ("refresh steps": such steps / timed steps; '
      'with staggered refreshes some leaf refreshes on most steps, and the '
      'online basis moves on every step, so there is no steady step). '
      '"mean" is over all timed steps (refreshes amortised); its ratios '
      'are to optax.adamw and optax.contrib.galore. State MiB is '
      '`subspace_optax.state_bytes`; "vs analytic" compares it with the '
      "method's `subspace_optax.<method>_bytes` formula. \"N stuck\": N "
      'leaves whose refresh was still overdue at the end: their refresh '
      'result was not finite, so it was discarded and retried on every step '
      '(the basis never changed).', '',
      '## Train step (value_and_grad + update + apply_updates)', '']
  rows = []
  for name, row in result['model'].items():
    if 'error' in row:
      rows.append([name, 'error: ' + row['error'][:80].replace('|', '/')]
                  + [''] * 10)
      continue
    rows.append([name, _rank(name, row)] + _timing_cells(row, 'train_step')
                + _state_cells(row)
                + [_ms(row['optimizer_only']['steady_median_ms']
                       or row['optimizer_only']['median_ms']),
                   _mib(row.get('peak_device_bytes'))])
  lines += _table(('method', 'rank') + _TIMING_HEADER
                  + ('state MiB', 'state × adamw', 'vs analytic',
                     'optimizer-only ms', 'peak device MiB'), rows)
  lines += ['', '## Optimizer only (update + apply_updates), model '
            'gradients', '']
  rows = [[name, _rank(name, row)] + _timing_cells(row, 'optimizer_only')
          for name, row in result['model'].items() if 'error' not in row]
  lines += _table(('method', 'rank') + _TIMING_HEADER, rows)
  for set_name, shape_rows in result['shapes'].items():
    if not shape_rows:
      continue
    shape = setup['shape_sets'][set_name]
    lines += ['', f'## Optimizer only, {set_name}: {shape["layers"]} block(s) '
              f'of dim {shape["dim"]}, ffn {shape["ffn_dim"]}, rank '
              f'{shape["rank"]}', '']
    rows = []
    for name, row in shape_rows.items():
      if 'error' in row:
        continue
      rows.append([name, _rank(name, row)]
                  + _timing_cells(row, 'optimizer_only') + _state_cells(row))
    lines += _table(('method', 'rank') + _TIMING_HEADER
                    + ('state MiB', 'state × adamw', 'vs analytic'), rows)
  lines += _torch_markdown(result)
  lines += _goals_markdown(result.get('goals') or {})
  return '\n'.join(lines) + '\n'


def _goals_markdown(goals_by_method: dict[str, Any]) -> list[str]:
  rows = []
  for name, entry in goals_by_method.items():
    if not isinstance(entry, dict):
      continue
    meets = entry['meets']
    mark = lambda key: {True: 'yes', False: 'no', None: '–'}[meets[key]]
    rows.append([
        name,
        f'{_times(entry["train_step_amortised_vs_adamw"])} '
        f'({mark("train_step_le_1.05x_adamw")})',
        f'{_times(entry["refresh_over_steady_train_step"])} '
        f'({mark("refresh_le_3x_step")})',
        f'{_times(entry["optimizer_only_vs_roofline"])} '
        f'({mark("optimizer_only_le_2x_roofline")})',
        f'{_times(entry["peak_device_bytes_vs_adamw"])} '
        f'({mark("peak_memory_below_adamw")})'])
  if not rows:
    return []
  return ['', f'## Goals (evaluated on {goals_by_method["evaluated_on"]})', '',
          'Train step with refreshes amortised ≤ 1.05× AdamW; largest refresh '
          'step ≤ 3× the steady step; optimizer-only steady step ≤ 2× the '
          'roofline `(2 x state bytes + 3 x param bytes) / HBM bandwidth`; '
          'peak device memory below AdamW\'s.', ''] + _table(
              ('method', 'train step × adamw', 'refresh × steady step',
               'optimizer-only × roofline', 'peak memory × adamw'), rows)


def _torch_markdown(result: dict[str, Any]) -> list[str]:
  reference = result.get('torch_reference')
  if not reference:
    return []
  lines = ['', '## Optimizer only against galore-torch (PyTorch, same device)',
           '']
  if 'error' in reference:
    return lines + ['error: ' + reference['error'][-500:]]
  lines += [f'torch {reference["versions"]["torch"]} on {reference["device"]}; '
            'galore-torch 1.0 `GaLoreAdamW` (`proj_type="std"`, scale 0.25, '
            'same rank and refresh period; bitsandbytes: '
            f'{reference["galore_torch_bitsandbytes"]}); `torch.optim.AdamW` '
            'default (foreach). "× galore-torch" is mean ms over galore-torch\'s '
            'mean ms, and the refresh step\'s max over galore-torch\'s.', '']
  for table, torch_rows in reference['tables'].items():
    ours = _jax_rows(result, table)
    rows = []
    for name, row in [(f'{n} (torch)', r) for n, r in torch_rows.items()] + [
        (n, r) for n, r in ours.items() if 'error' not in r]:
      timing = row.get('optimizer_only', row)
      vs = row.get('vs_galore_torch', {})
      rows.append([name, _ms(timing['steady_median_ms']),
                   _ms(timing['refresh_max_ms']), _ms(timing['mean_ms']),
                   _times(vs.get('amortised_mean')),
                   _times(vs.get('refresh_max')), _mib(row['state_bytes'])])
    lines += [f'### {table}', '']
    lines += _table(('method', 'steady median ms', 'refresh max ms', 'mean ms',
                     'mean × galore-torch', 'refresh max × galore-torch',
                     'state MiB'), rows) + ['']
  return lines


# ----------------------------------------------------------------------------
# The benchmark.


def _bandwidth(args) -> Optional[float]:
  if args.hbm_bandwidth_gbs:
    return args.hbm_bandwidth_gbs
  kind = jax.devices()[0].device_kind
  for name, gbs in HBM_BANDWIDTH_GBS.items():
    if name in kind:
      return gbs
  return None


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


def _load_average() -> Optional[list[float]]:
  return [round(x, 2) for x in os.getloadavg()] if hasattr(
      os, 'getloadavg') else None


def run(args, argv: Sequence[str]) -> dict[str, Any]:
  began_wall, began_cpu = time.perf_counter(), time.process_time()
  load_at_start = _load_average()
  setup = make_setup(args)
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
    names = [n for n in (QUICK_METHODS if args.quick else DEFAULT_METHODS)
             if n in table]
  bandwidth = _bandwidth(args)
  corpus = data_lib.load_corpus(None, max_bytes=setup.max_bytes,
                                seq_len=setup.seq_len)

  # The model's parameters: their count, and their shapes for galore-torch.
  model_params = None if args.raw else quality.init_params(
      _quality_setup(setup), 0)[1]
  reference = None
  if args.torch_reference and not args.raw:
    print('[speed_memory] galore-torch', file=sys.stderr, flush=True)
    reference = torch_reference(setup, model_params, args.torch_timeout,
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
    model_rows[name] = _safely(run_method, name, table[name], setup, corpus,
                               bandwidth)
    if not args.skip_shapes:
      for s, row in _safely(run_shapes, name, table[name], setup,
                            bandwidth).items():
        if s == 'error':
          for set_name in shape_rows:
            shape_rows[set_name][name] = {'error': row}
        else:
          shape_rows[s][name] = row
  if args.raw:
    return {'model': model_rows, 'shapes': shape_rows}

  add_ratios(model_rows)
  for rows in shape_rows.values():
    add_ratios(rows)
  on_gpu = jax.default_backend() == 'gpu'
  param_count = sum(int(np.prod(x.shape))
                    for x in jax.tree.leaves(model_params))
  result = {
      'benchmark': 'speed_memory',
      'date': args.date or datetime.date.today().isoformat(),
      'machine': args.machine or f'{os.cpu_count()} CPU cores',
      'command': 'python -m benchmarks.speed_memory' + (
          ' ' + shlex.join(argv) if argv else ''),
      'versions': {'python': platform.python_version(), 'jax': jax.__version__,
                   'optax': optax.__version__,
                   'flax': getattr(__import__('flax'), '__version__', None)},
      'backend': jax.default_backend(),
      'device_kind': jax.devices()[0].device_kind,
      'load_average': {'start': load_at_start, 'end': _load_average()},
      'setup': {
          'model': dataclasses.asdict(setup.model_config),
          'params': param_count, 'batch_size': setup.batch_size,
          'seq_len': setup.seq_len, 'rank': setup.rank,
          'refresh_every': setup.refresh_every,
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
      'goals': goals(model_rows, on_gpu),
      'wall_seconds': time.perf_counter() - began_wall,
      'cpu_seconds': time.process_time() - began_cpu,
  }
  add_torch_ratios(result)
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
  p.add_argument('--refresh-every', type=int, default=20)
  p.add_argument('--warmup-steps', type=int, default=2,
                 help='untimed steps after compilation (includes refresh 0)')
  p.add_argument('--timed-steps', type=int, default=None,
                 help='default 2 x refresh_every')
  p.add_argument('--shape-layers', type=int, default=1,
                 help='blocks per standalone shape set')
  p.add_argument('--shape-sets', default=None,
                 help=f'comma-separated subset of {",".join(SHAPE_SETS)}; '
                 f'default: all on a GPU, {",".join(CPU_SHAPE_SETS)} on a CPU')
  p.add_argument('--skip-shapes', action='store_true')
  p.add_argument('--scan-layers', action='store_true',
                 help='stack the layers (one leaf per weight, batched '
                 'refreshes), in the model and the shape sets; '
                 'optax.contrib.galore refuses such params')
  p.add_argument('--hbm-bandwidth-gbs', type=float, default=None,
                 help='HBM bandwidth for the roofline; default by device kind '
                 f'({HBM_BANDWIDTH_GBS}), none on CPU')
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


def _blas_threads(threads: int):
  """A context limiting OpenBLAS threads (no-op if 0 or no threadpoolctl)."""
  try:
    import scipy.linalg  # pylint: disable=import-outside-toplevel,unused-import
    import threadpoolctl  # pylint: disable=import-outside-toplevel
  except ImportError:
    threads = 0
  if threads <= 0:
    return contextlib.nullcontext()
  return threadpoolctl.threadpool_limits(limits=threads, user_api='blas')


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
  argv = list(sys.argv[1:] if argv is None else argv)
  args = parse_args(argv)
  with _blas_threads(args.blas_threads):
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
      pathlib.Path(out).with_suffix('.md').write_text(markdown(result))
    # The progress files of run() (kept if the run is cut off) are in `out` now.
    for progress in ('.partial.json', '.torch.json'):
      pathlib.Path(out).with_suffix(progress).unlink(missing_ok=True)
  return result


if __name__ == '__main__':
  main()
