"""Tests of layout: which axis of a leaf the basis lies on, and which leaves
are matrices at all."""

import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import subspace_optax as so
from subspace_optax._src.pipeline import layout as layout_lib

# A Flax kernel is (in, out): the reduction axis (rows) is the input side.
SQUARE, TALL, WIDE = (5, 5), (7, 4), (3, 6)


def _gradient(shape, seed=0):
  return jax.random.normal(jax.random.key(seed), shape)


def _projector(q):
  q = np.asarray(q, np.float64)
  return q @ q.T


def _reference_basis(gradient, rank=2):
  """The basis ``side='reference'`` keeps for one kernel after one update."""
  tx = so.low_rank(optax.identity(), rank=rank, refresh=1, basis='svd',
                   side='reference')
  params = {'w': jnp.zeros(gradient.shape)}
  _, state = tx.update({'w': gradient}, tx.init(params), params)
  return state.basis['w']


@pytest.mark.parametrize('shape, input_side', [
    (SQUARE, True), (TALL, False), (WIDE, True)])
def test_reference_side_puts_the_basis_where_galore_torch_does(
    shape, input_side):
  """galore-torch (proj_type='std') on the PyTorch weight (out, in) = our
  kernelᵀ: basis on `in` when out >= in (square included), else on `out`."""
  gradient = _gradient(shape)
  u, _, vh = np.linalg.svd(np.asarray(gradient, np.float64))
  expected = u[:, :2] if input_side else vh[:2].T  # rows = in, columns = out
  q = _reference_basis(gradient)
  assert q.shape == (shape[0] if input_side else shape[1], 2)
  np.testing.assert_allclose(_projector(q), _projector(expected), atol=1e-5)
  lay = layout_lib.make_layout(
      'w', shape, so.DimensionNumbers(0, 1), 'reference', 2)
  assert lay.project_rows == input_side


@pytest.mark.slow  # imports torch and transformers (faithfulness)
@pytest.mark.skipif(
    importlib.util.find_spec('torch') is None
    or importlib.util.find_spec('galore_torch') is None,
    reason='the reference extra (torch, galore-torch) is not installed')
def test_square_kernel_projection_matches_galore_torch_projector():
  import torch  # pylint: disable=g-import-not-at-top
  # pylint: disable-next=g-import-not-at-top
  from galore_torch import galore_projector

  gradient = _gradient(SQUARE, seed=3)
  # PyTorch's Linear weight is (out, in): our kernel's gradient, transposed.
  torch_gradient = torch.tensor(np.asarray(gradient).T.copy())
  projector = galore_projector.GaLoreProjector(
      rank=2, update_proj_gap=200, scale=1.0, proj_type='std')
  low = projector.project(torch_gradient, 0)
  theirs = projector.project_back(low).numpy().T  # back in (in, out)
  q = np.asarray(_reference_basis(gradient), np.float64)
  ours = q @ (q.T @ np.asarray(gradient, np.float64))
  np.testing.assert_allclose(ours, theirs, atol=1e-5)
  # The basis spans the same axis: galore-torch's rows of Vh are `in` vectors.
  np.testing.assert_allclose(
      _projector(q), _projector(projector.ortho_matrix.numpy().T), atol=1e-5)


@pytest.mark.parametrize('shape, rows', [(SQUARE, True), (TALL, True),
                                         (WIDE, False)])
def test_compact_side_projects_the_larger_dimension(shape, rows):
  lay = layout_lib.make_layout(
      'w', shape, so.DimensionNumbers(0, 1), 'compact', 2)
  assert lay.project_rows == rows
  assert lay.projected_dim == max(shape)


@pytest.mark.parametrize('side, rows', [('left', True), ('right', False)])
def test_forced_sides(side, rows):
  for shape in (SQUARE, TALL, WIDE):
    lay = layout_lib.make_layout('w', shape, so.DimensionNumbers(0, 1), side, 2)
    assert lay.project_rows == rows


def test_matrix_view_round_trip_and_orientation():
  x = jnp.arange(2 * 3 * 4 * 5, dtype=jnp.float32).reshape(2, 3, 4, 5)
  numbers = so.DimensionNumbers(reduction_axis=(1, 3), output_axis=2)
  lay = layout_lib.make_layout('x', x.shape, numbers, 'left', 2)
  assert (lay.batch_shape, lay.rows, lay.columns) == ((2,), 15, 4)
  view = layout_lib.matrix_view(x, lay)
  assert view.shape == (2, 15, 4)  # projected (rows) axis first
  np.testing.assert_array_equal(view[1, 2 * 5 + 3, 1], x[1, 2, 1, 3])
  np.testing.assert_array_equal(layout_lib.leaf_from_matrix(view, lay), x)
  right = layout_lib.make_layout('x', x.shape, numbers, 'right', 2)
  assert layout_lib.matrix_view(x, right).shape == (2, 4, 15)
  np.testing.assert_array_equal(
      layout_lib.leaf_from_matrix(layout_lib.matrix_view(x, right), right), x)


def test_zero_size_and_abstract_leaves():
  params = {'w': jax.ShapeDtypeStruct((6, 4), jnp.float32),
            'stack': jax.ShapeDtypeStruct((2, 6, 4), jnp.float32),
            'empty': jnp.zeros((0, 5)), 'empty_stack': jnp.zeros((0, 3, 4)),
            'b': jax.ShapeDtypeStruct((4,), jnp.float32)}
  layouts = layout_lib.leaf_layouts(params, so.last_two_axes, 'compact', 2)
  assert layouts['empty'] is None and layouts['empty_stack'] is None
  assert layouts['b'] is None
  assert layouts['w'].shape == (6, 4) and layouts['stack'].batch_shape == (2,)
  default = layout_lib.leaf_layouts(params, None, 'compact', 2)
  assert default['stack'] is None and default['w'] is not None


def test_the_default_side_is_reference():
  """Chosen on the quality benchmark at equal state bytes (see low_rank's
  docstring): the basis spans the smaller dimension by default."""
  params = {'tall': jnp.ones((8, 6)), 'wide': jnp.ones((6, 8))}
  for tx in (so.galore(1e-3, rank=2),
             so.low_rank(optax.scale_by_adam(), rank=2)):
    state = tx.init(params)
    basis = (state if isinstance(state, so.SubspaceState) else state[0]).basis
    assert basis['tall'].shape == (6, 2) and basis['wide'].shape == (6, 2)
