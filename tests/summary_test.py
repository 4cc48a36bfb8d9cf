"""summary(tx, params): per-leaf projection, basis, rank and state bytes."""

import jax
import jax.numpy as jnp
import optax

import subspace_optax as so

PARAMS = {'w': jnp.ones((64, 32)), 'stack': jnp.ones((3, 16, 40)),
          'b': jnp.ones((32,))}


def _by_path(report):
  return {leaf.path: leaf for leaf in report.leaves}


def test_galore_leaves_have_their_analytic_sizes():
  r = 4
  tx = so.galore(1e-3, rank=r, dimension_numbers=so.last_two_axes, side='compact')
  report = so.summary(tx, PARAMS)
  leaves = _by_path(report)
  w, stack, b = leaves["['w']"], leaves["['stack']"], leaves["['b']"]
  # Compact side: the basis spans the larger dimension k; the moments r x l.
  assert w.projected and w.rank == r and w.basis_shapes == ((64, r),)
  assert w.state_bytes == 4 * (64 * r + 2 * r * 32) + 8  # + refresh schedule
  assert stack.projected and stack.rank == r
  assert stack.basis_shapes == ((3, 40, r),)
  assert stack.state_bytes == 3 * 4 * (40 * r + 2 * r * 16) + 8
  assert not b.projected and b.rank is None and b.basis_shapes == ()
  assert b.state_bytes == 2 * 4 * 32  # full Adam moments
  assert w.adamw_bytes == 2 * 4 * 64 * 32
  # Everything is attributed: leaves + step counts = the whole state.
  assert report.state_bytes == so.state_bytes(
      jax.eval_shape(tx.init, PARAMS))
  assert report.state_bytes == so.state_sizes.galore_bytes(
      PARAMS, r, dimension_numbers=so.last_two_axes, side='compact')
  assert report.other_bytes == 8  # the pipeline's and Adam's counts


def test_reference_side_puts_the_basis_on_the_smaller_dimension():
  tx = so.galore(1e-3, rank=4, side='reference')
  w = _by_path(so.summary(tx, {'w': jnp.ones((64, 32))}))["['w']"]
  assert w.basis_shapes == ((32, 4),) and w.rank == 4


def test_plain_optax_projects_nothing_and_matches_adamw():
  report = so.summary(optax.adamw(1e-3), PARAMS)
  assert not any(leaf.projected for leaf in report.leaves)
  for leaf in report.leaves:
    assert leaf.state_bytes == leaf.adamw_bytes
  assert report.state_bytes == report.adamw_bytes + 4  # Adam's count


def test_the_table_names_every_leaf_and_the_totals():
  text = str(so.summary(so.galore(1e-3, rank=4, side='compact'), {'w': jnp.ones((64, 32))}))
  lines = text.splitlines()
  assert lines[0].split()[:3] == ['leaf', 'shape', 'projected']
  row = next(line for line in lines if line.startswith("['w']"))
  assert '64x32' in row and 'yes' in row and '64x4' in row
  total = lines[-1].split()
  assert total[0] == 'total'
  assert total[-1] == f'{(4 * (64 * 4 + 2 * 4 * 32) + 16) / (8 * 64 * 32):.3f}'


def test_abstract_params_allocate_nothing():
  abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, jnp.bfloat16), PARAMS)
  report = so.summary(
      so.galore(1e-3, rank=4, dimension_numbers=so.last_two_axes, side='compact'), abstract)
  leaves = _by_path(report)
  assert leaves["['w']"].dtype == 'bfloat16'
  assert leaves["['w']"].adamw_bytes == 2 * 2 * 64 * 32  # bf16 moments
