"""The continual-learning benchmarks' method table: names, the bar, builders.

Every method that ``benchmarks/continual.py`` and
``benchmarks/continual_gpu.py`` run is a name in :data:`METHODS`, built by
:func:`make_method` from its hyper-parameters: an optax transform and what
happens at each task boundary (move the L2 anchor, consolidate EWC's Fisher,
grow the GPM or sculpt memory). :data:`RECOMMENDED` is the configuration the
benchmark holds to its bar against :data:`BASELINES` (declared before its test
ran; see ``benchmarks/README.md``, Continual).

The benchmarks run the examples' tasks, models and training loops
(``examples/continual.py``, ``examples/continual_lm.py``: their
``run_method(..., make_method=)``) with this table, and import no method
table from the examples. The examples keep their own copy of the builder
(``examples/continual_common.py``), so that ``python -m examples.continual``
runs without the benchmarks; ``tests/benchmark_methods_test.py`` checks that
both build the same transforms, since the examples' ``DEFAULTS`` were tuned
here.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Callable, Optional, Protocol

import optax

from subspace_optax import continual

METHODS = ('naive', 'l2', 'ewc', 'gpm', 'sculpt', 'sculpt_released',
           'gpm_ewc')
# The recommended configuration (declared before its test runs): GPM's
# input projection at a low energy threshold on EWC-regularised Adam.
RECOMMENDED = 'gpm_ewc'
# The baselines the recommendation must match or beat on every sequence.
BASELINES = ('naive', 'l2', 'ewc')


class Model(Protocol):
  """What the methods need from an example's model (the examples'
  ``continual_common.Model`` has these attributes).

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
  layer_inputs: Optional[Callable[[Any, Any], Any]]
  dimension_numbers: Any


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
    model: the example's model (:class:`Model`).
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
