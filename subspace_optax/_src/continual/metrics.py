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
  """An empty ``T x T`` accuracy matrix (NaN until recorded)."""
  if num_tasks < 1:
    raise ValueError(f'`num_tasks` must be >= 1, got {num_tasks}.')
  return np.full((num_tasks, num_tasks), np.nan)


def record(matrix: np.ndarray, trained: int, accuracies: Sequence[float]
           ) -> np.ndarray:
  """A copy of ``matrix`` with row ``trained`` set to ``accuracies`` (one per
  task, evaluated right after training on task ``trained``)."""
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
  (default the last task, i.e. the mean of the last row)."""
  matrix = _square(matrix)
  after = matrix.shape[0] - 1 if after is None else after
  return float(np.mean(matrix[after, :after + 1]))


def backward_transfer(matrix) -> float:
  """``BWT``: mean change of each earlier task's accuracy from right after it
  was learned to the end (negative = forgetting). 0 for a single task."""
  matrix = _square(matrix)
  last = matrix.shape[0] - 1
  if last == 0:
    return 0.0
  return float(np.mean(matrix[last, :last] - np.diag(matrix)[:last]))


def forward_transfer(matrix, baseline: Sequence[float]) -> float:
  """``FWT``: mean accuracy on each task just before training on it, minus the
  accuracy ``baseline[j]`` of an independent random initialisation."""
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
  tasks of the best accuracy ever reached minus the final one (>= 0)."""
  matrix = _square(matrix)
  last = matrix.shape[0] - 1
  if last == 0:
    return 0.0
  best = np.max(matrix[:last, :last], axis=0)
  return float(np.mean(best - matrix[last, :last]))


def accuracy_summary(matrix, baseline: Optional[Sequence[float]] = None) -> dict:
  """``{'average_accuracy', 'backward_transfer', 'forgetting'[,
  'forward_transfer']}`` of an accuracy matrix."""
  out = {
      'average_accuracy': average_accuracy(matrix),
      'backward_transfer': backward_transfer(matrix),
      'forgetting': forgetting(matrix),
  }
  if baseline is not None:
    out['forward_transfer'] = forward_transfer(matrix, baseline)
  return out
