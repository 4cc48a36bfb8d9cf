"""Soak test: a long run of a tiny model, checked for leaks and drift.

One jitted training step, ``--steps`` times (10,000 by default), of a small
MLP on a sequence of regression tasks (continual learning), with:

* a low-rank optimizer refreshed every ``--refresh`` steps (SVD bases) whose
  Adam moments are stored in 8 bits (``so.quantize_moments``);
* EWC's penalty and a GPM input-side memory (``continual.orthogonal_to``),
  both updated at every task boundary (``consolidate_ewc``, ``gpm_memory``,
  ``set_memory``), as in ``examples/continual_common.py``.

It records, sampled over the run: host RSS, the bytes of JAX's live arrays
and ``device.memory_stats()`` where the backend has it (the first-quarter and
last-quarter medians show any growth); the number of executables compiled
(lowered to MLIR, counted by a ``jax.monitoring`` listener) per quarter of the
run, after a warm-up step and boundary, and the traces of the jitted step; the
orthonormality of the bases and of the protected memory at the end; and, after
a final ``so.save_checkpoint``, the losses of ``--continue-steps`` more steps of
the run against those of a fresh run restored with ``so.restore_latest``.

  python -m benchmarks.soak                    # 10,000 steps, ~1-2 min on 2 cores
  python -m benchmarks.soak --steps 200 --out /tmp/soak.json

Writes JSON (device, date, command) to ``--out``
(default ``benchmarks/results/soak_cpu.json``) and prints it.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import pathlib
import platform
import shutil
import sys
import tempfile
import time
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp

import subspace_optax as so
from subspace_optax import continual

RESULTS = pathlib.Path(__file__).parent / 'results'
IN, HIDDEN, OUT = 16, 32, 8  # a two-layer MLP
BATCH = 32

# Executables built: each one is lowered to MLIR (counted even when JAX's
# persistent compilation cache then spares the XLA compile).
_COMPILES = [0]


def _count_compile(event: str, *args, **kwargs) -> None:
  del args, kwargs
  if event == '/jax/core/compile/jaxpr_to_mlir_module_duration':
    _COMPILES[0] += 1


jax.monitoring.register_event_duration_secs_listener(_count_compile)


def init_params(key) -> dict[str, jax.Array]:
  k1, k2 = jax.random.split(key)
  return {'w1': jax.random.normal(k1, (IN, HIDDEN)) / np.sqrt(IN),
          'b1': jnp.zeros(HIDDEN),
          'w2': jax.random.normal(k2, (HIDDEN, OUT)) / np.sqrt(HIDDEN),
          'b2': jnp.zeros(OUT)}


def forward(params, x):
  return jnp.tanh(x @ params['w1'] + params['b1']) @ params['w2'] + params['b2']


def loss_one(params, example):
  x, y = example
  return 0.5 * jnp.sum((forward(params, x) - y) ** 2)


def task_batch(teacher, key):
  """A batch of a task: Gaussian inputs, targets from the task's linear
  teacher (one teacher per task)."""
  x = jax.random.normal(key, (BATCH, IN))
  return x, x @ teacher


def make_optimizer(args) -> optax.GradientTransformation:
  return optax.chain(
      continual.ewc(strength=args.ewc_strength),
      so.low_rank(
          so.quantize_moments(optax.scale_by_adam(), block_size=32,
                              min_size=64),
          rank=args.rank, refresh=args.refresh, basis='svd'),
      optax.scale_by_learning_rate(args.lr),
      continual.orthogonal_to(mode='left', capacity=0.75))


def make_step(tx):
  @jax.jit
  def step(params, opt_state, teacher, key):
    batch = task_batch(teacher, key)
    loss, grads = jax.value_and_grad(
        lambda p: jnp.mean(jax.vmap(lambda e: loss_one(p, e))(batch)))(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss
  return step


def boundary(params, opt_state, teacher, key, threshold):
  """After a task: consolidate EWC and grow the GPM memory (its inputs)."""
  x, y = task_batch(teacher, key)
  fisher = continual.fisher_diagonal(loss_one, params, (x, y))
  opt_state = continual.consolidate_ewc(opt_state, params, fisher)
  hidden = jnp.tanh(x @ params['w1'] + params['b1'])
  inputs = {'w1': x, 'b1': None, 'w2': hidden, 'b2': None}
  with warnings.catch_warnings():  # a full memory keeps its directions
    warnings.simplefilter('ignore')
    memory = continual.gpm_memory(inputs, threshold,
                                  continual.get_memory(opt_state),
                                  on_overflow='warn')
  return continual.set_memory(opt_state, memory)


def rss_bytes() -> int:
  with open('/proc/self/statm') as statm:
    return int(statm.read().split()[1]) * os.sysconf('SC_PAGE_SIZE')


def live_bytes() -> int:
  """Bytes of the live JAX arrays, after a garbage collection: the boundary
  functions leave reference cycles that hold arrays until the collector runs
  (not a leak; what survives a collection would be one)."""
  gc.collect()
  return int(sum(x.nbytes for x in jax.live_arrays()))


def device_bytes() -> int | None:
  stats = jax.devices()[0].memory_stats()
  return None if not stats else int(stats.get('bytes_in_use', 0))


def orthonormality(opt_state) -> dict[str, float]:
  """max |QᵀQ - I| over the low-rank bases and over the filled columns of
  the protected memory."""
  low_rank_state = opt_state[1]
  basis_errors = [0.0]
  for q in jax.tree.leaves(low_rank_state.basis):
    q = np.asarray(q, np.float64)
    if q.ndim >= 2:
      gram = np.swapaxes(q, -1, -2) @ q
      basis_errors.append(float(np.max(np.abs(gram - np.eye(q.shape[-1])))))
  memory_errors = [0.0]
  for subspace in jax.tree.leaves(
      continual.get_memory(opt_state),
      is_leaf=lambda x: isinstance(x, continual.ProtectedSubspace)):
    if not isinstance(subspace, continual.ProtectedSubspace):
      continue
    q = np.asarray(subspace.left, np.float64)[:, :int(subspace.left_count)]
    gram = q.T @ q
    memory_errors.append(float(np.max(np.abs(gram - np.eye(q.shape[1])))))
  return {'basis_max_abs_QtQ_minus_I': max(basis_errors),
          'memory_max_abs_QtQ_minus_I': max(memory_errors)}


def _quarters(samples: list[dict[str, Any]], key: str) -> dict[str, Any]:
  values = [s[key] for s in samples if s[key] is not None]
  if len(values) < 4:
    return {'first_quarter_median': None, 'last_quarter_median': None,
            'growth_ratio': None}
  quarter = max(1, len(values) // 4)
  first = float(np.median(values[:quarter]))
  last = float(np.median(values[-quarter:]))
  return {'first_quarter_median': first, 'last_quarter_median': last,
          'growth_ratio': last / first if first else None,
          'max': max(values), 'min': min(values)}


def run(args) -> dict[str, Any]:
  tx = make_optimizer(args)
  step = make_step(tx)
  key = jax.random.PRNGKey(args.seed)
  params = init_params(key)
  opt_state = tx.init(params)
  teachers = [jax.random.normal(jax.random.fold_in(key, 1000 + t), (IN, OUT))
              / np.sqrt(IN) for t in range(args.tasks)]  # unit-variance targets
  task_len = -(-args.steps // args.tasks)
  data_key = jax.random.fold_in(key, 7)
  keys = jax.random.split(data_key, args.steps + args.continue_steps)
  sample_every = max(1, args.steps // args.samples)
  # Warm-up, discarded: one step and one boundary compile everything, so the
  # loop should compile nothing and the memory samples start warm.
  compiles_at_start = _COMPILES[0]
  jax.block_until_ready(step(params, opt_state, teachers[0], keys[0]))
  jax.block_until_ready(boundary(params, opt_state, teachers[0],
                                 jax.random.fold_in(key, 1), args.threshold))
  warm_up_compiles = _COMPILES[0] - compiles_at_start
  compiles_at_start = _COMPILES[0]

  samples, losses, boundaries, sampling_seconds = [], [], 0, 0.0
  task_losses = []  # the loss at the last step of each task
  compiles_by_quarter = [0, 0, 0, 0]
  began = time.perf_counter()
  loss = None
  for t in range(args.steps):
    task = t // task_len
    if t and t % task_len == 0:  # the previous task is finished
      opt_state = boundary(params, opt_state, teachers[task - 1],
                           jax.random.fold_in(key, 2000 + task),
                           args.threshold)
      boundaries += 1
    before = _COMPILES[0]
    params, opt_state, loss = step(params, opt_state, teachers[task], keys[t])
    compiles_by_quarter[min(3, 4 * t // args.steps)] += _COMPILES[0] - before
    if (t + 1) % task_len == 0 or t + 1 == args.steps:
      task_losses.append(float(loss))
    if (t + 1) % sample_every == 0 or t == 0:
      loss_value = float(loss)  # also waits for the step
      sampling_began = time.perf_counter()
      losses.append({'step': t + 1, 'loss': loss_value})
      samples.append({'step': t + 1, 'rss_bytes': rss_bytes(),
                      'live_array_bytes': live_bytes(),
                      'device_bytes_in_use': device_bytes()})
      sampling_seconds += time.perf_counter() - sampling_began
  jax.block_until_ready(params)
  seconds = time.perf_counter() - began
  loop_compiles = _COMPILES[0] - compiles_at_start
  step_cache_after_loop = int(step._cache_size())  # pylint: disable=protected-access

  # Continuation equality: the run continues; a fresh state restored from the
  # final checkpoint makes the same steps.
  last_task = min(args.tasks - 1, (args.steps - 1) // task_len)
  directory = tempfile.mkdtemp(prefix='soak_')
  manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(
      enable_async_checkpointing=False, create=True))
  config = {'rank': args.rank, 'refresh': args.refresh, 'tasks': args.tasks,
            'steps': args.steps}
  so.save_checkpoint(manager, args.steps, {'params': params,
                                           'opt_state': opt_state},
                     progress={'step': args.steps}, config=config)

  def continue_from(step_fn, p, s):
    out = []
    for t in range(args.steps, args.steps + args.continue_steps):
      p, s, l = step_fn(p, s, teachers[last_task], keys[t])
      out.append(float(l))
    return out, p

  continued, continued_params = continue_from(step, params, opt_state)
  # A fresh run: a new optimizer and step function (as in a new process).
  fresh_tx = make_optimizer(args)
  fresh_step = make_step(fresh_tx)
  target = jax.eval_shape(
      lambda: {'params': init_params(key), 'opt_state': fresh_tx.init(
          init_params(key))})
  restored_step, restored, progress = so.restore_latest(manager, target,
                                                        config=config)
  resumed, resumed_params = continue_from(fresh_step, restored['params'],
                                          restored['opt_state'])
  shutil.rmtree(directory, ignore_errors=True)
  same_params = all(np.array_equal(a, b) for a, b in zip(
      jax.tree.leaves(continued_params), jax.tree.leaves(resumed_params)))

  now = datetime.datetime.now(datetime.timezone.utc)
  moments = jax.tree.leaves(opt_state[1].inner_state)
  int8_moment_bytes = sum(int(m.nbytes) for m in moments
                          if m.dtype in (jnp.int8, jnp.uint8))
  return {
      'benchmark': 'soak',
      'device': jax.default_backend(),
      'device_kind': str(jax.devices()[0].device_kind),
      'backend': jax.default_backend(),
      'cores': os.cpu_count(),
      'machine': f'{os.cpu_count()} CPU cores',
      'python': platform.python_version(),
      'jax': jax.__version__,
      'date': now.date().isoformat(),
      'time_utc': now.isoformat(timespec='seconds'),
      'command': ' '.join(['python -m benchmarks.soak'] + sys.argv[1:]),
      'config': {
          'steps': args.steps, 'tasks': args.tasks, 'task_length': task_len,
          'refresh': args.refresh, 'rank': args.rank, 'lr': args.lr,
          'ewc_strength': args.ewc_strength, 'gpm_threshold': args.threshold,
          'model': f'MLP {IN}-{HIDDEN}-{OUT}, batch {BATCH}',
          'optimizer': 'chain(ewc, low_rank(quantize_moments(adam), svd), '
                       'lr, orthogonal_to(left))'},
      'seconds': seconds,
      'sampling_seconds': sampling_seconds,
      'ms_per_step': 1e3 * (seconds - sampling_seconds) / args.steps,
      'refreshes': args.steps // args.refresh,
      'task_boundaries': boundaries,
      'int8_moment_bytes': int8_moment_bytes,
      'memory': {
          'samples': len(samples),
          'rss_bytes': _quarters(samples, 'rss_bytes'),
          'live_array_bytes': _quarters(samples, 'live_array_bytes'),
          'device_bytes_in_use': _quarters(samples, 'device_bytes_in_use'),
          'trace': samples,
      },
      'compilations': {
          'warm_up_step_and_boundary': warm_up_compiles,
          'train_step_traces_after_loop': step_cache_after_loop,
          'train_step_traces_at_end': int(step._cache_size()),  # pylint: disable=protected-access
          'restored_run_step_traces': int(fresh_step._cache_size()),  # pylint: disable=protected-access
          'during_train_steps_by_quarter': compiles_by_quarter,
          'in_loop_incl_boundaries': loop_compiles,
      },
      'orthonormality': orthonormality(opt_state),
      'loss': {'first': losses[0]['loss'], 'last': losses[-1]['loss'],
               'end_of_each_task': task_losses, 'trace': losses},
      'continuation': {
          'steps': args.continue_steps,
          'restored_step': restored_step,
          'restored_progress': progress,
          'run_losses': continued,
          'restored_losses': resumed,
          'max_abs_loss_difference': float(np.max(np.abs(
              np.subtract(continued, resumed)))) if continued else 0.0,
          'equal': continued == resumed and same_params,
      },
  }


def parse(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--steps', type=int, default=10_000)
  p.add_argument('--tasks', type=int, default=5)
  p.add_argument('--refresh', type=int, default=50)
  p.add_argument('--rank', type=int, default=4)
  p.add_argument('--lr', type=float, default=1e-2)
  p.add_argument('--ewc-strength', type=float, default=1.0)
  p.add_argument('--threshold', type=float, default=0.5,
                 help='GPM energy threshold at each boundary')
  p.add_argument('--samples', type=int, default=100,
                 help='memory samples over the run')
  p.add_argument('--continue-steps', type=int, default=50)
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--out', default=str(RESULTS / 'soak_cpu.json'))
  args = p.parse_args(argv)
  if args.steps < 4 * args.tasks:
    p.error('--steps must be at least 4 x --tasks')
  return args


def main(argv=None) -> dict[str, Any]:
  args = parse(argv)
  report = run(args)
  text = json.dumps(report, indent=1)
  pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
  pathlib.Path(args.out).write_text(text + '\n')
  summary = {k: report[k] for k in ('seconds', 'ms_per_step', 'compilations',
                                    'orthonormality')}
  summary['memory'] = {k: v for k, v in report['memory'].items()
                       if k != 'trace'}
  summary['continuation_equal'] = report['continuation']['equal']
  print(json.dumps(summary, indent=1))
  return report


if __name__ == '__main__':
  main()
