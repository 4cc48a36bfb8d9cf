"""Tests of the continual-learning metrics (GEM definitions)."""

import numpy as np
import pytest

from subspace_optax import continual as cl


def _matrix():
  matrix = cl.accuracy_matrix(3)
  assert np.isnan(matrix).all()
  matrix = cl.record(matrix, 0, [0.9, 0.2, 0.1])
  matrix = cl.record(matrix, 1, [0.7, 0.8, 0.3])
  return cl.record(matrix, 2, [0.6, 0.75, 0.95])


def test_average_accuracy_and_transfers():
  matrix = _matrix()
  assert cl.average_accuracy(matrix) == pytest.approx((0.6 + 0.75 + 0.95) / 3)
  assert cl.average_accuracy(matrix, after=1) == pytest.approx(0.75)
  assert cl.backward_transfer(matrix) == pytest.approx(
      ((0.6 - 0.9) + (0.75 - 0.8)) / 2)
  baseline = [0.1, 0.1, 0.1]
  assert cl.forward_transfer(matrix, baseline) == pytest.approx(
      ((0.2 - 0.1) + (0.3 - 0.1)) / 2)
  assert cl.forgetting(matrix) == pytest.approx(((0.9 - 0.6) + (0.8 - 0.75)) / 2)
  summary = cl.accuracy_summary(matrix, baseline)
  assert set(summary) == {'average_accuracy', 'backward_transfer', 'forgetting',
                          'forward_transfer'}


def test_single_task_and_errors():
  one = cl.record(cl.accuracy_matrix(1), 0, [0.5])
  assert cl.backward_transfer(one) == 0.0
  assert cl.forward_transfer(one, [0.1]) == 0.0
  with pytest.raises(ValueError, match='one per task'):
    cl.record(cl.accuracy_matrix(2), 0, [0.5])
  with pytest.raises(ValueError, match='square'):
    cl.average_accuracy(np.ones((2, 3)))
