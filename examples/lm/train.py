"""Train a byte-level LLaMA-style LM with several optimizers, side by side.

Run from the repository root::

  python -m examples.lm.train                      # tiny model, adamw vs galore
  python -m examples.lm.train --optimizer adamw,galore,optax_galore
  python -m examples.lm.train --model llama_60m --steps 2000 --batch-size 32
  python -m examples.lm.train --no-scan-layers   # blocks as a Python list
  python -m examples.lm.train --per-layer   # update each layer in the backward
  XLA_FLAGS=--xla_force_host_platform_device_count=8 \\
    python -m examples.lm.train --mesh data=2,fsdp=4
  python -m examples.lm.train --mesh data=2,fsdp=4 \\
    --coordinator-address HOST:PORT --num-processes 2 --process-id I  # I=0, 1
  python -m examples.lm.train --data my_notes/ --checkpoint-every 50
  python -m examples.lm.train ... --resume        # continue the latest run

Each optimizer trains in turn on the same batches from the same initial
weights. Every run gets a new directory ``runs/lm/run-<N>`` (or ``--out DIR``):
``metrics.jsonl`` (one record per step), ``summary.json``, ``loss.png`` and
``memory.png`` (unless ``--no-plot``), ``<optimizer>/config.json`` and
``<optimizer>/checkpoints`` (about 14 MB per optimizer for the default model;
``--checkpoint-every 0`` writes none). ``--resume`` continues the latest run
(or ``--out DIR``) bit-exactly.

The optimizers are ``examples/lm/methods.py``: AdamW, GaLore, or any
``subspace_optax`` preset by name with its own defaults (give ``--lr``). The
benchmarks' tuned table of every method (learning-rate ratios, ranks at equal
state bytes, variants) is ``benchmarks/methods.py``, run by
``python -m benchmarks.quality``; this example does not import it.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import math
import os
import pathlib
import sys
import textwrap
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.experimental import multihost_utils

import subspace_optax as so
from examples.lm import checkpoint
from examples.lm import data as data_lib
from examples.lm import model as model_lib
from examples.lm import methods

DEFAULT_OPTIMIZERS = 'adamw,galore'
RUNS_DIR = pathlib.Path('runs/lm')
METRICS_FILE = 'metrics.jsonl'
SUMMARY_FILE = 'summary.json'
TUNED_COMPARISON = 'python -m benchmarks.quality --lr-multipliers 1,2'


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(
      prog='python -m examples.lm.train', description=__doc__.split('\n')[0],
      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  p.add_argument('--optimizer', action='append', default=None,
                 help='optimizer name(s), repeatable or comma-separated: '
                 f'{", ".join(methods.names())} (default '
                 f'{DEFAULT_OPTIMIZERS}; presets other than galore need '
                 '--lr, see examples/lm/methods.py)')
  p.add_argument('--model', default='tiny', choices=sorted(model_lib.PRESETS))
  p.add_argument('--scan-layers', action=argparse.BooleanOptionalAction,
                 default=True,
                 help='stack the blocks with nnx.vmap/nnx.scan (params '
                 'become (layers, m, n)); --no-scan-layers keeps a list of '
                 'blocks (2-D params, slower to compile)')
  for field in ('dim', 'layers', 'heads', 'ffn_dim'):
    p.add_argument(f'--{field.replace("_", "-")}', type=int, default=None,
                   help=f'override the preset\'s {field}')
  p.add_argument('--precision', default='fp32', choices=('fp32', 'bf16'),
                 help='bf16: float32 params and optimizer state, bfloat16 '
                 'matmuls/attention')
  p.add_argument('--bf16-params', default='off',
                 choices=('off', 'stochastic', 'master', 'nearest'),
                 help='with --precision bf16, store the params in bfloat16 '
                 'too: stochastic applies the updates by stochastic '
                 'rounding (so.stochastic_rounding, no float32 copy), master '
                 'keeps float32 master weights (so.master_weights), nearest '
                 'rounds to nearest; off keeps float32 params')
  p.add_argument('--per-layer', action='store_true',
                 help='update each layer inside the backward scan '
                 '(so.per_layer_train_step): the full gradient tree never '
                 'exists; the same result as the whole-tree step, one more '
                 'backward pass for the global-norm clipping. Needs '
                 '--scan-layers')
  p.add_argument('--steps', type=int, default=150)
  p.add_argument('--batch-size', type=int, default=16)
  p.add_argument('--seq-len', type=int, default=None,
                 help="default: the model preset's max_seq_len")
  p.add_argument('--lr', type=float, default=None,
                 help="peak learning rate; default: the optimizer's own")
  p.add_argument('--weight-decay', type=float, default=0.0)
  p.add_argument('--rank', type=float, default=None,
                 help='subspace rank (int, or a fraction in (0, 1)); '
                 'default dim // 4')
  p.add_argument('--refresh', '--refresh-every', type=int, default=100)
  p.add_argument('--basis', default='auto',
                 choices=('auto', 'svd', 'randomized'),
                 help="basis of the SVD-based presets (galore, fira, frugal, "
                 "...); 'auto': svd on one device, randomized (no all-gather "
                 'of sharded gradients) with --mesh; a given value also '
                 'replaces the random sketch of apollo, golore, ...')
  p.add_argument('--data', nargs='+', default=None, metavar='PATH',
                 help='text files or directories (default: the Python stdlib '
                 'sources)')
  p.add_argument('--max-bytes', type=int, default=data_lib.DEFAULT_MAX_BYTES,
                 help='cap on the corpus size')
  p.add_argument('--eval-every', type=int, default=50)
  p.add_argument('--eval-batches', type=int, default=4)
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--mesh', default=None,
                 help="device mesh, e.g. 'data=2,fsdp=4'; params are sharded "
                 "over 'fsdp', the batch over 'data' and 'fsdp'")
  dist = p.add_argument_group(
      'multiple processes',
      'one process per host (or per GPU); every process runs the same command '
      'with its own --process-id, and --mesh spans the devices of all of '
      'them. The flags default to the environment variables named; with none '
      'of them (and no --distributed) the run is a single process.')
  dist.add_argument('--coordinator-address',
                    default=os.environ.get('JAX_COORDINATOR_ADDRESS'),
                    help='HOST:PORT of process 0 (env JAX_COORDINATOR_ADDRESS)')
  dist.add_argument('--num-processes', type=int,
                    default=_env_int('JAX_NUM_PROCESSES'),
                    help='number of processes (env JAX_NUM_PROCESSES)')
  dist.add_argument('--process-id', type=int,
                    default=_env_int('JAX_PROCESS_ID'),
                    help='this process, in [0, --num-processes) (env '
                    'JAX_PROCESS_ID)')
  dist.add_argument('--distributed', action='store_true',
                    help='call jax.distributed.initialize() even without the '
                    'flags above: it detects SLURM, Open MPI and Cloud TPU '
                    'by itself')
  p.add_argument('--out', default=None,
                 help=f'output directory (default: a new {RUNS_DIR}/run-<N>, '
                 'or with --resume the latest one)')
  p.add_argument('--checkpoint-every', type=int, default=100,
                 help='0 disables checkpoints; the last step is always saved '
                 'otherwise')
  p.add_argument('--keep', type=int, default=2, help='checkpoints kept')
  p.add_argument('--resume', action='store_true',
                 help='continue from the latest checkpoint in --out (default: '
                 f'the latest {RUNS_DIR}/run-<N>)')
  p.add_argument('--stop-at', type=int, default=None,
                 help='stop (and checkpoint) after this step, as if '
                 'interrupted; the schedule still spans --steps')
  p.add_argument('--plot', action=argparse.BooleanOptionalAction,
                 default=True,
                 help='write loss.png and memory.png (needs matplotlib)')
  p.add_argument('--no-progress', action='store_true',
                 help='no progress bar')
  args = p.parse_args(argv)
  names = []
  for item in args.optimizer or [DEFAULT_OPTIMIZERS]:
    names.extend(n.strip() for n in item.split(',') if n.strip())
  unknown = [n for n in names if n not in methods.names()]
  if unknown:
    p.error(f'unknown optimizer(s) {unknown}; known: {methods.names()}')
  no_rate = [n for n in names if methods.get(n).learning_rate is None]
  if no_rate and args.lr is None:
    p.error(f'{", ".join(no_rate)}: no default learning rate in the example; '
            'give --lr (the tuned ratios to AdamW are in benchmarks/methods.py)')
  if len(set(names)) != len(names):
    p.error(f'optimizer listed twice: {names}')
  args.optimizer = names
  for flag in ('steps', 'batch_size', 'eval_every', 'eval_batches',
               'refresh', 'keep'):
    if getattr(args, flag) <= 0:
      p.error(f'--{flag.replace("_", "-")} must be positive')
  if args.checkpoint_every < 0:
    p.error('--checkpoint-every must be >= 0')
  if args.per_layer and not args.scan_layers:
    p.error('--per-layer needs --scan-layers (the layers stacked and '
            'scanned; each is updated inside the backward scan)')
  if args.bf16_params != 'off' and args.precision != 'bf16':
    p.error('--bf16-params needs --precision bf16')
  if args.num_processes is not None and args.num_processes < 1:
    p.error('--num-processes must be positive')
  if args.process_id is not None and not (
      0 <= args.process_id < (args.num_processes or 1)):
    p.error(f'--process-id {args.process_id} is not in [0, --num-processes '
            f'{args.num_processes})')
  if (args.num_processes or 1) > 1 and not args.mesh:
    p.error('--num-processes > 1 needs --mesh (over the devices of every '
            'process)')
  return args


def _env_int(name: str) -> int | None:
  value = os.environ.get(name)
  return int(value) if value else None


def initialize_distributed(args: argparse.Namespace) -> bool:
  """``jax.distributed.initialize`` from the flags, if any asks for it.

  Called before any other JAX call. The same code runs on CPU, GPU and TPU
  hosts; only this initialisation differs: on CPU the processes exchange
  data through gloo (set here; the setting does not affect GPUs and TPUs),
  and auto-detection (``--distributed``) covers SLURM, Open MPI and Cloud
  TPU. Returns whether it initialised.
  """
  if not (args.distributed or args.coordinator_address
          or (args.num_processes or 1) > 1):
    return False
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(coordinator_address=args.coordinator_address,
                             num_processes=args.num_processes,
                             process_id=args.process_id)
  return True


def is_primary() -> bool:
  """Process 0 writes the metrics, summary and plots and prints."""
  return jax.process_index() == 0


def log(*values, **kwargs) -> None:
  if is_primary():
    print(*values, **kwargs)


# ----------------------------------------------------------------------------
# Sharding: FSDP over 'fsdp', data parallel over 'data' (and 'fsdp').


def make_mesh(spec: str | None) -> jax.sharding.Mesh | None:
  """``'data=2,fsdp=4'`` -> a mesh with Auto axes (GSPMD propagation)."""
  if not spec:
    return None
  sizes = {}
  for part in spec.split(','):
    name, _, size = part.partition('=')
    name = name.strip()
    if name not in ('data', 'fsdp') or not size.strip().isdigit():
      raise ValueError(
          f"--mesh expects 'data=N,fsdp=M' (axes data and fsdp), got {spec!r}.")
    sizes[name] = int(size)
  devices = math.prod(sizes.values())
  if devices != jax.device_count():
    raise ValueError(
        f'--mesh {spec} needs {devices} devices, jax sees {jax.device_count()}. '
        'On CPU simulate them with '
        'XLA_FLAGS=--xla_force_host_platform_device_count=N.')
  names = tuple(sizes)
  return jax.make_mesh(
      tuple(sizes[n] for n in names), names,
      axis_types=(jax.sharding.AxisType.Auto,) * len(names))


def fsdp_spec(shape: tuple[int, ...], fsdp: int) -> jax.sharding.PartitionSpec:
  """Shard the largest axis divisible by ``fsdp`` over 'fsdp' (else none)."""
  spec = [None] * len(shape)
  if fsdp > 1:
    candidates = [a for a, d in enumerate(shape) if d % fsdp == 0 and d >= fsdp]
    if candidates:
      spec[max(candidates, key=lambda a: (shape[a], -a))] = 'fsdp'
  return jax.sharding.PartitionSpec(*spec)


def model_shardings(state, mesh):
  """FSDP shardings for every array of a model state."""
  fsdp = dict(mesh.shape).get('fsdp', 1)
  return jax.tree.map(
      lambda x: jax.sharding.NamedSharding(mesh, fsdp_spec(x.shape, fsdp)),
      state)


def path_names(path) -> tuple[Any, ...]:
  """A key path as plain names, the same for an ``nnx.State`` (NamedTuple
  fields and tuple positions become dict keys, each leaf sits in a Variable's
  ``value``) and for the raw optax state it mirrors."""
  names = tuple(methods.key_names(path))
  return names[:-1] if names[-1:] == ('value',) else names


def state_shardings(tx, model, optimizer, mesh):
  """Shardings of ``{'model': ..., 'optimizer': ...}``.

  The model's arrays are FSDP-sharded (:func:`model_shardings`). The optimizer
  state takes the shardings ``tx`` itself derives from those of the
  parameters (``subspace_optax.state_shardings``): moments of a projected
  matrix are sharded like the axis they keep, bases like their parent axis,
  counters replicated, so the step never re-lays out its own state.
  """
  model_state = model_shardings(nnx.state(model), mesh)
  params = nnx.state(model, nnx.Param)
  derived = so.state_shardings(tx, params, model_shardings(params, mesh))
  by_path = {path_names(path): sharding for path, sharding
             in jax.tree_util.tree_flatten_with_path(derived)[0]}
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

  def optimizer_sharding(path, leaf):
    del leaf
    names = path_names(path)  # ('opt_state', ...) or ('step',)
    return by_path[names[1:]] if names[0] == 'opt_state' else replicated

  optimizer_state = jax.tree_util.tree_map_with_path(
      optimizer_sharding, nnx.state(optimizer))
  return {'model': model_state, 'optimizer': optimizer_state}


def batch_sharding(mesh, batch_size: int):
  axes = tuple(a for a in ('data', 'fsdp') if a in mesh.shape)
  ways = math.prod(mesh.shape[a] for a in axes)
  if batch_size % ways:
    raise ValueError(
        f'--batch-size {batch_size} is not divisible by the {ways} devices of '
        f'the mesh axes {axes}.')
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(axes))


# ----------------------------------------------------------------------------
# Model, optimizer and steps.


@dataclasses.dataclass
class Run:
  """Everything fixed for one optimizer's training run."""

  name: str
  model_config: model_lib.Config
  learning_rate: float
  rank: int | float | None
  config: dict[str, Any]  # the JSON run config (compared on resume)
  tx: Any
  per_layer: bool = False  # tx has no clipping: the per-layer step clips


def make_run(name: str, args: argparse.Namespace,
             model_config: model_lib.Config, corpus: data_lib.Corpus) -> Run:
  entry = methods.get(name)
  learning_rate = args.lr if args.lr is not None else entry.learning_rate
  rank = None
  if entry.takes_rank:
    rank = args.rank if args.rank is not None else model_config.dim // 4
    rank = int(rank) if float(rank).is_integer() else float(rank)
  # --basis applies to SVD-based presets ('auto': svd on one device,
  # randomized with --mesh); a random-basis preset (apollo, golore) keeps its
  # own unless --basis is given.
  basis = {}
  if entry.basis is not None and (entry.basis == 'svd'
                                  or getattr(args, 'basis_given', False)):
    basis = {'basis': args.basis}
  schedule = methods.warmup_cosine(learning_rate, args.steps)
  tx = methods.make_optimizer(
      name, learning_rate_schedule=schedule, rank=rank,
      refresh=args.refresh, weight_decay=args.weight_decay,
      seed=args.seed, clip_norm=None if args.per_layer else methods.CLIP_NORM,
      **basis)
  if args.bf16_params == 'stochastic':
    tx = optax.chain(tx, so.stochastic_rounding(seed=args.seed))
  elif args.bf16_params == 'master':
    tx = optax.chain(tx, so.master_weights())
  config = {
      'model': args.model,
      'model_config': dataclasses.asdict(model_config),
      'optimizer': name,
      'learning_rate': learning_rate,
      'rank': rank,
      'refresh': args.refresh if entry.takes_refresh else None,
      'basis': basis.get('basis'),
      'weight_decay': args.weight_decay,
      'steps': args.steps,
      'batch_size': args.batch_size,
      'seq_len': args.seq_len,
      'seed': args.seed,
      'data_fingerprint': corpus.fingerprint,
  }
  # Absent when off, so that older runs still resume.
  if args.bf16_params != 'off':
    config['bf16_params'] = args.bf16_params
  if args.per_layer:
    config['per_layer'] = True
  return Run(name, model_config, learning_rate, rank, config, tx,
             args.per_layer)


def create(run: Run, seed: int):
  """Fresh ``(model, optimizer)``; the same weights for every optimizer."""
  model = model_lib.Llama(run.model_config, rngs=nnx.Rngs(seed))
  if run.config.get('bf16_params', 'off') != 'off':
    nnx.update(model, jax.tree.map(
        lambda x: x.astype(jnp.bfloat16), nnx.state(model, nnx.Param)))
  optimizer = nnx.Optimizer(model, run.tx, wrt=nnx.Param)
  return model, optimizer


def _pair_state(model, optimizer):
  return {'model': nnx.state(model), 'optimizer': nnx.state(optimizer)}


def _constrain(model, optimizer, shardings):
  state = _pair_state(model, optimizer)
  state = jax.tree.map(jax.lax.with_sharding_constraint, state, shardings)
  nnx.update(model, state['model'])
  nnx.update(optimizer, state['optimizer'])


def make_steps(run: Run, shardings=None):
  """``(train_step, eval_step)``, jitted with nnx.jit.

  With ``run.per_layer`` the train step is
  :func:`subspace_optax.per_layer_train_step` over the model's pure params and
  the optimizer's state (the same state as the whole-tree step's): each
  block's gradient is consumed inside the backward scan, and the global-norm
  clipping of the whole-tree step is done by its ``clip_norm``.
  """
  per_layer_step = None
  if run.per_layer:
    embed, layer, head_loss = model_lib.per_layer_functions(run.model_config)
    per_layer_step = so.per_layer_train_step(
        run.tx, embed=embed, layer=layer, head_loss=head_loss, stack='blocks',
        clip_norm=methods.CLIP_NORM)

  @nnx.jit
  def train_step(model, optimizer, inputs, targets):
    if per_layer_step is None:
      def loss_fn(model):
        return model_lib.cross_entropy(model(inputs), targets)

      loss, grads = nnx.value_and_grad(loss_fn)(model)
      optimizer.update(model, grads)
    else:
      params, opt_state, loss = per_layer_step(
          nnx.as_pure(nnx.state(model, nnx.Param)),
          nnx.as_pure(optimizer.opt_state), (inputs, targets))
      nnx.update(model, params)
      nnx.update(optimizer.opt_state, nnx.state(opt_state))
      optimizer.step[...] += 1
    if shardings is not None:  # Keep the state's layout fixed across steps.
      _constrain(model, optimizer, shardings)
    return loss

  @nnx.jit
  def eval_step(model, inputs, targets):
    return model_lib.cross_entropy(model(inputs), targets)

  return train_step, eval_step


def evaluate(eval_step, model, batches, put) -> float:
  losses = [eval_step(model, *put(b)) for b in batches]
  return float(np.mean([float(l) for l in losses]))


# ----------------------------------------------------------------------------
# Metrics file.


def _read_metrics(path: pathlib.Path) -> list[dict[str, Any]]:
  if not path.exists():
    return []
  return [json.loads(line) for line in path.read_text().splitlines() if line]


def _truncate_metrics(path: pathlib.Path, name: str, keep_until: int) -> None:
  """Drop ``name``'s records after step ``keep_until`` (a resumed run rewrites
  them); ``keep_until=0`` drops them all (a fresh run)."""
  records = [r for r in _read_metrics(path)
             if r.get('optimizer') != name or r['step'] <= keep_until]
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(''.join(json.dumps(r) + '\n' for r in records))


# ----------------------------------------------------------------------------
# One optimizer.


def _write_state_summary(run: Run, abstract_model, run_dir: pathlib.Path):
  """``subspace_optax.summary`` of the run's optimizer, per parameter leaf
  (projected or not, basis, rank, state bytes against AdamW's), into
  ``run_dir/state_summary.txt``."""
  params = nnx.to_pure_dict(nnx.state(abstract_model, nnx.Param))
  report = so.summary(run.tx, params)
  run_dir.mkdir(parents=True, exist_ok=True)
  if is_primary():
    (run_dir / 'state_summary.txt').write_text(str(report) + '\n')
  log(f'[{run.name}] optimizer state {report.state_bytes / 2**20:.2f} MiB, '
        f'{report.state_bytes / report.adamw_bytes:.3f}x AdamW\'s; per leaf: '
        f'{run_dir}/state_summary.txt')


def train_one(run: Run, args, corpus, mesh, out: pathlib.Path) -> dict[str, Any]:
  run_dir = out / run.name
  metrics_path = out / METRICS_FILE
  seq_len, batch_size = args.seq_len, args.batch_size

  abstract = nnx.eval_shape(lambda: create(run, args.seed))
  shardings = None
  if mesh is not None:
    shardings = state_shardings(run.tx, *abstract, mesh)
    data_sharding = batch_sharding(mesh, batch_size)
    # Every process computes the same global batch and keeps its own shards.
    put = lambda b: tuple(jax.make_array_from_callback(
        x.shape, data_sharding, lambda index, x=x: x[index]) for x in b)
  else:
    put = lambda b: tuple(jnp.asarray(x) for x in b)

  mngr = None
  if args.checkpoint_every > 0 or args.resume:
    mngr = checkpoint.manager(run_dir, args.keep)
  latest = mngr.latest_step() if mngr is not None else None
  start = 0
  if latest is not None and args.resume:
    checkpoint.check_config(run_dir, run.config)
    target = checkpoint.abstract_state(abstract, shardings)
    # The newest readable step: an unreadable one is skipped with a warning.
    latest, state, progress = checkpoint.restore_latest(mngr, target)
    model = nnx.merge(nnx.graphdef(abstract[0]), state['model'])
    optimizer = nnx.merge(nnx.graphdef(abstract[1]), state['optimizer'])
    start = int(progress['data_position'])
    if start != int(optimizer.step[...]):
      raise RuntimeError(
          f'Checkpoint {latest}: data position {start} != optimizer step '
          f'{int(optimizer.step[...])}.')
    if is_primary():
      _truncate_metrics(metrics_path, run.name, start)
    log(f'[{run.name}] resumed from {run_dir}/checkpoints/{latest}')
  else:
    if latest is not None:
      raise FileExistsError(
          f'{run_dir} already holds checkpoints (latest step {latest}). Pass '
          '--resume to continue them, choose another --out, or leave --out '
          f'out: every run then gets a new {RUNS_DIR}/run-<N>.')
    if args.resume:
      log(f'[{run.name}] no checkpoint in {run_dir}; starting from step 0')
    if shardings is None:
      model, optimizer = create(run, args.seed)
    else:  # created sharded: each process makes only its own shards
      state = jax.jit(lambda: _pair_state(*create(run, args.seed)),
                      out_shardings=shardings)()
      model = nnx.merge(nnx.graphdef(abstract[0]), state['model'])
      optimizer = nnx.merge(nnx.graphdef(abstract[1]), state['optimizer'])
    if is_primary():
      _truncate_metrics(metrics_path, run.name, 0)
  if mngr is not None and is_primary():
    checkpoint.write_config(run_dir, run.config)

  train_step, eval_step = make_steps(run, shardings)
  val_batches = data_lib.eval_batches(
      corpus.val, batches=args.eval_batches, batch_size=batch_size,
      seq_len=seq_len)
  state_bytes = int(so.state_bytes(optimizer.opt_state))
  _write_state_summary(run, abstract[0], run_dir)
  end = args.steps if args.stop_at is None else min(args.stop_at, args.steps)
  tokens_per_step = batch_size * seq_len

  bar = None
  if not args.no_progress and end > start and is_primary():
    from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel

    bar = tqdm(total=args.steps, initial=start, desc=f'{run.name:>12}',
               dynamic_ncols=True, leave=True)
  timed_steps, timed_seconds = 0, 0.0
  train_losses, val_loss, tokens_per_s = [], None, float('nan')
  with (metrics_path.open('a') if is_primary()
        else open(os.devnull, 'w')) as metrics:
    for step in range(start, end):
      batch = put(data_lib.batch_at(
          corpus.train, seed=args.seed, step=step, batch_size=batch_size,
          seq_len=seq_len))
      began = time.perf_counter()
      loss = float(train_step(model, optimizer, *batch))
      seconds = time.perf_counter() - began
      if step > start:  # The first step of a process includes compilation.
        timed_steps += 1
        timed_seconds += seconds
        tokens_per_s = timed_steps * tokens_per_step / timed_seconds
      if not math.isfinite(loss):
        raise FloatingPointError(
            f'[{run.name}] loss is {loss} at step {step + 1}; lower --lr.')
      done = step + 1
      train_losses.append(loss)
      val_loss = None
      if done % args.eval_every == 0 or done == end:
        val_loss = evaluate(eval_step, model, val_batches, put)
      record = {'optimizer': run.name, 'step': done, 'loss': loss,
                'val_loss': val_loss,
                'tokens_per_s': tokens_per_s if timed_steps else None,
                'opt_state_bytes': state_bytes,
                'tokens': done * tokens_per_step}
      metrics.write(json.dumps(record) + '\n')
      if mngr is not None and (
          done % args.checkpoint_every == 0 or done == end):
        metrics.flush()
        checkpoint.save(mngr, done, model, optimizer, {
            'step': done, 'data_position': done,
            'tokens': done * tokens_per_step})
      if bar is not None:
        postfix = {'loss': f'{loss:.3f}',
                   'tok/s': f'{tokens_per_s:,.0f}' if timed_steps else '-',
                   'state': f'{state_bytes / 2**20:.2f}MiB'}
        if val_loss is not None:
          postfix['val'] = f'{val_loss:.3f}'
        bar.set_postfix(postfix, refresh=False)
        bar.update(1)
  if bar is not None:
    bar.close()
  if mngr is not None:
    mngr.close()

  final_step = int(optimizer.step[...])
  if val_loss is None:  # Nothing trained in this process (already finished).
    val_loss = evaluate(eval_step, model, val_batches, put)
  history = [r for r in _read_metrics(metrics_path)
             if r.get('optimizer') == run.name]
  recent = [r['loss'] for r in history[-10:]] or train_losses[-10:]
  return {
      'optimizer': run.name,
      'steps': final_step,
      'complete': final_step >= args.steps,
      'final_val_loss': val_loss,
      'final_val_bits_per_byte': val_loss / math.log(2),
      'final_train_loss': float(np.mean(recent)) if recent else None,
      'opt_state_bytes': state_bytes,
      'params': model_lib.count_params(model),
      'tokens_per_s': tokens_per_s if timed_steps else None,
      'train_seconds': timed_seconds if timed_steps else None,
      'learning_rate': run.learning_rate,
      'rank': run.rank,
  }


# ----------------------------------------------------------------------------
# Entry point.


def format_summary(summary: dict[str, Any]) -> str:
  rows = [('optimizer', 'val loss', 'bits/byte', 'vs adamw', 'state MiB',
           'tok/s', 'lr', 'rank')]
  for r in summary['runs']:
    rows.append((
        r['optimizer'], f"{r['final_val_loss']:.4f}",
        f"{r['final_val_bits_per_byte']:.3f}",
        '-' if r.get('val_loss_ratio_to_adamw') is None
        else f"{r['val_loss_ratio_to_adamw']:.3f}",
        f"{r['opt_state_bytes'] / 2**20:.3f}",
        '-' if r['tokens_per_s'] is None else f"{r['tokens_per_s']:,.0f}",
        f"{r['learning_rate']:g}", '-' if r['rank'] is None else str(r['rank'])))
  widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
  lines = ['  '.join(c.rjust(w) if i else c.ljust(w)
                     for i, (c, w) in enumerate(zip(row, widths)))
           for row in rows]
  lines.insert(1, '-' * len(lines[0]))
  return '\n'.join(lines)


def run_directory(out: str | None, resume: bool) -> pathlib.Path:
  """``--out``, else ``runs/lm/run-<N>``: a new N, or with ``resume`` the
  latest (a new one when there is none)."""
  if out is not None:
    return pathlib.Path(out)
  numbers = [int(p.name[len('run-'):]) for p in RUNS_DIR.glob('run-*')
             if p.name[len('run-'):].isdigit()]
  latest = max(numbers, default=0)
  return RUNS_DIR / f'run-{latest if resume and latest else latest + 1}'


def directory_bytes(path: pathlib.Path) -> int:
  return sum(f.stat().st_size for f in path.rglob('*') if f.is_file())


def write_plots(out: pathlib.Path) -> list[pathlib.Path]:
  """``loss.png`` and ``memory.png``, or none (with a message) without
  matplotlib."""
  if importlib.util.find_spec('matplotlib') is None:
    print('plots: skipped, matplotlib is not installed '
          "(pip install -e '.[examples]')")
    return []
  from examples.lm import plot  # pylint: disable=import-outside-toplevel

  return plot.plot_metrics(out / METRICS_FILE, out)


def explain(summary: dict[str, Any]) -> list[str]:
  """What the table shows, from its own numbers: paragraphs to print."""
  runs = {r['optimizer']: r for r in summary['runs']}
  baseline = runs.get('adamw')
  others = [r for r in summary['runs'] if r['optimizer'] != 'adamw']
  if baseline is None or not others:
    return []
  lines = [
      f"{r['optimizer']}: optimizer state {r['state_ratio_to_adamw']:.2f}x "
      f"AdamW's ({r['opt_state_bytes'] / 2**20:.2f} vs "
      f"{baseline['opt_state_bytes'] / 2**20:.2f} MiB), validation loss "
      f"{r['val_loss_ratio_to_adamw']:.3f}x AdamW's." for r in others]
  behind = [r['optimizer'] for r in others if r['val_loss_ratio_to_adamw'] > 1]
  if behind:
    lines.append(
        f"{', '.join(behind)} trail AdamW here: a short run "
        f"({summary['steps']} steps) favours AdamW, since a low-rank method "
        'updates each matrix only within a rank-r subspace that changes at '
        "each refresh and needs more steps to catch up, and each method's "
        "learning rate is its paper's ratio to AdamW's, not tuned for this "
        'run.')
  lines += [
      'Tokens/s on a CPU include the SVD refreshes and projections, which a '
      'tiny model does not amortise (GPU timings: benchmarks/README.md).',
      'The tuned comparison (300 steps, a learning-rate sweep, every method '
      'at the same state budget; about 25 min on 2 cores; results in '
      'benchmarks/results/quality_cpu.md):']
  return [textwrap.fill(line, width=79) for line in lines] + [
      '  ' + TUNED_COMPARISON]


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  args = parse_args(argv)
  initialize_distributed(args)  # before any other JAX call
  if jax.process_count() > 1 and not args.mesh:
    raise SystemExit(f'error: {jax.process_count()} processes need --mesh '
                     '(over the devices of every process)')
  overrides = {f: getattr(args, f) for f in ('dim', 'layers', 'heads', 'ffn_dim')
               if getattr(args, f) is not None}
  model_config = model_lib.config_from_preset(
      args.model, scan_layers=args.scan_layers,
      compute_dtype='bfloat16' if args.precision == 'bf16' else 'float32',
      **overrides)
  if args.seq_len is None:
    args.seq_len = model_config.max_seq_len
  try:
    corpus = data_lib.load_corpus(
        args.data, max_bytes=args.max_bytes, seq_len=args.seq_len)
  except data_lib.CorpusError as error:
    raise SystemExit(f'error: {error}') from error
  mesh = make_mesh(args.mesh)
  args.basis_given = args.basis != 'auto'
  if args.basis == 'auto':
    args.basis = 'svd' if mesh is None else 'randomized'
  out = run_directory(args.out, args.resume)
  if jax.process_count() > 1 and args.out is None:
    # Every process uses process 0's run-<N> (the others may see it created).
    number = multihost_utils.broadcast_one_to_all(
        np.int32(out.name[len('run-'):]))
    out = RUNS_DIR / f'run-{int(number)}'
  out.mkdir(parents=True, exist_ok=True)
  log(f'outputs: {out}/')

  log(f'corpus: {corpus.description} (train {len(corpus.train):,} / val '
        f'{len(corpus.val):,} bytes)')
  log(f'model: {args.model} {model_config}')
  log(f'batch {args.batch_size} x {args.seq_len} bytes, {args.steps} steps, '
        f'devices {jax.device_count()} ({jax.default_backend()})'
        + (f', {jax.process_count()} processes' if jax.process_count() > 1
           else '')
        + (f', mesh {dict(mesh.shape)}' if mesh is not None else ''))
  runs = []
  began = time.perf_counter()
  for name in args.optimizer:
    run = make_run(name, args, model_config, corpus)
    runs.append(train_one(run, args, corpus, mesh, out))
  baseline = next((r for r in runs if r['optimizer'] == 'adamw'), None)
  for r in runs:
    r['val_loss_ratio_to_adamw'] = (
        None if baseline is None
        else r['final_val_loss'] / baseline['final_val_loss'])
    r['state_ratio_to_adamw'] = (
        None if baseline is None
        else r['opt_state_bytes'] / baseline['opt_state_bytes'])
  summary = {
      'model': args.model, 'scan_layers': args.scan_layers,
      'per_layer': args.per_layer, 'precision': args.precision, 'steps': args.steps,
      'batch_size': args.batch_size, 'seq_len': args.seq_len,
      'corpus': corpus.description, 'mesh': args.mesh,
      'wall_seconds': time.perf_counter() - began, 'runs': runs,
  }
  if not is_primary():  # process 0 writes the outputs
    return summary
  (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
  plots = write_plots(out) if args.plot else []
  print()
  print(format_summary(summary))
  print()
  for line in explain(summary):
    print(line)
  print(f'\nOutputs in {out}/ ({directory_bytes(out) / 1e6:.0f} MB): '
        + ', '.join([METRICS_FILE, SUMMARY_FILE] + [p.name for p in plots])
        + (', <optimizer>/checkpoints' if args.checkpoint_every else '')
        + '. Continue it with --resume --out ' + str(out) + '.')
  return summary


if __name__ == '__main__':
  main(sys.argv[1:])
