"""Property-based tests (hypothesis) over random shapes, ranks, dtypes, layouts.

* the oriented matrix view of any leaf round-trips exactly;
* a low_rank update lies in the span of its basis, the basis is orthonormal
  (float32, to 1e-5), ranks above the matrix size are clamped, and the jitted
  step never retraces;
* the measured state size equals each method's analytic formula;
* updates masked by ``orthogonal_to`` are orthogonal to the protected
  subspaces.

Examples are derandomized (the same ones on every run) and few: each pipeline
example compiles one step.
"""

import math

import hypothesis
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import subspace_optax as so
from subspace_optax._src.pipeline import layout as layout_lib

SETTINGS = dict(deadline=None, derandomize=True, print_blob=True,
                suppress_health_check=list(hypothesis.HealthCheck))
dims = st.integers(1, 7)


# ------------------------------------------------------------- layouts


@st.composite
def leaf_and_numbers(draw, max_rank: int = 5):
  """A shape of rank 2..max_rank and disjoint non-empty reduction/output axes."""
  ndim = draw(st.integers(2, max_rank))
  shape = tuple(draw(st.lists(dims, min_size=ndim, max_size=ndim)))
  axes = draw(st.permutations(range(ndim)))
  reduction_count = draw(st.integers(1, ndim - 1))
  output_count = draw(st.integers(1, ndim - reduction_count))
  reduction = tuple(axes[:reduction_count])
  output = tuple(axes[reduction_count:reduction_count + output_count])
  negative = draw(st.booleans())  # negative axis numbers are accepted too
  if negative:
    reduction = tuple(a - ndim for a in reduction)
  numbers = so.DimensionNumbers(
      reduction if len(reduction) > 1 else reduction[0],
      output if len(output) > 1 else output[0])
  return shape, numbers


@pytest.mark.slow  # 40 random layouts; tests/layout_test.py covers the views
@hypothesis.settings(max_examples=40, **SETTINGS)
@hypothesis.given(leaf_and_numbers(), st.sampled_from(layout_lib.SIDES),
                  st.integers(1, 9))
def test_matrix_view_round_trips(leaf, side, rank):
  shape, numbers = leaf
  x = jnp.arange(math.prod(shape), dtype=jnp.float32).reshape(shape)
  lay = layout_lib.make_layout('x', shape, numbers, side, rank)
  view = layout_lib.matrix_view(x, lay)
  assert view.shape == lay.batch_shape + (lay.projected_dim, lay.other_dim)
  assert lay.rank == min(rank, lay.rows, lay.columns)
  np.testing.assert_array_equal(layout_lib.leaf_from_matrix(view, lay), x)


# ------------------------------------------------------------ pipeline


@st.composite
def pipeline_case(draw):
  kind = draw(st.sampled_from(['matrix', 'stack', 'numbers']))
  if kind == 'matrix':
    shape, numbers = tuple(draw(st.lists(st.integers(2, 9), min_size=2,
                                         max_size=2))), so.DimensionNumbers()
  elif kind == 'stack':
    shape = (2,) + tuple(draw(st.lists(st.integers(2, 7), min_size=2,
                                       max_size=2)))
    numbers = so.DimensionNumbers()
  else:  # a 4-D leaf with two reduction axes and a batch axis
    shape = tuple(draw(st.lists(st.integers(1, 4), min_size=4, max_size=4)))
    numbers = so.DimensionNumbers(reduction_axis=(0, 2), output_axis=3)
    hypothesis.assume(shape[0] * shape[2] > 1 and shape[3] > 1)
  rank = draw(st.one_of(st.integers(1, 12),
                        st.sampled_from([0.25, 0.5, 1.0])))
  return dict(
      shape=shape, numbers=numbers, rank=rank,
      side=draw(st.sampled_from(layout_lib.SIDES)),
      dtype=draw(st.sampled_from([jnp.float32, jnp.bfloat16])),
      basis=draw(st.sampled_from(['svd', 'svd', 'randomized'])),
      seed=draw(st.integers(0, 2**16)))


@pytest.mark.slow  # the unit subset checks the span in low_rank_test.py
@hypothesis.settings(max_examples=12, **SETTINGS)
@hypothesis.given(pipeline_case())
def test_updates_lie_in_an_orthonormal_basis_span(case):
  params = {'w': jnp.zeros(case['shape'], case['dtype']),
            'b': jnp.zeros((3,), case['dtype'])}
  numbers = {'w': case['numbers'], 'b': None}
  tx = so.low_rank(optax.scale_by_adam(), rank=case['rank'], refresh=2,
                   basis=case['basis'], side=case['side'],
                   dimension_numbers=numbers, seed=case['seed'])
  lay = layout_lib.leaf_layouts(params, numbers, case['side'], case['rank'])['w']
  traces = []

  @jax.jit
  def step(g, state):
    traces.append(1)
    return tx.update(g, state)

  state = tx.init(params)
  key = jax.random.key(case['seed'])
  for t in range(3):  # refreshes at updates 0 and 2
    g = jax.tree.map(lambda p, k=jax.random.fold_in(key, t): jax.random.normal(
        k, p.shape, jnp.float32).astype(p.dtype), params)
    updates, state = step(g, state)
    assert updates['w'].dtype == case['dtype']
    basis = state.basis['w']
    assert basis.dtype == jnp.float32
    assert basis.shape == lay.batch_shape + (lay.projected_dim, lay.rank)
    gram = jnp.einsum('...kr,...ks->...rs', basis, basis)
    np.testing.assert_allclose(
        gram, np.broadcast_to(np.eye(lay.rank), gram.shape), atol=1e-5)
    u = layout_lib.matrix_view(updates['w'].astype(jnp.float32), lay)
    inside = jnp.einsum('...kr,...rl->...kl', basis,
                        jnp.einsum('...kr,...kl->...rl', basis, u))
    tolerance = 1e-5 if case['dtype'] == jnp.float32 else 2e-2
    assert float(jnp.abs(u - inside).max()) <= tolerance * max(
        float(jnp.abs(u).max()), 1e-30)
  assert len(traces) == 1


# ------------------------------------------------------- state bytes


@st.composite
def param_trees(draw):
  leaves = {}
  for i in range(draw(st.integers(1, 3))):
    kind = draw(st.sampled_from(['vector', 'matrix', 'matrix', 'stack']))
    if kind == 'vector':
      shape = (draw(st.integers(1, 12)),)
    elif kind == 'matrix':
      shape = (draw(st.integers(1, 12)), draw(st.integers(1, 12)))
    else:
      shape = (draw(st.integers(1, 3)), draw(st.integers(1, 12)),
               draw(st.integers(1, 12)))
    leaves[f'p{i}'] = jax.ShapeDtypeStruct(shape, jnp.float32)
  return leaves


def _formulas():
  """(name, make optimizer, analytic bytes) for every method with a formula."""
  formulas = {
      'galore': (lambda r, s, d: so.galore(1e-3, rank=r, side=s,
                                           dimension_numbers=d),
                 lambda p, r, s, d: so.state_sizes.galore_bytes(
                     p, r, side=s, dimension_numbers=d)),
      'dct_adamw': (lambda r, s, d: so.dct_adamw(1e-3, rank=r, side=s,
                                                 dimension_numbers=d),
                    lambda p, r, s, d: so.state_sizes.dct_adamw_bytes(
                        p, r, side=s, dimension_numbers=d)),
      'fira': (lambda r, s, d: so.fira(1e-3, rank=r, side=s, dimension_numbers=d),
               lambda p, r, s, d: so.state_sizes.fira_bytes(p, r, side=s,
                                                dimension_numbers=d)),
      'frugal': (lambda r, s, d: so.frugal(1e-3, rank=r, side=s,
                                           dimension_numbers=d),
                 lambda p, r, s, d: so.state_sizes.frugal_bytes(p, r, side=s,
                                                    dimension_numbers=d)),
      'apollo': (lambda r, s, d: so.apollo(1e-3, rank=r, side=s,
                                           dimension_numbers=d),
                 lambda p, r, s, d: so.state_sizes.apollo_bytes(p, r, side=s,
                                                    dimension_numbers=d)),
      'q_galore': (lambda r, s, d: so.q_galore(1e-3, rank=r, side=s,
                                               dimension_numbers=d),
                   lambda p, r, s, d: so.state_sizes.q_galore_bytes(p, r, side=s,
                                                        dimension_numbers=d)),
      'online_subspace_descent': (
          lambda r, s, d: so.online_subspace_descent(
              1e-3, rank=r, side=s, dimension_numbers=d),
          lambda p, r, s, d: so.state_sizes.online_subspace_descent_bytes(
              p, r, side=s, dimension_numbers=d)),
      'adamp': (lambda r, s, d: so.adamp(1e-3),
                lambda p, r, s, d: so.state_sizes.adamp_bytes(p)),
      'auon': (lambda r, s, d: so.auon(1e-3), lambda p, r, s, d: so.state_sizes.auon_bytes(p)),
  }
  return [(name, make, formula)
          for name, (make, formula) in formulas.items()]


FORMULAS = _formulas()


@pytest.mark.parametrize('name, make, formula', FORMULAS,
                         ids=[f[0] for f in FORMULAS])
@hypothesis.settings(max_examples=15, **SETTINGS)
@hypothesis.given(
    params=param_trees(),
    rank=st.one_of(st.integers(1, 16), st.sampled_from([0.25, 0.5, 1.0])),
    side=st.sampled_from(['compact', 'reference']),
    stacked=st.booleans())
def test_state_bytes_equal_the_analytic_size(name, make, formula, params, rank,
                                             side, stacked):
  del name
  numbers = so.last_two_axes if stacked else None
  state = jax.eval_shape(make(rank, side, numbers).init, params)
  assert so.state_bytes(state) == formula(params, rank, side, numbers)


# ------------------------------------------------- protected subspaces


def _orthonormal(rng, batch, dim, count):
  q, _ = np.linalg.qr(rng.standard_normal(batch + (dim, dim)))
  return q[..., :count].astype(np.float32)


@hypothesis.settings(max_examples=12, **SETTINGS)
@hypothesis.given(
    shape=st.one_of(st.tuples(st.integers(2, 9), st.integers(2, 9)),
                    st.tuples(st.just(2), st.integers(2, 6), st.integers(2, 6))),
    mode=st.sampled_from(['two_sided', 'left', 'right']),
    fill=st.floats(0.0, 1.0),
    dtype=st.sampled_from([jnp.float32, jnp.bfloat16]),
    seed=st.integers(0, 2**16))
def test_masked_updates_are_orthogonal_to_protected_subspaces(
    shape, mode, fill, dtype, seed):
  params = {'w': jnp.zeros(shape, dtype)}
  memory = so.continual.empty_memory(params, mode=mode,
                                     dimension_numbers=so.last_two_axes)
  rng = np.random.default_rng(seed)
  mem = memory['w']
  batch = shape[:-2]
  fields = dict(mem._asdict())
  for side, dim in (('left', shape[-2]), ('right', shape[-1])):
    if isinstance(getattr(mem, side), optax.MaskedNode):
      continue
    count = int(round(fill * (dim - 1)))  # leave at least one free direction
    basis = np.zeros(getattr(mem, side).shape, np.float32)
    basis[..., :count] = _orthonormal(rng, batch, dim, count)
    fields[side] = jnp.asarray(basis)
    fields[side + '_count'] = jnp.full(batch, count, jnp.int32)
  memory = {'w': type(mem)(**fields)}
  tx = so.continual.orthogonal_to(memory, mode=mode, dimension_numbers=so.last_two_axes)
  g = {'w': jnp.asarray(rng.standard_normal(shape), dtype)}
  updates, _ = tx.update(g, tx.init(params))
  assert updates['w'].dtype == dtype
  u = np.asarray(updates['w'], np.float32)
  tolerance = (1e-5 if dtype == jnp.float32 else 2e-2) * max(
      float(np.abs(u).max()), 1e-30)
  if mode in ('two_sided', 'left'):
    left = np.einsum('...mc,...mn->...cn', np.asarray(fields['left']), u)
    assert float(np.abs(left).max()) <= tolerance
  if mode in ('two_sided', 'right'):
    right = np.einsum('...mn,...nc->...mc', u, np.asarray(fields['right']))
    assert float(np.abs(right).max()) <= tolerance
