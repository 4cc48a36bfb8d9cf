"""The public namespace and the presets' signatures.

One curated name per object (``__all__`` everywhere), the two names renamed
before the first release still working with a ``DeprecationWarning``, keyword-only
arguments after ``learning_rate`` and ``rank``, one name (``refresh``, ``mask``)
per concept, static arguments declared once, and error messages that name real
arguments.
"""

import inspect
import re
import types
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import registry
import subspace_optax as so

MODULES = (so, so.bases, so.continual, so.merging, so.state_sizes, so.refresh,
           so.transforms)

PARAMS = {'w': jnp.arange(48.0).reshape(8, 6) / 48.0, 'b': jnp.ones(6)}

# Every preset, with its smallest valid arguments.
PRESETS = {
    'galore': (so.galore, dict(rank=2)),
    'q_galore': (so.q_galore, dict(rank=2, group_size=4)),
    'online_subspace_descent': (so.online_subspace_descent, dict(rank=2)),
    'frugal': (so.frugal, dict(rank=0.5)),
    'fira': (so.fira, dict(rank=2)),
    'apollo': (so.apollo, dict(rank=2)),
    'apollo_mini': (so.apollo_mini, {}),
    'golore': (so.golore, dict(rank=2)),
    'dct_adamw': (so.dct_adamw, dict(rank=2)),
    'i3s': (so.i3s, dict(rank=2)),
    'adamp': (so.adamp, {}),
    'sgdp': (so.sgdp, {}),
    'auon': (so.auon, {}),
    'sculpt': (so.continual.sculpt, {}),
    'gpm': (so.continual.gpm, {}),
}
# Presets with a basis refreshed every T updates.
REFRESHED = ('galore', 'q_galore', 'frugal', 'fira', 'apollo', 'apollo_mini',
             'golore', 'dct_adamw', 'i3s')
# AdamP and SGDP decay inside the radial projection (``wd_ratio``): no mask.
UNMASKED = ('adamp', 'sgdp', 'gpm')


def _parameters(factory) -> list[str]:
  return list(inspect.signature(factory).parameters)


def _public(module) -> set[str]:
  return {name for name in vars(module) if not name.startswith('_')
          and name != 'annotations'}


# ------------------------------------------------------------ the namespace


@pytest.mark.parametrize('module', MODULES, ids=lambda m: m.__name__)
def test_all_lists_exactly_the_public_names(module):
  assert len(module.__all__) == len(set(module.__all__)), 'duplicate in __all__'
  assert set(module.__all__) == _public(module)


def test_each_object_is_exported_once():
  homes = {}
  for module in MODULES:
    for name in module.__all__:
      value = getattr(module, name)
      if isinstance(value, types.ModuleType):
        continue
      homes.setdefault(id(value), []).append(f'{module.__name__}.{name}')
  duplicates = [places for places in homes.values() if len(places) > 1]
  assert not duplicates


def test_internals_are_not_public():
  for module, name in ((so.bases, 'register'), (so.bases, 'resolve'),
                       (so.refresh, 'resolve'), (so.continual, 'MODES'),
                       (so.continual, 'check_memory'),
                       (so.continual, 'clear')):
    assert name not in module.__all__


def test_reference_adam_variants_live_in_transforms():
  assert not {name for name in so.__all__ if 'adam' in name.lower()
              and name.startswith(('scale_by', 'ScaleBy'))}
  assert 'scale_by_torch_adam' in so.transforms.__all__


def test_memory_formulas_live_in_memory():
  assert not [name for name in so.__all__ if name.endswith('_bytes')
              and name != 'state_bytes']
  assert 'state_bytes' not in so.state_sizes.__all__
  assert so.state_sizes.galore_bytes(PARAMS, 2) == so.state_bytes(
      so.galore(1e-3, 2).init(PARAMS))


def test_public_names_import_without_warnings():
  with warnings.catch_warnings():
    warnings.simplefilter('error')
    for module in MODULES:
      for name in module.__all__:
        getattr(module, name)


# ----------------------------------------------------- deprecated names


@pytest.mark.parametrize('module,old,new', [
    (so, 'memory', 'state_sizes'),
    (so.continual, 'summary', 'accuracy_summary'),
])
def test_renamed_names_warn_and_still_work(module, old, new):
  with pytest.warns(DeprecationWarning, match=re.escape(f'use {module.__name__}.{new}')):
    value = getattr(module, old)
  assert value is getattr(module, new)
  assert old not in module.__all__


def test_unknown_attribute_is_still_an_attribute_error():
  with pytest.raises(AttributeError, match='no_such_name'):
    so.no_such_name  # pylint: disable=pointless-statement


# ------------------------------------------------------------ signatures


@pytest.mark.parametrize('name', sorted(PRESETS))
def test_arguments_after_learning_rate_and_rank_are_keyword_only(name):
  factory, _ = PRESETS[name]
  parameters = inspect.signature(factory).parameters.values()
  positional = [p.name for p in parameters
                if p.kind is not inspect.Parameter.KEYWORD_ONLY]
  assert positional in (['learning_rate'], ['learning_rate', 'rank'])
  with pytest.raises(TypeError, match='positional'):
    factory(1e-3, *([2] * len(positional)))


@pytest.mark.parametrize('name', sorted(PRESETS))
def test_one_name_per_concept(name):
  factory, _ = PRESETS[name]
  parameters = _parameters(factory)
  assert 'refresh_every' not in parameters
  assert 'weight_decay_mask' not in parameters
  assert ('refresh' in parameters) == (name in REFRESHED)
  if 'weight_decay' in parameters and name not in UNMASKED:
    assert 'mask' in parameters


def test_shared_arguments_come_in_one_order():
  shared = ('refresh', 'stagger', 'basis', 'side', 'on_refresh', 'align_signs',
            'scale', 'b1', 'b2', 'eps', 'weight_decay', 'mask',
            'dimension_numbers', 'seed')
  for name, (factory, _) in PRESETS.items():
    present = [p for p in _parameters(factory) if p in shared]
    assert present == sorted(present, key=shared.index), name


@pytest.mark.parametrize('name', REFRESHED)
def test_refresh_takes_an_int_or_a_policy(name):
  """``refresh=T`` staggers the leaves; a policy is used as given."""
  factory, kwargs = PRESETS[name]
  params = {'a': jnp.ones((8, 6)), 'b': jnp.ones((8, 6))}

  def offsets(tx):
    state = tx.init(params)
    states = jax.tree.leaves(state, is_leaf=lambda x: hasattr(x, 'offset'))
    return sorted(int(s.offset) for s in states if hasattr(s, 'offset'))

  assert offsets(factory(1e-3, **kwargs, refresh=10)) == [0, 5]
  policy = so.refresh.every(10, stagger=False)
  if name != 'q_galore':  # its int refresh is a lazy policy (no offsets)
    assert offsets(factory(1e-3, **kwargs, refresh=policy)) == [0, 0]
  with pytest.raises(ValueError, match='`stagger`=False only applies'):
    factory(1e-3, **kwargs, refresh=policy, stagger=False)


# ---------------------------------------------------------- static args


@pytest.mark.parametrize('name', registry.NAMES)
def test_static_args_are_parameters(name):
  factory = registry.REGISTRY[name].factory
  assert set(so.static_args(factory)) <= set(_parameters(factory))


def test_static_args_of_a_foreign_factory_is_an_error():
  with pytest.raises(TypeError, match='not a subspace_optax factory'):
    so.static_args(optax.adam)


@pytest.mark.parametrize('name', registry.NAMES)
def test_array_static_arguments_are_all_named_at_once(name):
  """inject_hyperparams without static_args passes arrays: one error names
  every static argument."""
  entry = registry.REGISTRY[name]
  static = so.static_args(entry.factory)
  defaults = {p.name: p.default
              for p in inspect.signature(entry.factory).parameters.values()}
  arguments = entry.arguments()
  numeric = {n: jnp.asarray(arguments.get(n, defaults[n])) for n in static
             if isinstance(arguments.get(n, defaults[n]), (int, float))}
  if not numeric:
    pytest.skip('no numeric static argument')
  with pytest.raises(TypeError) as error:
    entry.factory(**{**arguments, **numeric})
  message = str(error.value)
  assert f'static_args={static!r}' in message
  for n in numeric:
    assert f'`{n}`' in message


def test_inject_hyperparams_with_static_args_helper():
  tx = optax.inject_hyperparams(
      so.galore, static_args=so.static_args(so.galore))(
          learning_rate=1e-3, rank=2, refresh=3)
  state = tx.init(PARAMS)
  updates, state = tx.update(PARAMS, state, PARAMS)
  plain = so.galore(1e-3, 2, refresh=3)
  expected, _ = plain.update(PARAMS, plain.init(PARAMS), PARAMS)
  for a, b in zip(jax.tree.leaves(updates), jax.tree.leaves(expected)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-10)


# ------------------------------------------------------- error messages

# One invalid value per argument; each must raise an error that names it.
INVALID = dict(
    rank=0, refresh=0, side='diagonal', basis='nonexistent',
    on_refresh='forget', scale_type='row', inner='sgd', initial='zeros',
    basis_optimizer='lbfgs', mode='diagonal', residual='nonexistent', bits=3,
    group_size=0, window=0, max_fraction=2.0, newton_schulz_steps=-1,
    capacity=-1)


def _invalid_cases():
  return [(name, argument) for name, (factory, _) in sorted(PRESETS.items())
          for argument in INVALID if argument in _parameters(factory)]


@pytest.mark.parametrize('name,argument', _invalid_cases())
def test_errors_name_real_arguments(name, argument):
  """Every `identifier` quoted in the message is a parameter of the preset."""
  factory, kwargs = PRESETS[name]
  with pytest.raises((ValueError, TypeError)) as error:
    jax.eval_shape(
        factory(1e-3, **{**kwargs, argument: INVALID[argument]}).init, PARAMS)
  quoted = set(re.findall(r'`([A-Za-z_]\w*)`', str(error.value)))
  assert argument in quoted, str(error.value)
  assert quoted <= set(_parameters(factory)), str(error.value)
