"""What the two continual-learning examples share.

``examples/continual.py`` (digits, an MLP, accuracy) and
``examples/continual_lm.py`` (text domains, a tiny LLaMA, loss) differ in
their data, model and loss; this module holds the rest:

* the examples' methods (:data:`METHODS`, :func:`make_method`): an optax
  transform and what happens at each task boundary (move the L2 anchor,
  consolidate EWC's Fisher, grow the GPM or sculpt memory). The benchmarks
  own their table (``benchmarks/continual_methods.py``, with the recommended
  configuration and the baselines it is held against) and pass its builder to
  the examples' ``run_method(..., make_method=)``; this copy lets the
  examples run without the benchmarks;
* the task loop (:func:`run_tasks`) that fills the validation and test
  matrices ``M[i, j]``: after training task ``i``, on task ``j``;
* the summary of a loss matrix (:func:`loss_summary`);
* the heatmap of every method's matrix (:func:`plot_matrices`).
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from typing import Any, Callable, Optional

import jax
import numpy as np
import optax

from subspace_optax import continual

# The examples' methods; ``gpm_ewc`` is the recommended one
# (``continual.gpm_ewc``; see benchmarks/README.md, Continual).
METHODS = ('naive', 'l2', 'ewc', 'gpm', 'sculpt', 'sculpt_released',
           'gpm_ewc')
# The methods whose optimizer state holds a protected-subspace memory.
PROTECTING = ('gpm', 'sculpt', 'sculpt_released', 'gpm_ewc')


@dataclasses.dataclass(frozen=True)
class Model:
  """What the methods need from an example's model.

  Attributes:
    loss_one: ``(params, one sample) -> loss``, for EWC's empirical Fisher.
    fisher_batch_size: samples per vmapped Fisher batch.
    importance: ``(params, samples) -> tree``: a params-shaped tree with each
      kernel's importance score (sculpt's rank), None elsewhere.
    layer_inputs: ``(params, samples) -> tree``: each kernel's layer inputs
      (GPM's memory), None elsewhere; None when the model does not expose
      them (no GPM).
    dimension_numbers: the matrices sculpt protects (None: every 2-D leaf).
  """

  loss_one: Callable[..., Any]
  fisher_batch_size: int
  importance: Callable[[Any, Any], Any]
  layer_inputs: Optional[Callable[[Any, Any], Any]] = None
  dimension_numbers: Any = None


@dataclasses.dataclass
class Method:
  tx: optax.GradientTransformation
  # (params, opt_state, samples) -> opt_state, after each task but the last;
  # ``samples`` is a batch of the task's training data, ``(inputs, ...)``.
  boundary: Callable[[Any, Any, Any], Any]


def make_method(name: str, hyper: dict[str, Any], model: Model,
                learning_rate: optax.ScalarOrSchedule = None) -> Method:
  """One method with the hyper-parameters ``hyper``.

  Args:
    name: one of :data:`METHODS`.
    hyper: ``learning_rate`` and the method's own keys (``strength`` of l2,
      ewc and gpm_ewc; ``threshold`` of gpm and gpm_ewc; ``optimizer`` and
      ``unprotected`` of gpm; ``min_fraction``, ``max_fraction``,
      ``weight_decay`` and optional ``normalization`` and ``mode`` of sculpt;
      ``weight_decay`` and optional ``fraction_step`` of sculpt_released).
    model: the example's :class:`Model`.
    learning_rate: overrides ``hyper['learning_rate']`` (e.g. a schedule).
  """
  lr = hyper['learning_rate'] if learning_rate is None else learning_rate

  def nothing(params, opt_state, samples):
    del params, samples
    return opt_state

  if name == 'naive':
    return Method(optax.adam(lr), nothing)

  if name == 'l2':
    def move_anchor(params, opt_state, samples):
      del samples
      return optax.tree.set(opt_state, anchor=params)
    return Method(optax.chain(
        continual.l2_to_anchor(strength=hyper['strength']), optax.adam(lr)),
                  move_anchor)

  def consolidate(params, opt_state, samples):
    fisher = continual.fisher_diagonal(model.loss_one, params, samples,
                                       batch_size=model.fisher_batch_size)
    return continual.consolidate_ewc(opt_state, params, fisher)

  if name == 'ewc':
    return Method(optax.chain(
        continual.ewc(strength=hyper['strength']), optax.adam(lr)), consolidate)

  if name in ('gpm', 'gpm_ewc'):
    if model.layer_inputs is None:
      raise ValueError(f'{name} needs each layer\'s inputs, which this model '
                       'does not expose (Model.layer_inputs is None).')

    def grow(params, opt_state, samples):
      if name == 'gpm_ewc':
        opt_state = consolidate(params, opt_state, samples)
      memory = continual.gpm_memory(
          model.layer_inputs(params, samples), hyper['threshold'],
          continual.get_memory(opt_state), on_overflow='warn')
      return continual.set_memory(opt_state, memory)

    if name == 'gpm_ewc':
      return Method(continual.gpm_ewc(lr, strength=hyper['strength']), grow)
    inner = hyper.get('optimizer', 'adam')
    unprotected = hyper.get('unprotected', 'train')
    if inner not in ('adam', 'sgd'):
      raise ValueError(
          f"gpm's optimizer must be 'adam' or 'sgd', got {inner!r}.")
    if inner == 'sgd':  # the paper's recipe: plain SGD, then the projection
      return Method(continual.gpm(lr, unprotected=unprotected), grow)
    return Method(optax.chain(optax.adam(lr), continual.orthogonal_to(
        mode='left', unprotected=unprotected)), grow)

  if name in ('sculpt', 'sculpt_released'):
    mode = hyper.get('mode', 'two_sided')
    # The released rule protects up to every direction: a full capacity.
    max_fraction = 1.0 if name == 'sculpt_released' else hyper['max_fraction']
    finished = [0]  # tasks finished so far (the released rule's t)

    def sculpt(params, opt_state, samples):
      finished[0] += 1
      if name == 'sculpt_released':
        with warnings.catch_warnings():  # small matrices reach min(m, n)
          warnings.simplefilter('ignore', continual.RankClampedWarning)
          memory = continual.sculpt_memory(
              params, rule='released', task=finished[0],
              fraction_step=hyper.get('fraction_step', 0.07), mode=mode,
              max_fraction=max_fraction,
              dimension_numbers=model.dimension_numbers)
      else:
        memory = continual.sculpt_memory(
            params, model.importance(params, samples),
            min_fraction=hyper['min_fraction'],
            max_fraction=hyper['max_fraction'],
            normalization=hyper.get('normalization', 'max'), mode=mode,
            dimension_numbers=model.dimension_numbers)
      return continual.set_memory(opt_state, memory)
    return Method(continual.sculpt(
        lr, weight_decay=hyper['weight_decay'],
        max_fraction=max_fraction, mode=mode,
        dimension_numbers=model.dimension_numbers), sculpt)

  raise ValueError(f'Unknown method {name!r}; choose from {METHODS}.')


def run_tasks(count: int, method: Method, params, opt_state, *,
              train: Callable[..., tuple[Any, Any, Optional[float]]],
              evaluate: Callable[[Any], dict[str, np.ndarray]],
              samples: Callable[[int], Any]):
  """Train ``count`` tasks in turn, evaluating on every task after each.

  Args:
    count: number of tasks.
    method: its ``boundary`` runs after every task but the last (a
      :class:`Method`, or the benchmarks' ``continual_methods.Method``).
    params, opt_state: the starting point.
    train: ``(t, params, opt_state) -> (params, opt_state, final loss)``.
    evaluate: ``params -> {split: one value per task}``.
    samples: ``t -> samples`` of task ``t`` for the boundary.

  Returns:
    ``(params, opt_state, {split: matrix}, [final loss per task],
    [seconds of each task boundary])``.
  """
  matrices, final_losses, boundary_seconds = {}, [], []
  for t in range(count):
    params, opt_state, loss = train(t, params, opt_state)
    final_losses.append(loss)
    for split, row in evaluate(params).items():
      matrices.setdefault(split, continual.accuracy_matrix(count))
      matrices[split] = continual.record(matrices[split], t, row)
    if t + 1 < count:
      start = time.perf_counter()
      opt_state = jax.block_until_ready(
          method.boundary(params, opt_state, samples(t)))
      boundary_seconds.append(time.perf_counter() - start)
  return params, opt_state, matrices, final_losses, boundary_seconds


def loss_summary(matrix, baseline=None) -> dict[str, float]:
  """Metrics of a loss matrix (``continual.accuracy_summary`` of ``-L``, in nats)."""
  matrix = np.asarray(matrix, np.float64)
  out = {
      'average_loss': -continual.average_accuracy(-matrix),
      'forgetting': -continual.backward_transfer(-matrix),
      'max_forgetting': continual.forgetting(-matrix),
      'learned_loss': float(np.mean(np.diag(matrix))),
  }
  if baseline is not None:  # loss reduction on a task before training on it
    out['forward_transfer'] = continual.forward_transfer(-matrix, -baseline)
  return out


def plot_matrices(report: dict[str, Any], path, *,
                  values: Callable[[Any], np.ndarray],
                  limits: tuple[float, float],
                  cmap: str, number_format: str, title: Callable[[dict], str],
                  task_labels: Optional[list[str]], axis_name: str,
                  colorbar_label: str, suptitle: str, panel_width: float,
                  high_is_dark: bool) -> None:
  """One heatmap per method of ``report['results'][m]['test']``.

  Args:
    values: the test matrix -> the numbers shown (e.g. percentages).
    limits: the colour scale's ``(vmin, vmax)``.
    number_format: format of each cell's text, e.g. ``'{:.0f}'``.
    title: a method's summary -> its panel's title.
    task_labels: tick labels (None: task numbers).
    axis_name: 'task' or 'domain'.
    high_is_dark: the colour map is dark at high values (text turns white).
  """
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  results = report['results']
  low, high = limits
  fig, axes = plt.subplots(1, len(results), squeeze=False,
                           figsize=(panel_width * len(results) + 1.2, 3.6),
                           constrained_layout=True)
  for ax, (name, result) in zip(axes[0], results.items()):
    matrix = values(result['test'])
    image = ax.imshow(matrix, vmin=low, vmax=high, cmap=cmap)
    for i in range(matrix.shape[0]):
      for j in range(matrix.shape[1]):
        dark = (matrix[i, j] > (low + high) / 2) == high_is_dark
        ax.text(j, i, number_format.format(matrix[i, j]), ha='center',
                va='center', fontsize=7, color='white' if dark else 'black')
    ax.set_title(f'{name}\n{title(result["test_summary"])}', fontsize=9)
    if task_labels is None:
      ax.set_xticks(range(matrix.shape[1]))
      ax.set_yticks(range(matrix.shape[0]))
    else:
      ax.set_xticks(range(len(task_labels)), task_labels, rotation=45,
                    fontsize=7)
      ax.set_yticks(range(len(task_labels)), task_labels, fontsize=7)
    ax.set_xlabel(f'evaluated on {axis_name}')
    if ax is axes[0][0]:
      ax.set_ylabel(f'after training {axis_name}')
  fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8, label=colorbar_label)
  fig.suptitle(suptitle, fontsize=10)
  fig.savefig(path, dpi=120, bbox_inches='tight')
  plt.close(fig)
