"""Continual-learning metrics on the accuracy matrix (host-side, NumPy).

Lopez-Paz and Ranzato, `Gradient Episodic Memory for Continual Learning
<https://arxiv.org/abs/1706.08840>`_, NeurIPS 2017, §5: after training on task
``i`` (rows, ``0..T-1``) evaluate on every task ``j`` (columns):
``R[i, j]``. With ``b_j`` the accuracy of the model before any training on
task ``j``:

.. math::
  ACC = \\frac1T \\sum_j R_{T-1,j}, \\qquad
  BWT = \\frac1{T-1} \\sum_{j<T-1} (R_{T-1,j} - R_{j,j}), \\qquad
  FWT = \\frac1{T-1} \\sum_{j>0} (R_{j-1,j} - b_j).

Negative BWT is forgetting.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np


def accuracy_matrix(num_tasks: int) -> np.ndarray:
  """An empty ``T x T`` accuracy matrix (NaN until recorded).

  Args:
    num_tasks: ``T``.

  Returns:
    A float ``(T, T)`` numpy array of NaN; row ``i`` holds the accuracies
    on every task after training on task ``i``.

  Examples:
    >>> import subspace_optax as so
    >>> so.continual.accuracy_matrix(2)
    array([[nan, nan],
           [nan, nan]])
  """
  if num_tasks < 1:
    raise ValueError(f'`num_tasks` must be >= 1, got {num_tasks}.')
  return np.full((num_tasks, num_tasks), np.nan)


def record(matrix: np.ndarray, trained: int, accuracies: Sequence[float]
           ) -> np.ndarray:
  """A copy of ``matrix`` with row ``trained`` set to ``accuracies`` (one per
  task, evaluated right after training on task ``trained``).

  Args:
    matrix: an accuracy matrix.
    trained: the task just trained on (the row).
    accuracies: the accuracy on every task, ``T`` values.

  Returns:
    A new accuracy matrix (``matrix`` is not modified).

  Examples:
    >>> import subspace_optax as so
    >>> cl = so.continual
    >>> m = cl.record(cl.accuracy_matrix(2), 0, [0.9, 0.1])
    >>> m = cl.record(m, 1, [0.7, 0.8])
    >>> m
    array([[0.9, 0.1],
           [0.7, 0.8]])
  """
  matrix = np.array(matrix, dtype=np.float64, copy=True)
  accuracies = np.asarray(accuracies, dtype=np.float64)
  if accuracies.shape != (matrix.shape[1],):
    raise ValueError(f'Expected {matrix.shape[1]} accuracies (one per task), got '
                     f'shape {accuracies.shape}.')
  matrix[trained] = accuracies
  return matrix


def _square(matrix) -> np.ndarray:
  matrix = np.asarray(matrix, dtype=np.float64)
  if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
    raise ValueError(f'Expected a square T x T accuracy matrix, got shape '
                     f'{matrix.shape}.')
  return matrix


def average_accuracy(matrix, after: Optional[int] = None) -> float:
  """``ACC``: mean accuracy over tasks ``0..after`` after training on ``after``
  (default the last task, i.e. the mean of the last row).

  Args:
    matrix: an accuracy matrix.
    after: the last task trained on (default the last row).

  Returns:
    A float.

  Examples:
    >>> import subspace_optax as so
    >>> cl = so.continual
    >>> m = cl.record(cl.accuracy_matrix(2), 0, [0.9, 0.1])
    >>> m = cl.record(m, 1, [0.7, 0.8])
    >>> round(cl.average_accuracy(m), 6)
    0.75
  """
  matrix = _square(matrix)
  after = matrix.shape[0] - 1 if after is None else after
  return float(np.mean(matrix[after, :after + 1]))


def backward_transfer(matrix) -> float:
  """``BWT``: mean change of each earlier task's accuracy from right after it
  was learned to the end (negative = forgetting). 0 for a single task.

  Args:
    matrix: an accuracy matrix.

  Returns:
    A float.

  Examples:
    >>> import subspace_optax as so
    >>> cl = so.continual
    >>> m = cl.record(cl.accuracy_matrix(2), 0, [0.9, 0.1])
    >>> m = cl.record(m, 1, [0.7, 0.8])
    >>> round(cl.backward_transfer(m), 6)  # task 0 dropped from 0.9 to 0.7
    -0.2
  """
  matrix = _square(matrix)
  last = matrix.shape[0] - 1
  if last == 0:
    return 0.0
  return float(np.mean(matrix[last, :last] - np.diag(matrix)[:last]))


def forward_transfer(matrix, baseline: Sequence[float]) -> float:
  """``FWT``: mean accuracy on each task just before training on it, minus the
  accuracy ``baseline[j]`` of an independent random initialisation.

  Args:
    matrix: an accuracy matrix.
    baseline: the accuracy on each task of a random initialisation.

  Returns:
    A float.

  Examples:
    >>> import subspace_optax as so
    >>> cl = so.continual
    >>> m = cl.record(cl.accuracy_matrix(2), 0, [0.9, 0.1])
    >>> m = cl.record(m, 1, [0.7, 0.8])
    >>> round(cl.forward_transfer(m, [0.5, 0.05]), 6)  # 0.1 on task 1 before it
    0.05
  """
  matrix = _square(matrix)
  baseline = np.asarray(baseline, dtype=np.float64)
  if baseline.shape != (matrix.shape[0],):
    raise ValueError(f'`baseline` needs one accuracy per task '
                     f'({matrix.shape[0]}), got shape {baseline.shape}.')
  if matrix.shape[0] == 1:
    return 0.0
  before = np.array([matrix[j - 1, j] for j in range(1, matrix.shape[0])])
  return float(np.mean(before - baseline[1:]))


def forgetting(matrix) -> float:
  """Average forgetting (Chaudhry et al., arXiv 1801.10112): mean over earlier
  tasks of the best accuracy ever reached minus the final one (>= 0).

  Args:
    matrix: an accuracy matrix.

  Returns:
    A float, >= 0.

  Examples:
    >>> import subspace_optax as so
    >>> cl = so.continual
    >>> m = cl.record(cl.accuracy_matrix(2), 0, [0.9, 0.1])
    >>> m = cl.record(m, 1, [0.7, 0.8])
    >>> round(cl.forgetting(m), 6)
    0.2
  """
  matrix = _square(matrix)
  last = matrix.shape[0] - 1
  if last == 0:
    return 0.0
  best = np.max(matrix[:last, :last], axis=0)
  return float(np.mean(best - matrix[last, :last]))


def accuracy_summary(matrix, baseline: Optional[Sequence[float]] = None) -> dict:
  """``{'average_accuracy', 'backward_transfer', 'forgetting'[,
  'forward_transfer']}`` of an accuracy matrix.

  Args:
    matrix: an accuracy matrix.
    baseline: optional random-initialisation accuracies, for
      ``forward_transfer``.

  Returns:
    A dict of floats.

  Examples:
    >>> import subspace_optax as so
    >>> cl = so.continual
    >>> m = cl.record(cl.accuracy_matrix(2), 0, [0.9, 0.1])
    >>> m = cl.record(m, 1, [0.7, 0.8])
    >>> sorted(cl.accuracy_summary(m))
    ['average_accuracy', 'backward_transfer', 'forgetting']
  """
  out = {
      'average_accuracy': average_accuracy(matrix),
      'backward_transfer': backward_transfer(matrix),
      'forgetting': forgetting(matrix),
  }
  if baseline is not None:
    out['forward_transfer'] = forward_transfer(matrix, baseline)
  return out
