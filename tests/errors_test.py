"""Bad configurations fail early with an error naming the parameter and the fix.

Each test asserts both halves of the message: *what* is wrong (the argument
name or the leaf path) and *how* to fix it. Nothing here compiles an update, so
the file runs in seconds.
"""

import inspect
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import registry
import subspace_optax as so
from subspace_optax._src.bases import base as bases_lib
from subspace_optax._src.bases import singular

PARAMS = {'w': jnp.ones((8, 6)), 'stack': jnp.ones((2, 5, 9)), 'b': jnp.ones(4)}


def _low_rank(**kwargs):
  defaults = dict(rank=2, refresh=3, side='compact',
                  dimension_numbers=so.last_two_axes)
  return so.low_rank(optax.scale_by_adam(), **{**defaults, **kwargs})


def _raises(error, *fragments):
  """``pytest.raises`` that asserts every fragment appears in the message."""
  return pytest.raises(
      error, match=''.join(f'(?=[\\s\\S]*{re.escape(f)})' for f in fragments))


def _takes(entry, argument) -> bool:
  return argument in inspect.signature(entry.factory).parameters


RANKED = [n for n in registry.NAMES if _takes(registry.REGISTRY[n], 'rank')]


# ------------------------------------------------------------------- rank


@pytest.mark.parametrize('name', RANKED)
@pytest.mark.parametrize('rank', [0, -3])
def test_non_positive_rank_fails_at_construction(name, rank):
  with _raises(ValueError, '`rank`', 'not positive', 'give a positive int'):
    registry.REGISTRY[name].make(rank=rank)


@pytest.mark.parametrize('rank', [1.5, 0.0, -0.25])
def test_fraction_rank_outside_unit_interval(rank):
  with _raises(ValueError, '`rank`', 'outside (0, 1]', 'fraction of min(m, n)'):
    _low_rank(rank=rank)


def test_rank_above_matrix_size_is_clamped():
  """Documented: an int rank is clamped to min(m, n) of each matrix."""
  state = jax.eval_shape(_low_rank(rank=100).init, PARAMS)
  assert state.basis['w'].shape == (8, 6)  # k = 8 rows, rank min(8, 6)
  assert state.basis['stack'].shape == (2, 9, 5)  # per layer: k = 9, rank 5
  galore_bytes = so.state_sizes.galore_bytes
  assert galore_bytes(PARAMS, 100, dimension_numbers=so.last_two_axes) == (
      galore_bytes(PARAMS, 1.0, dimension_numbers=so.last_two_axes))


def test_numpy_ints_are_accepted_as_rank_and_period():
  tx = so.galore(1e-3, rank=np.int64(2), refresh=np.int32(3), side='compact')
  assert jax.eval_shape(tx.init, PARAMS)[0].basis['w'].shape == (8, 2)


@pytest.mark.parametrize('rank', ['4', None, jnp.asarray(4)])
def test_non_number_rank_says_static(rank):
  with _raises(TypeError, '`rank`', 'static_args'):
    _low_rank(rank=rank)


def test_traced_rank_says_static_args():
  with _raises(TypeError, '`rank`', "static_args=('rank'"):
    jax.jit(lambda r: _low_rank(rank=r).init(PARAMS))(4)


# ----------------------------------------------------------------- refresh


@pytest.mark.parametrize('period', [0, -1])
def test_non_positive_refresh_period(period):
  with _raises(ValueError, '`refresh`', 'not positive',
               'number of updates between basis refreshes'):
    so.galore(1e-3, refresh=period, side='compact')
  with _raises(ValueError, '`period`', 'not positive'):
    _low_rank(refresh=period)


@pytest.mark.parametrize('period', [2.5, '3'])
def test_non_int_refresh_period_says_static(period):
  with _raises(TypeError, '`refresh`', 'static_args'):
    so.galore(1e-3, refresh=period, side='compact')
  with _raises(TypeError, '`refresh`', 'subspace_optax.refresh policy',
               'static_args'):
    _low_rank(refresh=period)


def test_inject_hyperparams_without_static_args_names_them_all():
  tx = optax.inject_hyperparams(so.galore)(1e-3, rank=2, refresh=3)
  # One error names every static argument, not one per attempt.
  with _raises(TypeError, '`rank`, `refresh`',
               'subspace_optax.static_args(subspace_optax.galore)',
               "('rank', 'refresh', 'mask', 'dimension_numbers', 'mu_dtype', "
               "'basis_dtype', 'precision', 'accumulate_steps')"):
    tx.init(PARAMS)
  # With them it works, and the seed may stay dynamic.
  tx = optax.inject_hyperparams(
      so.galore, static_args=so.static_args(so.galore))(
          1e-3, rank=2, refresh=3, seed=5)
  state = tx.init(PARAMS)
  jax.eval_shape(tx.update, PARAMS, state, PARAMS)


def test_callable_dimension_numbers_under_inject_hyperparams():
  """inject_hyperparams would call it with the step count (as a schedule)."""
  tx = optax.inject_hyperparams(so.galore, static_args=('rank', 'refresh'))(
      1e-3, rank=2, refresh=3, dimension_numbers=so.last_two_axes)
  with _raises(TypeError, 'last_two_axes', 'step count',
               "static_args=('dimension_numbers'"):
    tx.init(PARAMS)


# ----------------------------------------------------------- method names


def test_unknown_names_list_the_choices():
  with _raises(ValueError, "Unknown basis 'qr'", "'svd'", "'randomized'",
               'BasisMethod'):
    _low_rank(basis='qr')
  with _raises(ValueError, '`side`', "'compact'", "'reference'"):
    _low_rank(side='up')
  with _raises(ValueError, '`on_refresh`', "'keep'", "'transport'"):
    _low_rank(on_refresh='drop')


def test_transport_needs_a_transition():
  method = singular.svd()._replace(name='no_transition', transition=None)
  with _raises(ValueError, "on_refresh='transport'", 'no_transition', 'keep'):
    _low_rank(basis=method, on_refresh='transport')


# ------------------------------------------------------- dimension numbers


@pytest.mark.parametrize('numbers, fragments', [
    (so.DimensionNumbers(0, 3), ["['stack']", '`output_axis`=3',
                                 'does not fit a leaf of rank 3', 'None']),
    ({'w': so.DimensionNumbers(0, 1), 'stack': None,
      'b': so.DimensionNumbers(0, 1)},
     ["['b']", 'shape (4,)', 'no matrix view', 'give None']),
    ({'w': so.DimensionNumbers(1, 1), 'stack': None, 'b': None},
     ["['w']", 'must be distinct']),
    ({'w': so.DimensionNumbers((), 1), 'stack': None, 'b': None},
     ["['w']", '`reduction_axis` is empty']),
])
def test_dimension_numbers_that_do_not_fit_name_the_leaf(numbers, fragments):
  with _raises(ValueError, *fragments):
    _low_rank(dimension_numbers=numbers).init(PARAMS)


def test_dimension_numbers_of_the_wrong_type():
  with _raises(TypeError, "`dimension_numbers` at ['w'][0]", 'DimensionNumbers(',
               'or None'):
    _low_rank(dimension_numbers={'w': (0, 1), 'stack': None, 'b': None}).init(
        PARAMS)
  with _raises(TypeError, "`dimension_numbers`='last'", 'callable'):
    _low_rank(dimension_numbers='last').init(PARAMS)
  with _raises(ValueError, '`dimension_numbers`', 'structure of the params'):
    _low_rank(dimension_numbers={'w': so.DimensionNumbers()}).init(PARAMS)


# ------------------------------------------------ inner transform contract


def test_inner_that_uses_params_fails_at_init():
  inner = optax.chain(optax.scale_by_adam(), optax.add_decayed_weights(0.1))
  tx = so.low_rank(inner, rank=2, side='compact')
  with _raises(ValueError, 'inner transform uses `params`', 'params=None',
               'optax.add_decayed_weights', 'later in the chain'):
    tx.init(PARAMS)
  # Also under jit and eval_shape (the check is abstract).
  with _raises(ValueError, 'inner transform uses `params`'):
    jax.eval_shape(tx.init, PARAMS)


def test_residual_that_uses_params_fails_at_init():
  tx = so.low_rank(optax.scale_by_adam(), rank=2,
                   residual=optax.add_decayed_weights(0.1), side='compact')
  with _raises(ValueError, 'residual transform uses `params`', 'params=None'):
    tx.init(PARAMS)


def test_inner_that_needs_an_extra_arg_is_not_refused_at_init():
  """Only params are diagnosed at init; extra args arrive with update."""

  def update(updates, state, params=None, *, value):
    del params
    return jax.tree.map(lambda u: u * value, updates), state

  inner = optax.GradientTransformationExtraArgs(
      lambda p: optax.EmptyState(), update)
  tx = so.low_rank(inner, rank=2, side='compact')
  state = tx.init(PARAMS)
  updates, _ = tx.update(PARAMS, state, value=jnp.float32(2.0))
  assert updates['b'][0] == 2.0


# --------------------------------------------------- init/update mismatch


def test_updates_with_another_structure():
  tx = _low_rank()
  state = tx.init(PARAMS)
  with _raises(ValueError, 'structure of the params', 'call init again'):
    tx.update({'w': PARAMS['w']}, state)


def test_projected_leaf_with_another_shape_names_the_leaf():
  tx = _low_rank()
  state = tx.init(PARAMS)
  grads = dict(PARAMS, stack=jnp.ones((2, 5, 11)))
  with _raises(ValueError, "['stack']", 'shape (2, 5, 11)', '(2, 11, 2)',
               'call init again'):
    tx.update(grads, state)


def test_leaf_that_changed_rank_names_the_leaf():
  tx = _low_rank()
  state = tx.init(PARAMS)
  with _raises(ValueError, "['w']", 'not projected', 'holds a basis',
               'call init again'):
    tx.update(dict(PARAMS, w=jnp.ones(6)), state)
  state = tx.init(dict(PARAMS, w=jnp.ones(6)))
  with _raises(ValueError, "['w']", 'holds no basis', 'call init again'):
    tx.update(PARAMS, state)


def test_state_of_another_rank_names_the_leaf():
  state = _low_rank(rank=3).init(PARAMS)
  with _raises(ValueError, "['stack']", '(rank 2)', '[(2, 9, 3)]',
               'restore a checkpoint'):
    _low_rank(rank=2).update(PARAMS, state)


# -------------------------------------------------- protected subspaces


def test_protected_memory_that_does_not_fit_names_the_leaf():
  other = dict(PARAMS, w=jnp.ones((7, 6)))
  memory = so.continual.empty_memory(other, dimension_numbers=so.last_two_axes)
  tx = so.continual.orthogonal_to(memory, dimension_numbers=so.last_two_axes)
  with _raises(ValueError, "['w']", 'does not fit this leaf', '(8,)'):
    tx.init(PARAMS)
  with _raises(ValueError, 'structure of the params', 'empty_memory'):
    so.continual.orthogonal_to({'w': memory['w']}).init(PARAMS)


# ----------------------------------------- documented safe behaviours


def _nan_basis_method(trigger: float):
  """An SVD basis that returns NaN when the gradient's first entry > trigger."""
  svd = singular.svd()

  def refresh(g, old, key, align):
    new = svd.refresh(g, old, key, align)
    return jnp.where(g[0, 0] > trigger, jnp.nan, new)

  return svd._replace(name='sometimes_nan', refresh=refresh)


def test_a_basis_method_that_returns_nan_is_ignored():
  """A refresh whose result is not finite is dropped like a NaN gradient:
  the old basis stays and the refresh stays due."""
  params = {'w': jnp.ones((6, 4))}
  tx = so.low_rank(optax.scale_by_adam(), rank=2, refresh=100,
                   basis=_nan_basis_method(trigger=0.0), side='compact')
  state = tx.init(params)
  bad = {'w': jnp.ones((6, 4))}  # g[0, 0] = 1 > 0: NaN basis
  good = {'w': -jnp.abs(jax.random.normal(jax.random.key(0), (6, 4)))}
  _, state_bad = tx.update(bad, state)
  np.testing.assert_array_equal(state_bad.basis['w'], state.basis['w'])
  assert state_bad.refresh['w'].next_refresh == 0  # still due
  _, state_good = tx.update(good, state_bad)
  assert np.all(np.isfinite(state_good.basis['w']))
  assert not np.array_equal(state_good.basis['w'], state.basis['w'])
  assert state_good.refresh['w'].next_refresh > 1


@pytest.mark.parametrize('magnitude', [1e-30, 1e30, 1e35])
def test_randomized_basis_does_not_depend_on_gradient_scale(magnitude):
  """Extreme but finite gradients give the same subspace (no under/overflow)."""
  g = jax.random.normal(jax.random.key(1), (12, 9))
  method = singular.randomized()
  key = jax.random.key(2)
  old = bases_lib.dense_init(12, 9, 3)
  unit = method.refresh(g, old, key, True)
  scaled = method.refresh(g * magnitude, old, key, True)
  assert np.all(np.isfinite(scaled))
  np.testing.assert_allclose(scaled, unit, atol=1e-4)


@pytest.mark.parametrize('basis', ['svd', 'randomized'])
def test_an_ensemble_member_with_an_inf_gradient_keeps_its_basis(basis):
  """Under jax.vmap a refresh due for one member runs for all of them; LAPACK's
  SVD never returns on a matrix mixing Inf and finite entries, so the refresh
  must not see the Inf (the member's result is discarded anyway). The
  randomized basis takes the Inf itself (``handles_non_finite``)."""
  tx = so.low_rank(optax.scale_by_adam(), rank=2, refresh=3, basis=basis,
                   side='compact')
  state = jax.vmap(tx.init)({'w': jnp.ones((2, 8, 6))})
  g = jax.random.normal(jax.random.key(0), (2, 8, 6)).at[1, 0, 0].set(np.inf)
  _, new = jax.jit(jax.vmap(tx.update))({'w': g}, state)
  np.testing.assert_array_equal(new.basis['w'][1], state.basis['w'][1])
  assert not np.array_equal(new.basis['w'][0], state.basis['w'][0])
  assert np.all(np.isfinite(new.basis['w']))


@pytest.mark.parametrize('bad', [np.inf, -np.inf, np.nan])
def test_randomized_basis_of_a_non_finite_gradient_is_not_finite(bad):
  """The randomized basis takes NaN/Inf entries as they are (no full-size
  zeroed copy) and says so with a non-finite basis, which the stages drop;
  its eigensolver sees only finite input, so it returns."""
  method = singular.randomized()
  assert method.handles_non_finite and not singular.svd().handles_non_finite
  g = jax.random.normal(jax.random.key(1), (12, 9)).at[3, 4].set(bad)
  new = jax.jit(method.refresh, static_argnums=3)(
      g, bases_lib.dense_init(12, 9, 3), jax.random.key(2), True)
  assert not np.any(np.isfinite(new))


@pytest.mark.parametrize('initial', ['range_finder', 'random'])
@pytest.mark.parametrize('bad', [np.inf, np.nan])
def test_online_pca_of_a_non_finite_gradient_is_not_finite(initial, bad):
  """The online-PCA step and its SVD-free initial bases take NaN/Inf entries
  as they are (no zeroed copy of the gradient): the moved basis is not
  finite, and the stages keep the old one; with ``initial='svd'`` the stages
  zero them first, for LAPACK."""
  method = so.bases.online_pca(initial=initial)
  assert method.handles_non_finite
  assert not so.bases.online_pca(initial='svd').handles_non_finite
  g = jax.random.normal(jax.random.key(1), (12, 9)).at[3, 4].set(bad)
  old = method.init(12, 9, 3)
  moved = jax.jit(method.refresh, static_argnums=3)(g, old, jax.random.key(2),
                                                     True)
  assert not np.all(np.isfinite(moved.basis))
  first = jax.jit(method.first_refresh, static_argnums=3)(
      g, old, jax.random.key(2), True)
  if initial == 'range_finder':  # 'random' does not read the gradient
    assert not np.all(np.isfinite(first.basis))
  tx = so.low_rank(optax.scale_by_adam(), rank=2, basis=method, side='compact')
  state = jax.vmap(tx.init)({'w': jnp.ones((2, 8, 6))})
  for step in range(2):  # the initial basis, then an online step
    g = jax.random.normal(jax.random.key(step), (2, 8, 6)).at[1, 0, 0].set(bad)
    _, new = jax.jit(jax.vmap(tx.update))({'w': g}, state)
    np.testing.assert_array_equal(new.basis['w'].basis[1],
                                  state.basis['w'].basis[1])
    assert not np.array_equal(new.basis['w'].basis[0],
                              state.basis['w'].basis[0])
    assert np.all(np.isfinite(new.basis['w'].basis))
    state = new


# ------------------------------------------- refresh periods and lazy refresh


@pytest.mark.parametrize('period', [2 ** 31, 2 ** 40])
def test_refresh_period_must_fit_the_int32_step_counter(period):
  with _raises(ValueError, f'`refresh`={period}', 'int32 step counter',
               'below 2**31'):
    so.galore(1e-3, refresh=period, side='compact')
  with _raises(ValueError, f'`period`={period}', 'below 2**31'):
    so.refresh.every(period)
  so.refresh.every(2 ** 31 - 1)  # the largest period accepted


@pytest.mark.parametrize('arguments, error, fragments', [
    (dict(threshold=1.5), ValueError, ('`threshold`=1.5', 'outside [0, 1]',
                                       'mean squared cosine')),
    (dict(threshold=-0.2), ValueError, ('`threshold`=-0.2', '[0, 1]')),
    (dict(threshold=float('nan')), ValueError, ('`threshold`=nan',)),
    (dict(threshold='0.4'), TypeError, ('`threshold`', 'real number')),
    (dict(growth=0.5), ValueError, ('`growth`=0.5', 'outside [1,')),
    (dict(growth=float('nan')), ValueError, ('`growth`=nan', '[1, inf]')),
    (dict(growth=None), TypeError, ('`growth`', 'NoneType')),
    (dict(window=0), ValueError, ('`window`=0', 'similarities averaged')),
    (dict(window=2.5), ValueError, ('`window`=2.5',)),
    (dict(window=2 ** 31), ValueError, ('`window`=2147483648',)),
    (dict(period=2 ** 31), ValueError, ('`period`', 'below 2**31')),
])
def test_lazy_refresh_arguments_are_validated(arguments, error, fragments):
  with _raises(error, *fragments):
    so.refresh.lazy(**{'period': 4, **arguments})


def test_lazy_refresh_accepts_the_interval_ends():
  so.refresh.lazy(4, threshold=0.0, growth=1.0, window=1)
  so.refresh.lazy(4, growth=float('inf'))  # stops refreshing once settled
  so.refresh.lazy(np.int32(4), threshold=1, growth=np.float32(2.0),
                  window=np.int64(3))
