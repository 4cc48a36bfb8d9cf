"""Quality benchmark: validation loss of each low-rank method relative to AdamW.

Every method trains the byte-level LLaMA-style model of ``examples/lm`` from
the same initial weights on the same batches (the CPython standard library's
sources, nothing downloaded), then the final validation loss is divided by
``optax.adamw``'s, and the optimizer-state bytes (``subspace_optax.state_bytes``)
by AdamW's::

  python -m benchmarks.quality                       # default CPU run
  python -m benchmarks.quality --seeds 0,1,2         # median over seeds
  python -m benchmarks.quality --methods adamw,galore,frugal \\
      --lr-multipliers 1/3,1,3                       # small lr sweep
  python -m benchmarks.quality --quick               # smoke test (seconds)

Protocol (details in ``benchmarks/README.md``, section "Quality"):

* Only the transformer block matrices (attention and MLP kernels) are
  projected, as in GaLore; the embedding, the output head and the norms keep
  full Adam (``examples.lm.optimizers.block_matrices``).
* Every run is ``clip_by_global_norm(1.0)`` then the method, with the GaLore
  LLaMA schedule (10 % linear warm-up, cosine decay to 10 % of the peak) and no
  weight decay.
* Learning rates follow each paper's recipe relative to AdamW's (``LR_RATIO``:
  the GaLore family, 0.01 with ``scale=0.25`` against AdamW's 0.001, is 10x;
  FRUGAL and DCT-AdamW, whose subspace step has scale 1, are 1x; Q-GaLore's
  60M recipe 0.015 is 15x). ``--lr-multipliers`` multiplies every method's
  rate by each value and keeps, per method, the one with the lowest median
  validation loss (the same number of runs for every method).
* Equal optimizer-state budget: the budget is ``subspace_optax.galore`` at
  rank ``dim // 4``. Methods marked ``match_budget`` get the rank whose state
  bytes are the largest within that budget (e.g. FRUGAL and Fira keep their reference
  side, where a rank costs more bytes, so they get a smaller rank). GaLore
  itself and ``optax.contrib.galore`` run at rank ``dim // 4``, APOLLO-Mini at
  rank 1 (its definition). A matched rank is the largest whose state is not
  above the budget, so no challenger gets more memory than GaLore.

Output: one JSON object on stdout, also written to ``--out`` (and a markdown
table to ``--markdown``).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import fractions
import json
import math
import os
import pathlib
import platform
import shlex
import statistics
import sys
import time
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import subspace_optax as so
from examples.lm import data as data_lib
from examples.lm import model as model_lib
from examples.lm import optimizers as lm_optimizers

DEFAULT_OUT = 'benchmarks/results/quality_cpu.json'
DEFAULT_MARKDOWN = 'benchmarks/results/quality_cpu.md'
BASELINE = 'adamw'
BUDGET_METHOD = 'galore'

# ----------------------------------------------------------------------------
# Methods.


@dataclasses.dataclass(frozen=True)
class Method:
  """One row of the benchmark.

  ``build(learning_rate, rank, refresh_every, seed)`` returns the method's
  optax transform (without the clipping, added for every method).
  ``lr_ratio`` is its peak learning rate over AdamW's. ``rank``: ``'quarter'``
  (``dim // 4``), ``'match_budget'`` (the largest rank whose state fits in
  GaLore's at ``dim // 4``), an int (fixed), or None (full rank).
  ``requires`` names the ``subspace_optax`` attribute the row needs; rows whose
  preset is not there are reported as unavailable.
  """

  build: Callable[..., optax.GradientTransformation]
  lr_ratio: float
  rank: Any
  description: str
  requires: Optional[str] = None


def _blocks():
  return dict(dimension_numbers=lm_optimizers.block_matrices)


def _adamw(learning_rate, rank, refresh_every, seed):
  del rank, refresh_every, seed
  return optax.adamw(learning_rate, b1=0.9, b2=0.999, eps=1e-8,
                     weight_decay=0.0)


def _frugal(basis):
  return lambda lr, r, t, s: so.frugal(
      lr, rank=r, refresh_every=t, basis=basis, seed=s, **_blocks())


def _block_matrix_mask(params):
  return jax.tree_util.tree_map_with_path(lm_optimizers.is_block_matrix, params)


# AuON's runs use lr 0.02 (arXiv 2509.24320), against AdamW's 3e-3 here.
AUON_LR_RATIO = 0.02 / 3e-3


def _auon(newton_schulz_steps):
  """AuON on the block matrices at its own rate; AdamW at AdamW's elsewhere."""

  def build(learning_rate, rank, refresh_every, seed):
    del rank, refresh_every, seed
    adam_rate = lambda step: learning_rate(step) / AUON_LR_RATIO
    return so.auon(learning_rate, newton_schulz_steps=newton_schulz_steps,
                   matrix_mask=_block_matrix_mask,
                   adam_learning_rate=adam_rate)

  return build


def _optax_galore(learning_rate, rank, refresh_every, seed):
  del seed
  return lm_optimizers.REGISTRY['optax_galore'].build(
      learning_rate=learning_rate, rank=rank, refresh_every=refresh_every,
      weight_decay=0.0)


METHODS: dict[str, Method] = {
    'adamw': Method(
        _adamw, 1.0, None,
        'optax.adamw, b=(0.9, 0.999), eps 1e-8 (arXiv 1711.05101)'),
    'galore': Method(
        lambda lr, r, t, s: so.galore(
            lr, rank=r, refresh_every=t, scale=0.25, seed=s, **_blocks()),
        10.0, 'quarter',
        'subspace_optax.galore, SVD basis, compact side, scale 0.25 '
        '(arXiv 2403.03507)', 'galore'),
    'optax_galore': Method(
        _optax_galore, 10.0, 'quarter',
        'optax.contrib.galore, scale 0.25, same rank as galore; Adam on the '
        'other leaves (optax.partition)'),
    'frugal': Method(
        _frugal('svd'), 1.0, 'match_budget',
        'subspace_optax.frugal: Adam on an SVD subspace (reference side, '
        'moments reset at refresh) + signSGD on the residual, scale 1 '
        '(arXiv 2411.07837)', 'frugal'),
    'fira': Method(
        lambda lr, r, t, s: so.fira(
            lr, rank=r, refresh_every=t, scale=0.25, seed=s, **_blocks()),
        10.0, 'match_budget',
        'subspace_optax.fira: GaLore + norm-scaled residual + limiter 1.01, '
        'reference side, scale 0.25 (arXiv 2410.01623)', 'fira'),
    'online_subspace_descent': Method(
        lambda lr, r, t, s: so.online_subspace_descent(
            lr, rank=r, inner='adam', seed=s, **_blocks()),
        10.0, 'match_budget',
        'subspace_optax.online_subspace_descent: Adam inner, basis moved '
        'every step by Adam on the online-PCA loss (lr 0.005), scale 0.25 '
        '(arXiv 2408.12857)', 'online_subspace_descent'),
    'apollo': Method(
        lambda lr, r, t, s: so.apollo(
            lr, rank=r, refresh_every=t, seed=s, **_blocks()),
        10.0, 'match_budget',
        'subspace_optax.apollo: channel-wise scaled raw gradient, seeded '
        'Gaussian sketch, limiter 1.01 (arXiv 2412.05270)', 'apollo'),
    'apollo_mini': Method(
        lambda lr, r, t, s: so.apollo_mini(
            lr, refresh_every=t, seed=s, **_blocks()),
        10.0, 1,
        'subspace_optax.apollo_mini: rank 1, tensor-wise scale, scale 128 '
        '(arXiv 2412.05270)', 'apollo_mini'),
    'q_galore': Method(
        lambda lr, r, t, s: so.q_galore(
            lr, rank=r, refresh_every=t, scale=0.25, seed=s, **_blocks()),
        15.0, 'match_budget',
        'subspace_optax.q_galore: INT4 basis, lazy per-layer refresh, '
        '8-bit moments, scale 0.25 (arXiv 2407.08296)', 'q_galore'),
    'golore': Method(
        lambda lr, r, t, s: so.golore(
            lr, rank=r, refresh_every=t, scale=0.25, seed=s, **_blocks()),
        10.0, 'match_budget',
        'subspace_optax.golore: random orthonormal basis, scale 0.25 '
        '(arXiv 2410.11289)', 'golore'),
    'i3s': Method(
        lambda lr, r, t, s: so.i3s(
            lr, rank=r, refresh_every=t, scale=0.25, seed=s, **_blocks()),
        10.0, 'match_budget',
        'subspace_optax.i3s: singular vectors sampled by sigma, scale 0.25 '
        '(arXiv 2502.05790)', 'i3s'),
    'galore_8bit_moments': Method(
        lambda lr, r, t, s: optax.chain(
            so.low_rank(so.quantize_moments(so.scale_by_torch_adam()),
                        rank=r, refresh=t, basis='svd', scale=0.25, seed=s,
                        **_blocks()),
            optax.scale_by_learning_rate(lr)),
        10.0, 'quarter',
        'galore (same pipeline) with its Adam moments in 8 bits '
        '(subspace_optax.quantize_moments, arXiv 2110.02861)',
        'quantize_moments'),
    'galore_momentum_reset': Method(
        lambda lr, r, t, s: so.galore(
            lr, rank=r, refresh_every=t, scale=0.25, on_refresh='reset',
            seed=s, **_blocks()),
        10.0, 'quarter',
        'subspace_optax.galore with the moments zeroed at every refresh '
        '(momentum reset, arXiv 2505.22922)', 'galore'),
    'frugal_random': Method(
        _frugal('random'), 1.0, 'match_budget',
        'subspace_optax.frugal, random orthonormal subspace '
        '(arXiv 2411.07837)', 'frugal'),
    'frugal_columns': Method(
        _frugal('columns'), 1.0, 'match_budget',
        'subspace_optax.frugal, random columns (indices only, no Q) '
        '(arXiv 2411.07837)', 'frugal'),
    'frugal_blocks': Method(
        _frugal('blocks'), 1.0, 0.25,
        'subspace_optax.frugal, blockwise (BAdam-like): a quarter of the '
        'matrices active per period (density 0.25, the paper\'s default); '
        'moments stay full size (static shapes) (arXiv 2411.07837)',
        'frugal'),
    'online_subspace_descent_lion': Method(
        lambda lr, r, t, s: so.online_subspace_descent(
            lr, rank=r, inner='lion', seed=s, **_blocks()),
        10.0 / 3, 'match_budget',
        'subspace_optax.online_subspace_descent, Lion inner; lr 3x below the '
        'Adam-inner row (Lion paper, arXiv 2302.06675: 3-10x below AdamW)',
        'online_subspace_descent'),
    'adamp': Method(
        lambda lr, r, t, s: so.adamp(lr), 1.0, None,
        'subspace_optax.adamp: radial component removed on scale-invariant '
        'weights (arXiv 2006.08217), full rank', 'adamp'),
    'sgdp': Method(
        lambda lr, r, t, s: so.sgdp(lr, momentum=0.9, nesterov=True),
        100.0, None,
        'subspace_optax.sgdp, Nesterov momentum 0.9; lr 100x AdamW\'s (SGD\'s '
        '0.1 against Adam\'s 1e-3, the usual ImageNet pair; arXiv 2006.08217), '
        'full rank', 'sgdp'),
    'auon': Method(
        _auon(0), AUON_LR_RATIO, None,
        'subspace_optax.auon on the block matrices (lr 0.02 as in its runs), '
        'AdamW elsewhere (arXiv 2509.24320)', 'auon'),
    'auon_hybrid': Method(
        _auon(1), AUON_LR_RATIO, None,
        'subspace_optax.auon with one Newton-Schulz step first (the hybrid)',
        'auon'),
    'dct_adamw': Method(
        lambda lr, r, t, s: so.dct_adamw(
            lr, rank=r, refresh_every=t, seed=s, **_blocks()),
        1.0, 'match_budget',
        'subspace_optax.dct_adamw: DCT columns chosen by l1 alignment, '
        'moments transported, scale 1 (arXiv 2505.17967)', 'dct_adamw'),
}

QUICK_METHODS = ('adamw', 'galore')


def available_methods() -> list[str]:
  return [name for name, m in METHODS.items()
          if m.requires is None or hasattr(so, m.requires)]


# ----------------------------------------------------------------------------
# Set-up.


@dataclasses.dataclass(frozen=True)
class Setup:
  """Everything shared by the runs."""

  model_config: model_lib.Config
  steps: int
  batch_size: int
  seq_len: int
  eval_batches: int
  refresh_every: int
  adamw_lr: float
  max_bytes: int


def make_setup(args) -> Setup:
  if args.quick:
    config = model_lib.Config(dim=32, layers=2, heads=2, ffn_dim=64,
                              max_seq_len=32)
    return Setup(config, steps=args.steps or 10, batch_size=4, seq_len=32,
                 eval_batches=2, refresh_every=5, adamw_lr=args.adamw_lr,
                 max_bytes=200_000)
  config = model_lib.config_from_preset(args.model, scan_layers=False)
  return Setup(config, steps=args.steps or 300, batch_size=args.batch_size,
               seq_len=args.seq_len,
               eval_batches=args.eval_batches,
               refresh_every=args.refresh_every, adamw_lr=args.adamw_lr,
               max_bytes=args.max_bytes)


def init_params(setup: Setup, seed: int):
  """``(graphdef, params)``: params as plain arrays (``nnx.as_pure``)."""
  model = model_lib.Llama(setup.model_config, rngs=nnx.Rngs(seed))
  graphdef, state = nnx.split(model)
  return graphdef, nnx.as_pure(state)


def state_bytes_of(tx: optax.GradientTransformation, params) -> int:
  return int(so.state_bytes(jax.eval_shape(tx.init, params)))


def budget_rank(build: Callable[[int], optax.GradientTransformation],
                params, budget: int, max_rank: int) -> tuple[int, int]:
  """The largest rank in ``[1, max_rank]`` whose state fits in ``budget`` bytes.

  State bytes grow with the rank, so this is a bisection. Returns
  ``(rank, bytes)``; rank 1 if even that exceeds the budget.
  """
  size = lambda rank: state_bytes_of(build(rank), params)
  if size(max_rank) <= budget:
    return max_rank, size(max_rank)
  low, high = 1, max_rank  # bytes(high) > budget
  if size(low) > budget:
    return low, size(low)
  while high - low > 1:  # bytes(low) <= budget < bytes(high)
    middle = (low + high) // 2
    if size(middle) <= budget:
      low = middle
    else:
      high = middle
  return low, size(low)


def resolve_ranks(names: Sequence[str], setup: Setup,
                  params) -> tuple[dict[str, Optional[int]], int]:
  """Rank of each method and the state budget (bytes of GaLore at dim/4)."""
  quarter = setup.model_config.dim // 4
  schedule = lm_optimizers.warmup_cosine(1e-3, setup.steps)  # as in train()
  build_of = lambda name: lambda r: optax.chain(
      optax.clip_by_global_norm(1.0),
      METHODS[name].build(schedule, r, setup.refresh_every, 0))
  budget = state_bytes_of(build_of(BUDGET_METHOD)(quarter), params)
  ranks = {}
  for name in names:
    rule = METHODS[name].rank
    if rule is None or isinstance(rule, (int, float)):
      ranks[name] = rule
    elif rule == 'quarter':
      ranks[name] = quarter
    elif rule == 'match_budget':
      ranks[name], _ = budget_rank(build_of(name), params, budget,
                                   setup.model_config.dim)
    else:
      raise ValueError(f'Unknown rank rule {rule!r} for {name}.')
  return ranks, budget


# ----------------------------------------------------------------------------
# One run.


def train(name: str, setup: Setup, corpus: data_lib.Corpus, *, rank, lr: float,
          seed: int) -> dict[str, Any]:
  """Train ``setup.steps`` steps; final validation loss, state bytes, times."""
  wall, cpu = time.perf_counter(), time.process_time()
  graphdef, params = init_params(setup, seed)
  schedule = lm_optimizers.warmup_cosine(lr, setup.steps)
  tx = optax.chain(
      optax.clip_by_global_norm(1.0),
      METHODS[name].build(schedule, rank, setup.refresh_every, seed))
  opt_state = tx.init(params)
  state_size = int(so.state_bytes(opt_state))

  def loss_fn(params, inputs, targets):
    return model_lib.cross_entropy(nnx.merge(graphdef, params)(inputs), targets)

  @jax.jit
  def train_step(params, opt_state, inputs, targets):
    loss, grads = jax.value_and_grad(loss_fn)(params, inputs, targets)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  eval_step = jax.jit(loss_fn)
  losses = []
  for step in range(setup.steps):
    inputs, targets = data_lib.batch_at(
        corpus.train, seed=seed, step=step, batch_size=setup.batch_size,
        seq_len=setup.seq_len)
    params, opt_state, loss = train_step(params, opt_state, inputs, targets)
    losses.append(loss)
  losses = [float(l) for l in losses]
  val_batches = data_lib.eval_batches(
      corpus.val, batches=setup.eval_batches, batch_size=setup.batch_size,
      seq_len=setup.seq_len)
  val_loss = float(np.mean([float(eval_step(params, *b)) for b in val_batches]))
  return {
      'val_loss': val_loss,
      'train_loss_last10': float(np.mean(losses[-10:])),
      'finite': bool(math.isfinite(val_loss) and all(map(math.isfinite, losses))),
      'opt_state_bytes': state_size,
      'wall_seconds': time.perf_counter() - wall,
      'cpu_seconds': time.process_time() - cpu,
  }


# ----------------------------------------------------------------------------
# The benchmark.


def _median(values):
  values = [v for v in values if v is not None and math.isfinite(v)]
  return statistics.median(values) if values else None


def run(args) -> dict[str, Any]:
  began_wall, began_cpu = time.perf_counter(), time.process_time()
  setup = make_setup(args)
  seeds = [int(s) for s in args.seeds.split(',')]
  multipliers = [float(fractions.Fraction(m))
                 for m in args.lr_multipliers.split(',')]
  available = available_methods()
  if args.methods:
    names = [n.strip() for n in args.methods.split(',') if n.strip()]
    unknown = [n for n in names if n not in METHODS]
    if unknown:
      raise SystemExit(f'error: unknown method(s) {unknown}; '
                       f'known: {", ".join(METHODS)}')
  else:
    names = list(QUICK_METHODS) if args.quick else list(METHODS)
  unavailable = [n for n in names if n not in available]
  names = [n for n in names if n in available]
  if BASELINE not in names:
    names.insert(0, BASELINE)

  corpus = data_lib.load_corpus(None, max_bytes=setup.max_bytes,
                                seq_len=setup.seq_len)
  _, params = init_params(setup, seeds[0])
  ranks, budget = resolve_ranks(names, setup, params)
  param_count = sum(int(x.size) for x in jax.tree.leaves(params))

  rows = []
  for name in names:
    method = METHODS[name]
    sweep = []
    for multiplier in multipliers:
      lr = setup.adamw_lr * method.lr_ratio * multiplier
      runs = []
      for seed in seeds:
        result = train(name, setup, corpus, rank=ranks[name], lr=lr, seed=seed)
        result['seed'] = seed
        runs.append(result)
        print(f'[quality] {name:>24} lr={lr:<8g} seed={seed} '
              f'val={result["val_loss"]:.4f} cpu={result["cpu_seconds"]:.0f}s '
              f'wall={result["wall_seconds"]:.0f}s', file=sys.stderr)
      sweep.append({'lr_multiplier': multiplier, 'learning_rate': lr,
                    'median_val_loss': _median([r['val_loss'] for r in runs]),
                    'runs': runs})
    finite = [s for s in sweep if s['median_val_loss'] is not None]
    best = min(finite, key=lambda s: s['median_val_loss']) if finite else sweep[0]
    rows.append({
        'method': name, 'description': method.description,
        'rank': ranks[name], 'learning_rate': best['learning_rate'],
        'lr_ratio_to_adamw': method.lr_ratio * best['lr_multiplier'],
        'lr_multiplier': best['lr_multiplier'],
        'val_loss': best['median_val_loss'],
        'opt_state_bytes': best['runs'][0]['opt_state_bytes'],
        'runs': best['runs'],
        'sweep': [{k: s[k] for k in ('lr_multiplier', 'learning_rate',
                                     'median_val_loss')} for s in sweep]
                 if len(multipliers) > 1 else None,
    })

  baseline = next(r for r in rows if r['method'] == BASELINE)
  baseline_by_seed = {r['seed']: r['val_loss'] for r in baseline['runs']}
  galore = next((r for r in rows if r['method'] == BUDGET_METHOD), None)
  for row in rows:
    # Ratio per seed (same seed: same init and batches), then the median.
    row['val_loss_ratio_to_adamw'] = _median(
        [r['val_loss'] / baseline_by_seed[r['seed']] for r in row['runs']])
    row['state_ratio_to_adamw'] = (
        row['opt_state_bytes'] / baseline['opt_state_bytes'])
    row['state_ratio_to_galore'] = (
        None if galore is None
        else row['opt_state_bytes'] / galore['opt_state_bytes'])
  result = {
      'benchmark': 'quality',
      'date': args.date or datetime.date.today().isoformat(),
      'machine': args.machine or f'{os.cpu_count()} CPU cores',
      'command': args.command,
      'versions': {'python': platform.python_version(), 'jax': jax.__version__,
                   'optax': optax.__version__,
                   'flax': getattr(__import__('flax'), '__version__', None)},
      'backend': jax.default_backend(),
      'setup': {
          'model': dataclasses.asdict(setup.model_config),
          'params': param_count, 'steps': setup.steps,
          'batch_size': setup.batch_size, 'seq_len': setup.seq_len,
          'tokens': setup.steps * setup.batch_size * setup.seq_len,
          'eval_batches': setup.eval_batches,
          'eval_tokens': setup.eval_batches * setup.batch_size * setup.seq_len,
          'refresh_every': setup.refresh_every, 'adamw_lr': setup.adamw_lr,
          'schedule': 'warmup 10% then cosine to 10% of peak',
          'clip_by_global_norm': 1.0, 'weight_decay': 0.0,
          'seeds': seeds, 'lr_multipliers': multipliers,
          'corpus': corpus.description, 'corpus_fingerprint': corpus.fingerprint,
          'projected': 'transformer block kernels (attention, MLP)',
          'state_budget_bytes': budget,
          'state_budget': f'{BUDGET_METHOD} at rank dim//4 = '
                          f'{setup.model_config.dim // 4}',
      },
      'rows': rows,
      'unavailable': unavailable,
      'bars': bars(rows),
      'wall_seconds': time.perf_counter() - began_wall,
      'cpu_seconds': time.process_time() - began_cpu,
  }
  return result


def bars(rows) -> dict[str, Any]:
  """The issue's quality bars, evaluated on the medians."""
  by_name = {r['method']: r for r in rows}
  out = {}
  galore = by_name.get(BUDGET_METHOD)
  if galore is not None and galore['val_loss_ratio_to_adamw'] is not None:
    ratio = galore['val_loss_ratio_to_adamw']
    out['galore_within_3pct_of_adamw'] = {
        'ratio': ratio, 'bound': 1.03, 'met': bool(ratio <= 1.03)}
    challengers = {}
    for name in ('frugal', 'fira', 'online_subspace_descent'):
      row = by_name.get(name)
      if row is None or row['val_loss_ratio_to_adamw'] is None:
        continue
      challengers[name] = {
          'ratio': row['val_loss_ratio_to_adamw'],
          'state_ratio_to_galore': row['state_ratio_to_galore'],
          # A smaller loss gap to AdamW than GaLore's (a loss below AdamW's
          # is no gap) within GaLore's state budget.
          'closer_than_galore': bool(
              row['val_loss_ratio_to_adamw'] < ratio
              and row['state_ratio_to_galore'] <= 1.0)}
    if challengers:
      out['one_of_frugal_fira_osd_closer_than_galore'] = {
          'galore_ratio': ratio, 'methods': challengers,
          'met': any(c['closer_than_galore'] for c in challengers.values())}
  return out


def markdown(result: dict[str, Any]) -> str:
  s = result['setup']
  m = s['model']
  lines = [
      f"# Quality: final validation loss relative to AdamW",
      '',
      f"{result['date']}, {result['machine']}, backend {result['backend']}, "
      f"jax {result['versions']['jax']}, optax {result['versions']['optax']}.",
      '',
      f"Model: byte-level LLaMA, dim {m['dim']}, {m['layers']} layers, "
      f"{m['heads']} heads, ffn {m['ffn_dim']} ({s['params']:,} params). "
      f"{s['steps']} steps of {s['batch_size']} x {s['seq_len']} bytes "
      f"({s['tokens']:,} tokens), validation on {s['eval_tokens']:,} bytes. "
      f"AdamW peak lr {s['adamw_lr']:g}, refresh every {s['refresh_every']}, "
      f"seeds {s['seeds']}, lr multipliers {s['lr_multipliers']}. "
      f"State budget: {s['state_budget']} = {s['state_budget_bytes']:,} bytes.",
      '',
      f"Command: `{result['command']}`",
      '',
      '| method | rank | lr | lr / AdamW | val loss | val loss / AdamW | '
      'state bytes | state / AdamW | state / GaLore |',
      '| --- | --- | --- | --- | --- | --- | --- | --- | --- |',
  ]
  for r in result['rows']:
    fmt = lambda v, f: '-' if v is None else format(v, f)
    lines.append(
        f"| {r['method']} | {fmt(r['rank'], 'g')} | {r['learning_rate']:.3g} "
        f"| {r['lr_ratio_to_adamw']:g} | {fmt(r['val_loss'], '.4f')} "
        f"| {fmt(r['val_loss_ratio_to_adamw'], '.4f')} "
        f"| {r['opt_state_bytes']:,} | {r['state_ratio_to_adamw']:.3f} "
        f"| {fmt(r['state_ratio_to_galore'], '.3f')} |")
  sweeps = [r for r in result['rows'] if r['sweep']]
  if sweeps:
    lines += ['', 'Learning-rate sweep (median validation loss):', '',
              '| method | ' + ' | '.join(
                  f"x{s['lr_multiplier']:g}" for s in sweeps[0]['sweep']) + ' |',
              '| --- |' + ' --- |' * len(sweeps[0]['sweep'])]
    for r in sweeps:
      lines.append(f"| {r['method']} | " + ' | '.join(
          '-' if s['median_val_loss'] is None
          else f"{s['median_val_loss']:.4f}" for s in r['sweep']) + ' |')
  lines += ['', 'Bars:', '']
  for name, bar in result['bars'].items():
    lines.append(f"- {name}: {'met' if bar['met'] else 'NOT met'} "
                 f"({json.dumps({k: v for k, v in bar.items() if k != 'met'})})")
  if result['unavailable']:
    lines += ['', f"Unavailable presets: {', '.join(result['unavailable'])}"]
  lines += ['', f"Total: {result['cpu_seconds']:.0f} s CPU, "
            f"{result['wall_seconds']:.0f} s wall."]
  return '\n'.join(lines) + '\n'


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(
      prog='python -m benchmarks.quality', description=__doc__.split('\n')[0],
      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  p.add_argument('--methods', default=None,
                 help=f'comma-separated subset of {", ".join(METHODS)} '
                 '(default: all available; adamw is always run)')
  p.add_argument('--model', default='tiny', choices=sorted(model_lib.PRESETS))
  p.add_argument('--steps', type=int, default=None, help='default 300')
  p.add_argument('--batch-size', type=int, default=8)
  p.add_argument('--seq-len', type=int, default=64)
  p.add_argument('--eval-batches', type=int, default=64)
  p.add_argument('--refresh-every', type=int, default=100)
  p.add_argument('--adamw-lr', type=float, default=3e-3,
                 help='AdamW peak lr; other methods use LR_RATIO times it')
  p.add_argument('--max-bytes', type=int, default=data_lib.DEFAULT_MAX_BYTES)
  p.add_argument('--seeds', default='0', help='comma-separated seeds')
  p.add_argument('--lr-multipliers', default='1',
                 help='comma-separated multipliers of every lr (a sweep), e.g. '
                 '1/3,1,3')
  p.add_argument('--quick', action='store_true',
                 help='smoke test: a 2-layer dim-32 model, 10 steps, '
                 f'methods {",".join(QUICK_METHODS)}')
  p.add_argument('--out', default=None,
                 help=f'JSON output (the default run writes {DEFAULT_OUT})')
  p.add_argument('--markdown', default=None,
                 help=f'markdown table (the default run writes '
                 f'{DEFAULT_MARKDOWN})')
  p.add_argument('--date', default=None, help='default: today')
  p.add_argument('--machine', default=None, help="default: '<n> CPU cores'")
  args = p.parse_args(argv)
  args.command = 'python -m benchmarks.quality' + (
      ' ' + shlex.join(argv) if argv else '')
  return args


def is_default_run(args: argparse.Namespace) -> bool:
  """True when every setting that changes the numbers has its default."""
  defaults = parse_args([])
  ignored = ('out', 'markdown', 'date', 'machine', 'command')
  return all(getattr(args, k) == getattr(defaults, k)
             for k in vars(defaults) if k not in ignored)


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
  argv = list(sys.argv[1:] if argv is None else argv)
  args = parse_args(argv)
  result = run(args)
  text = json.dumps(result, indent=2)
  print(text)
  out, table = args.out, args.markdown
  if is_default_run(args):
    out, table = out or DEFAULT_OUT, table or DEFAULT_MARKDOWN
  for path, render in ((out, lambda: text + '\n'),
                       (table, lambda: markdown(result))):
    if path:  # the JSON first: a rendering error never loses a run
      pathlib.Path(path).parent.mkdir(parents=True, exist_ok=True)
      pathlib.Path(path).write_text(render())
  return result


if __name__ == '__main__':
  main()
