"""Continual learning on scikit-learn's bundled digits: seven methods, one run.

One flax NNX MLP is fine-tuned on a sequence of tasks built from
``sklearn.datasets.load_digits`` (8x8 images, shipped inside scikit-learn, no
download), with the same seeds, data order and initial weights for every
method:

* ``naive``   Adam, nothing else (sequential fine-tuning).
* ``l2``      ``l2_to_anchor`` (pull towards the previous task's weights) + Adam.
* ``ewc``     ``ewc`` with the empirical diagonal Fisher summed over tasks + Adam.
* ``gpm``     Adam (or the paper's plain SGD) whose final update is kept
              orthogonal to the span of earlier tasks' layer inputs
              (``gpm_memory`` + ``orthogonal_to('left')``).
* ``sculpt``  AdamW whose final update is kept out of each weight's top singular
              directions, the rank set per layer by its importance
              (``sculpt_memory`` + ``orthogonal_to('two_sided')``).
* ``sculpt_released``  the same with the rank schedule of the authors'
              released code, ``floor(max(m, n) · 0.07 t)`` after t tasks
              (``sculpt_memory(rule='released')``).
* ``gpm_ewc`` the recommended configuration (``continual.gpm_ewc``): EWC's
              penalty on Adam, GPM's input memory at a low energy threshold
              projected out of Adam's gradient and step.

Task sequences (``--tasks``):

* ``split`` (default, task-incremental): task t is digits {2t, 2t+1}; one
  shared head, the logits restricted to the task's classes in training and
  evaluation.
* ``permuted`` (domain-incremental): task 0 is the digits, task t a fixed
  random permutation of the 64 pixels; one shared 10-way head. Harder for
  sculpt, whose memory is the weights' own singular directions (see
  ``benchmarks/README.md``, Continual).
* ``rotated`` (domain-incremental): task t is the digits rotated by
  ``t * rotation_degrees`` (bilinear, ``scipy.ndimage.rotate``); one shared
  10-way head.

Continual byte-level language modelling across text domains is in
``examples/continual_lm.py``.

Digits are split once into train / validation / test (60/20/20, stratified by
the seed). Hyper-parameters (``DEFAULTS``) were chosen per method on the
validation split by ``python -m benchmarks.continual --tune --tasks split``
(``permuted``, ``rotated``); every number this script prints is on the test split. After
each task the script records the accuracy on every task (the accuracy matrix
``R[i, j]``: after training task ``i``, on task ``j``) and reports average
accuracy, backward transfer (forgetting) and forward transfer (Lopez-Paz and
Ranzato, GEM, 2017).

Usage::

  python examples/continual.py                    # default: 5 split tasks
  python examples/continual.py --quick            # CI-sized (seconds)
  python examples/continual.py --tasks permuted --json out.json --plot out.png
  python examples/continual.py --schedule rewarm  # LR re-warmed at every task
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import pathlib
import time
import types
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from examples import continual_common as common
from subspace_optax import continual

METHODS = common.METHODS

# Chosen per method on the validation split, seed 0, by
# ``python -m benchmarks.continual --tune --tasks split|permuted|rotated`` (the
# grids and every run: benchmarks/results/continual_tuning_<tasks>.json).
DEFAULTS: dict[str, dict[str, dict[str, Any]]] = {
    'permuted': {
        'naive': {'learning_rate': 1e-3},
        'l2': {'learning_rate': 3e-3, 'strength': 1e-2},
        'ewc': {'learning_rate': 3e-3, 'strength': 100.0},
        'gpm': {'learning_rate': 3e-3, 'threshold': 0.97},
        'sculpt': {'learning_rate': 1e-3, 'min_fraction': 0.1,
                   'max_fraction': 0.5, 'weight_decay': 0.0},
        # Optional sculpt keys: 'normalization' ('max' | 'minmax', see
        # sculpt_memory) and 'mode' ('two_sided' | 'block').
        'sculpt_released': {'learning_rate': 1e-3, 'weight_decay': 0.1},
        'gpm_ewc': {'learning_rate': 3e-3, 'threshold': 0.9, 'strength': 100.0},
    },
    'rotated': {
        'naive': {'learning_rate': 1e-3},
        'l2': {'learning_rate': 3e-3, 'strength': 1e-3},
        'ewc': {'learning_rate': 3e-3, 'strength': 1000.0},
        'gpm': {'learning_rate': 3e-3, 'threshold': 0.97},
        'sculpt': {'learning_rate': 3e-3, 'min_fraction': 0.1,
                   'max_fraction': 0.5, 'weight_decay': 0.0},
        'sculpt_released': {'learning_rate': 3e-3, 'weight_decay': 0.0},
        'gpm_ewc': {'learning_rate': 3e-3, 'threshold': 0.97,
                    'strength': 100.0},
    },
    'split': {
        'naive': {'learning_rate': 1e-3},
        'l2': {'learning_rate': 1e-3, 'strength': 0.1},
        'ewc': {'learning_rate': 1e-3, 'strength': 1e8},
        'gpm': {'optimizer': 'sgd', 'learning_rate': 0.1, 'threshold': 0.9},
        'sculpt': {'learning_rate': 1e-3, 'min_fraction': 0.1,
                   'max_fraction': 0.5, 'weight_decay': 0.1},
        'sculpt_released': {'learning_rate': 1e-3, 'weight_decay': 0.0},
        'gpm_ewc': {'learning_rate': 1e-3, 'threshold': 0.9,
                    'strength': 1e5},
    },
}


@dataclasses.dataclass(frozen=True)
class Config:
  tasks: str = 'split'  # 'split', 'permuted' or 'rotated'
  num_tasks: int = 5
  rotation_degrees: float = 20.0  # 'rotated': the angle between tasks
  width: int = 128
  depth: int = 2  # square hidden layers (their importance sets sculpt's rank)
  steps_per_task: int = 300
  batch_size: int = 32
  memory_samples: int = 300  # examples per task for Fisher / activations
  schedule: str = 'constant'  # or 'rewarm': warm-up + cosine, restarted per task
  seed: int = 0


# ----------------------------------------------------------------------------
# Data.


@dataclasses.dataclass(frozen=True)
class Tasks:
  """Every task's splits, zero-padded to one shape (so nothing retraces)."""

  names: list[str]
  class_mask: np.ndarray  # (T, 10) bool: the classes of each task
  train_x: np.ndarray  # (T, N, 64)
  train_y: np.ndarray  # (T, N)
  train_size: np.ndarray  # (T,)
  val_x: np.ndarray
  val_y: np.ndarray
  val_valid: np.ndarray  # (T, N) bool: real (not padding) examples
  test_x: np.ndarray
  test_y: np.ndarray
  test_valid: np.ndarray


def _split_indices(labels: np.ndarray, seed: int):
  """Stratified 60/20/20 train/validation/test indices."""
  rng = np.random.default_rng(seed)
  parts = ([], [], [])
  for label in np.unique(labels):
    idx = rng.permutation(np.flatnonzero(labels == label))
    a, b = int(0.6 * len(idx)), int(0.8 * len(idx))
    for part, chunk in zip(parts, (idx[:a], idx[a:b], idx[b:])):
      part.append(chunk)
  return [rng.permutation(np.concatenate(p)) for p in parts]


def _pad(arrays: list[np.ndarray]):
  size = max(len(a) for a in arrays)
  out = np.stack([np.concatenate(
      [a, np.zeros((size - len(a),) + a.shape[1:], a.dtype)]) for a in arrays])
  valid = np.stack([np.arange(size) < len(a) for a in arrays])
  return out, valid


def rotate(x: np.ndarray, degrees: float) -> np.ndarray:
  """Rotate flattened 8x8 images (``(N, 64)`` in [0, 1]) about their centre."""
  from scipy import ndimage  # pylint: disable=import-outside-toplevel
  images = x.reshape(-1, 8, 8)
  turned = ndimage.rotate(images, degrees, axes=(1, 2), reshape=False,
                          order=1, mode='constant')
  return np.clip(turned, 0.0, 1.0).reshape(x.shape).astype(np.float32)


def load_tasks(config: Config) -> Tasks:
  """The task sequence from scikit-learn's bundled digits (no download)."""
  from sklearn.datasets import load_digits  # pylint: disable=import-outside-toplevel
  digits = load_digits()
  x = (digits.data / 16.0).astype(np.float32)
  y = digits.target.astype(np.int32)
  splits = [(x[i], y[i]) for i in _split_indices(y, config.seed)]
  rng = np.random.default_rng([config.seed, 1])
  names, masks, per_task = [], [], []
  for t in range(config.num_tasks):
    if config.tasks == 'permuted':
      perm = np.arange(64) if t == 0 else rng.permutation(64)
      names.append('digits' if t == 0 else f'permuted {t}')
      masks.append(np.ones(10, bool))
      per_task.append([(sx[:, perm], sy) for sx, sy in splits])
    elif config.tasks == 'split':
      if config.num_tasks > 5:
        raise ValueError('split digits has at most 5 tasks.')
      classes = (2 * t, 2 * t + 1)
      names.append(f'{classes[0]} vs {classes[1]}')
      mask = np.zeros(10, bool)
      mask[list(classes)] = True
      masks.append(mask)
      per_task.append([(sx[np.isin(sy, classes)], sy[np.isin(sy, classes)])
                       for sx, sy in splits])
    elif config.tasks == 'rotated':
      angle = t * config.rotation_degrees
      names.append(f'rotated {angle:g}')
      masks.append(np.ones(10, bool))
      per_task.append([(rotate(sx, angle), sy) for sx, sy in splits])
    else:
      raise ValueError(f'Unknown task sequence {config.tasks!r}.')
  columns = {}
  for k, split in enumerate(('train', 'val', 'test')):
    columns[split + '_x'], valid = _pad([task[k][0] for task in per_task])
    columns[split + '_y'], _ = _pad([task[k][1] for task in per_task])
    columns[split + '_valid'] = valid
  return Tasks(
      names=names, class_mask=np.stack(masks),
      train_size=np.array([len(task[0][1]) for task in per_task]),
      **{k: v for k, v in columns.items() if k != 'train_valid'})


# ----------------------------------------------------------------------------
# Model.


class MLP(nnx.Module):
  """64 -> width -> (width -> width) x depth -> 10, ReLU, no biases.

  No biases: the orthogonal methods protect weight matrices only, and every
  method trains the same model.
  """

  def __init__(self, width: int, depth: int, *, rngs: nnx.Rngs):
    self.inputs = nnx.Linear(64, width, use_bias=False, rngs=rngs)
    self.hidden = nnx.List([nnx.Linear(width, width, use_bias=False, rngs=rngs)
                            for _ in range(depth)])
    self.head = nnx.Linear(width, 10, use_bias=False, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.trace(x)[0]

  def trace(self, x: jax.Array):
    """Logits, and each layer's input and (pre-activation) output."""
    layer_inputs, layer_outputs = {}, {}
    h = x
    for name, layer in [('inputs', self.inputs)] + [
        (f'hidden.{i}', layer) for i, layer in enumerate(self.hidden)]:
      layer_inputs[name] = h
      layer_outputs[name] = layer(h)
      h = jax.nn.relu(layer_outputs[name])
    layer_inputs['head'] = h
    logits = self.head(h)
    layer_outputs['head'] = logits
    return logits, layer_inputs, layer_outputs


def _per_kernel(params, values: dict[str, Any]):
  """A params-shaped tree with ``values[layer]`` at each kernel, None elsewhere."""
  def pick(path, _):
    keys = [getattr(k, 'key', getattr(k, 'idx', None)) for k in path]
    name = keys[0] if keys[0] != 'hidden' else f'hidden.{keys[1]}'
    return values.get(name) if keys[-1] == 'kernel' else None
  return jax.tree_util.tree_map_with_path(pick, params)


# ----------------------------------------------------------------------------
# What the methods need from the model (examples/continual_common.py).


def _model(net) -> common.Model:
  """Fisher of one ``(x, y, class_mask)`` example; sculpt's importance
  ``cos(x, W x)`` of the square hidden layers (Sculpting Subspaces); GPM's
  layer inputs."""

  def importance(params, samples):
    _, layer_inputs, layer_outputs = net.apply_trace(params, samples[0])
    return _per_kernel(params, {
        k: continual.activation_importance(layer_inputs[k], layer_outputs[k])
        for k in layer_inputs if k.startswith('hidden')})

  def layer_inputs(params, samples):
    return _per_kernel(params, net.apply_trace(params, samples[0])[1])

  return common.Model(loss_one=net.loss_one, fisher_batch_size=100,
                      importance=importance, layer_inputs=layer_inputs)


def learning_rate(hyper: dict[str, Any], config: Config):
  """``hyper``'s rate, constant or re-warmed at every task."""
  lr = hyper['learning_rate']
  if config.schedule == 'rewarm':  # continual pre-training style
    return continual.rewarm_schedule(
        lr, config.steps_per_task, max(1, config.steps_per_task // 10),
        end_value=0.1 * lr)
  if config.schedule != 'constant':
    raise ValueError(f'Unknown schedule {config.schedule!r}.')
  return lr


# ----------------------------------------------------------------------------
# Training and evaluation.


@functools.lru_cache(maxsize=8)
def network(width: int, depth: int, seed: int) -> types.SimpleNamespace:
  """The initial weights and the jitted functions shared by every method (so
  each is compiled once per run, not once per method)."""
  model = MLP(width, depth, rngs=nnx.Rngs(seed))
  graphdef, state = nnx.split(model)

  def module(p):
    template = jax.tree.map(lambda v: v, state)
    nnx.replace_by_pure_dict(template, p)
    return nnx.merge(graphdef, template)

  def masked_logits(p, x, mask):
    return jnp.where(mask, module(p)(x), -1e9)

  def loss_one(p, example):
    """Negative log-likelihood of one ``(x, y, class_mask)`` example."""
    x, y, mask = example
    return optax.softmax_cross_entropy_with_integer_labels(
        masked_logits(p, x[None], mask), y[None])[0]

  @jax.jit
  def accuracies(p, x, y, valid, mask):
    def one(xt, yt, vt, mt):
      hit = jnp.argmax(masked_logits(p, xt, mt), -1) == yt
      return jnp.sum(hit * vt) / jnp.sum(vt)
    return jax.vmap(one)(x, y, valid, mask)

  return types.SimpleNamespace(
      initial=nnx.to_pure_dict(state), masked_logits=masked_logits,
      loss_one=loss_one, accuracies=accuracies,
      apply_trace=jax.jit(lambda p, x: module(p).trace(x)))


def run_method(name: str, hyper: dict[str, Any], tasks: Tasks,
               config: Config, return_params: bool = False, *,
               make_method: Callable[..., Any] = common.make_method
               ) -> dict[str, Any]:
  """Train one method on the whole sequence; returns its accuracy matrices
  (and the final params, not JSON-ready, with ``return_params``).

  ``make_method(name, hyper, model, learning_rate)`` builds the method
  (default: the examples' table, ``continual_common.make_method``; the
  benchmarks pass their own).
  """
  net = network(config.width, config.depth, config.seed)
  params = net.initial
  method = make_method(name, hyper, _model(net), learning_rate(hyper, config))
  tx = method.tx
  opt_state = tx.init(params)

  @jax.jit
  def train_task(params, opt_state, x, y, size, mask, key):
    def step(carry, step_key):
      params, opt_state = carry
      index = jax.random.randint(step_key, (config.batch_size,), 0, size)
      def loss(p):
        return optax.softmax_cross_entropy_with_integer_labels(
            net.masked_logits(p, x[index], mask), y[index]).mean()
      value, grads = jax.value_and_grad(loss)(params)
      updates, opt_state = tx.update(grads, opt_state, params)
      return (optax.apply_updates(params, updates), opt_state), value
    keys = jax.random.split(key, config.steps_per_task)
    (params, opt_state), losses = jax.lax.scan(step, (params, opt_state), keys)
    return params, opt_state, losses

  masks = jnp.asarray(tasks.class_mask)
  evaluate = lambda p, split: np.asarray(net.accuracies(
      p, getattr(tasks, split + '_x'), getattr(tasks, split + '_y'),
      getattr(tasks, split + '_valid'), masks))
  baseline_test = evaluate(params, 'test')  # random init, for forward transfer
  baseline_val = evaluate(params, 'val')
  start = time.perf_counter()
  key = jax.random.key(config.seed)

  def train(t, params, opt_state):
    params, opt_state, losses = train_task(
        params, opt_state, tasks.train_x[t], tasks.train_y[t],
        int(tasks.train_size[t]), masks[t], jax.random.fold_in(key, t))
    return params, opt_state, float(jnp.mean(losses[-20:]))

  def samples(t):  # the first examples of task t: (x, y, class masks)
    n = min(int(tasks.train_size[t]), config.memory_samples)
    return (tasks.train_x[t, :n], tasks.train_y[t, :n],
            np.broadcast_to(tasks.class_mask[t], (n, 10)))

  params, opt_state, matrices, final_loss, boundaries = common.run_tasks(
      config.num_tasks, method, params, opt_state, train=train,
      evaluate=lambda p: {'test': evaluate(p, 'test'),
                          'val': evaluate(p, 'val')}, samples=samples)
  test, val = matrices['test'], matrices['val']
  seconds = time.perf_counter() - start
  extra = {'params': params} if return_params else {}
  return {**extra,
      'method': name, 'hyper': hyper,
      'test': test.tolist(), 'val': val.tolist(),
      'test_summary': continual.accuracy_summary(test, baseline_test),
      'val_summary': continual.accuracy_summary(val, baseline_val),
      'final_train_loss': final_loss, 'seconds': seconds,
      'boundary_seconds': boundaries,
      'protected': (continual.protected_fraction(continual.get_memory(opt_state))
                    if name in common.PROTECTING else None),
  }


def run(config: Config, methods: Sequence[str] = METHODS,
        hyper: Optional[dict[str, dict[str, Any]]] = None, *,
        make_method: Callable[..., Any] = common.make_method) -> dict[str, Any]:
  """Every method on the same task sequence; JSON-ready results."""
  tasks = load_tasks(config)
  hyper = {**DEFAULTS[config.tasks], **(hyper or {})}
  results = {name: run_method(name, hyper[name], tasks, config,
                              make_method=make_method)
             for name in methods}
  return {'config': dataclasses.asdict(config), 'tasks': tasks.names,
          'results': results}


# ----------------------------------------------------------------------------
# Reporting.


def format_matrix(matrix, names) -> str:
  width = max(len(n) for n in names) + 2
  lines = ['after \\ on'.ljust(width) + ''.join(n[:10].rjust(11) for n in names)]
  for i, row in enumerate(np.asarray(matrix)):
    lines.append(names[i].ljust(width) + ''.join(
        f'{100 * v:10.1f}%' for v in row))
  return '\n'.join(lines)


def format_report(report: dict[str, Any]) -> str:
  names = report['tasks']
  out = []
  for name, result in report['results'].items():
    summary = result['test_summary']
    out.append(f'== {name} {result["hyper"]} ({result["seconds"]:.1f} s)')
    out.append(format_matrix(result['test'], names))
    out.append(
        f'   average accuracy {100 * summary["average_accuracy"]:.1f}%   '
        f'backward transfer {100 * summary["backward_transfer"]:+.1f} pp   '
        f'forward transfer {100 * summary["forward_transfer"]:+.1f} pp')
  out.append('')
  out.append(f'{"method":8s} {"ACC":>7s} {"BWT":>8s} {"FWT":>8s}')
  for name, result in report['results'].items():
    s = result['test_summary']
    out.append(f'{name:8s} {100 * s["average_accuracy"]:6.1f}% '
               f'{100 * s["backward_transfer"]:+7.1f}pp '
               f'{100 * s["forward_transfer"]:+7.1f}pp')
  return '\n'.join(out)


def plot(report: dict[str, Any], path: str | pathlib.Path) -> None:
  """One accuracy-matrix heatmap per method (matplotlib, Agg backend)."""
  config = report['config']
  common.plot_matrices(
      report, path, values=lambda m: 100 * np.asarray(m), limits=(0, 100),
      cmap='viridis', number_format='{:.0f}',
      title=lambda s: (f'ACC {100 * s["average_accuracy"]:.1f}%  '
                       f'BWT {100 * s["backward_transfer"]:+.1f}'),
      task_labels=None, axis_name='task', colorbar_label='test accuracy (%)',
      suptitle=f'{config["tasks"]} digits (seed {config["seed"]}): test '
      'accuracy matrix per method', panel_width=2.9, high_is_dark=False)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--tasks', choices=('split', 'permuted', 'rotated'),
                      default='split')
  parser.add_argument('--num-tasks', type=int, default=5)
  parser.add_argument('--methods', default=','.join(METHODS))
  parser.add_argument('--steps', type=int, default=None,
                      help='training steps per task (default 300)')
  parser.add_argument('--schedule', choices=('constant', 'rewarm'),
                      default='constant',
                      help='learning rate: constant, or warm-up + cosine '
                      'restarted at every task (rewarm_schedule)')
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--quick', action='store_true',
                      help='CI-sized run: 3 tasks, 100 steps, narrow model')
  parser.add_argument('--json', default=None, help='write the results here')
  parser.add_argument('--plot', default=None, help='write the heatmap PNG here')
  return parser.parse_args(argv)


def config_from_args(args: argparse.Namespace) -> Config:
  config = Config(tasks=args.tasks, num_tasks=args.num_tasks, seed=args.seed,
                  schedule=args.schedule)
  if args.quick:
    config = dataclasses.replace(config, num_tasks=min(args.num_tasks, 3),
                                 width=32, depth=1, steps_per_task=100,
                                 memory_samples=100)
  if args.steps is not None:
    config = dataclasses.replace(config, steps_per_task=args.steps)
  return config


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
  args = parse_args(argv)
  config = config_from_args(args)
  methods = [m for m in args.methods.split(',') if m]
  report = run(config, methods)
  print(format_report(report))
  if args.json:
    pathlib.Path(args.json).write_text(json.dumps(report, indent=1))
  if args.plot:
    plot(report, args.plot)
  return report


if __name__ == '__main__':
  main()
