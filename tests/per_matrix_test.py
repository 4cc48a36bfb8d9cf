"""Tests of the per-matrix schedules: the same maths, looped or vectorised."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import subspace_optax as so
from subspace_optax._src.pipeline import per_matrix


def _matmul(a, b):
  return (a @ b).astype(jnp.bfloat16)


def _stacks():
  keys = jax.random.split(jax.random.key(0), 2)
  return (jax.random.normal(keys[0], (3, 2, 5, 4)),
          jax.random.normal(keys[1], (3, 2, 4, 6)))


def test_over_matrices_equals_a_vmap_over_the_batch_axes():
  a, b = _stacks()
  expected = jax.vmap(jax.vmap(_matmul))(a, b)
  for schedule in (per_matrix.over_matrices, per_matrix.over_matrices_on_cpu):
    out = jax.jit(lambda a, b, s=schedule: s(_matmul, 2, a, b))(a, b)
    assert out.shape == (3, 2, 5, 6) and out.dtype == jnp.bfloat16
    np.testing.assert_array_equal(out, expected)


def test_over_matrices_into_writes_each_output_in_place_of_into():
  """With ``into``, the stacked output takes ``into``'s memory (a gradient
  stack whose update it is): same values, and XLA aliases the donated
  ``into`` to the output instead of allocating a new stack."""
  a, b = _stacks()
  into = jnp.zeros((3, 2, 5, 6), jnp.bfloat16)
  expected = jax.vmap(jax.vmap(_matmul))(a, b)
  for schedule in (per_matrix.over_matrices, per_matrix.over_matrices_on_cpu):
    out = jax.jit(lambda i, a, b, s=schedule: s(_matmul, 2, a, b, into=i))(
        into, a, b)
    np.testing.assert_array_equal(out, expected)
  shapes = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (into, a, b)]
  compiled = lambda write: jax.jit(
      lambda i, a, b: per_matrix.over_matrices(
          _matmul, 2, a, b, into=i if write else None),
      donate_argnums=0).lower(*shapes).compile().memory_analysis()
  assert compiled(False).alias_size_in_bytes == 0
  written = compiled(True)
  assert written.alias_size_in_bytes == into.nbytes
  assert written.output_size_in_bytes == into.nbytes


def test_over_matrices_of_an_empty_stack_is_empty():
  # The layer loop's zero-size placeholders stand for leaves outside a
  # one-layer update; with or without ``into`` their output is empty.
  a, b = (x[:, :0] for x in _stacks())
  into = jnp.zeros((3, 0, 5, 6), jnp.bfloat16)
  for target in (None, into):
    out = per_matrix.over_matrices(_matmul, 2, a, b, into=target)
    assert out.shape == (3, 0, 5, 6)


@pytest.mark.parametrize('platform, looped', [
    ('cpu', True), ('cuda', False), ('rocm', False)])
def test_over_matrices_on_cpu_loops_only_when_lowered_for_the_cpu(
    platform, looped):
  # On GPUs the vectorised QN fuses with its cast and p + u (no update tree
  # in memory); on the CPU a loop keeps the float32 temporaries to one
  # matrix.
  a, b = _stacks()
  text = jax.jit(lambda a, b: per_matrix.over_matrices_on_cpu(
      _matmul, 2, a, b)).trace(a, b).lower(
          lowering_platforms=(platform,)).as_text()
  assert ('stablehlo.while' in text) == looped


@pytest.mark.parametrize('residual', [None, optax.scale_by_sign()])
def test_low_rank_unprojects_the_whole_stack_at_once_only_on_gpus(residual):
  # QN of the (4, 6, 8) stack (basis on the 6 side) as one batched product
  # on GPUs; on the CPU one 6 x 8 matrix per loop iteration.
  params = {'w': jnp.ones((4, 8, 6))}
  tx = so.low_rank(optax.identity(), rank=2, basis='svd', residual=residual,
                   dimension_numbers=so.last_two_axes)
  state = tx.init(params)
  for platform, vectorised in (('cpu', False), ('cuda', True)):
    text = jax.jit(tx.update).trace(params, state).lower(
        lowering_platforms=(platform,)).as_text()
    products = [line for line in text.splitlines() if 'dot_general' in line]
    assert any(line.endswith('-> tensor<4x6x8xf32>') for line in products) == (
        vectorised), (platform, products)


def test_on_platform_called_eagerly_runs_the_branch_of_the_arrays_devices():
  # This machine's devices are CPUs; an eager platform_dependent would
  # compile both branches on every call.
  calls = []
  out = per_matrix.on_platform(
      jnp.ones(3), cpu=lambda x: calls.append('cpu') or x + 1,
      gpu=lambda x: calls.append('gpu') or x - 1)
  assert calls == ['cpu']
  np.testing.assert_array_equal(out, 2.0)
