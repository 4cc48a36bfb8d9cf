"""Contracts every registered method keeps (optax's ``_common_test`` for us).

Each method is compiled twice: the plain step (shared with ``resume_test``
through :func:`registry.compiled`) and one step of the method wrapped in
``apply_if_finite(MultiSteps(inject_hyperparams(method)))``. Every check reuses
those two programs; the parameters mix float32 and bfloat16 leaves, so the
dtype contract is checked for both in one compilation.
"""

import importlib.util
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import registry
import subspace_optax as so

NAMES = registry.NAMES
EXTRA = registry.EXTRA_ARGS


def _signature(tree):
  return jax.tree.map(lambda x: (jnp.shape(x), jnp.result_type(x)), tree)


def _equal(a, b) -> bool:
  leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
  return len(leaves_a) == len(leaves_b) and jax.tree.structure(
      a) == jax.tree.structure(b) and all(
          np.array_equal(np.asarray(x), np.asarray(y), equal_nan=False)
          for x, y in zip(leaves_a, leaves_b))


def _all_finite(tree) -> bool:
  return all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(tree)
             if jnp.issubdtype(jnp.result_type(x), jnp.inexact))


def _poisoned(grads, value):
  """``grads`` with one entry of every leaf set to ``value`` (NaN or Inf)."""
  return jax.tree.map(lambda g: g.reshape(-1).at[0].set(value).reshape(g.shape),
                      grads)


def test_registry_covers_every_public_method():
  registered = {e.factory.__name__ for e in registry.REGISTRY.values()}
  missing = registry.public_callables() - registered - registry.NOT_METHODS
  assert not missing, (
      f'public factories {sorted(missing)} are not in tests/registry.py; add a '
      'small configuration (or list them in NOT_METHODS if they are not '
      'optimizer methods)')


def test_registry_fails_loudly_when_an_export_is_missing(monkeypatch):
  """A missing export is an error naming it, not a dropped entry."""
  monkeypatch.delattr(so, 'i3s')
  spec = importlib.util.spec_from_file_location(
      'registry_without_i3s', registry.__file__)
  module = importlib.util.module_from_spec(spec)
  monkeypatch.setitem(sys.modules, spec.name, module)  # for its dataclass
  with pytest.raises(AttributeError, match="'i3s'"):
    spec.loader.exec_module(module)


@pytest.mark.parametrize('name', NAMES)
def test_jit_step_contract(name):
  """No retrace, extra args, update dtype = param dtype, stable state."""
  tx, step, traces, params = registry.compiled(name)
  state = tx.init(params)
  reference = _signature(state)
  for t in range(4):
    updates, state = step(registry.gradients(params, t), state, params, **EXTRA)
    assert _signature(updates) == _signature(params), t
    assert _signature(state) == reference, t
    assert _all_finite(updates) and _all_finite(state), t
  assert traces[0] == 1, f'{name} retraced: {traces[0]} traces for 4 steps'
  # map_params with the identity is a no-op.
  mapped = optax.tree.map_params(tx, lambda v: v, state)
  assert _equal(mapped, state)


@pytest.mark.parametrize('name', NAMES)
def test_init_from_shape_dtype_structs(name):
  tx, _, _, params = registry.compiled(name)
  abstract_params = jax.tree.map(
      lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype), params)
  abstract = jax.eval_shape(tx.init, abstract_params)
  concrete = tx.init(params)
  assert jax.tree.structure(abstract) == jax.tree.structure(concrete)
  assert _signature(abstract) == _signature(concrete)
  assert so.state_bytes(abstract) == so.state_bytes(concrete)


def test_methods_without_a_basis_are_the_listed_ones():
  """The NaN test below runs on every method with a basis or memory."""
  without = set()
  for name in NAMES:
    tx, _, _, params = registry.compiled(name)
    if not jax.tree.leaves(registry.basis_and_memory(
        jax.eval_shape(tx.init, params))):
      without.add(name)
  assert without == registry.WITHOUT_BASIS


@pytest.mark.parametrize(
    'name', sorted(set(NAMES) - registry.WITHOUT_BASIS))
@pytest.mark.parametrize('poison', [np.nan, np.inf])
def test_non_finite_gradient_never_enters_basis_or_memory(name, poison):
  """A due refresh is skipped on a NaN/Inf gradient and retried next step."""
  tx, step, traces, params = registry.compiled(name)
  initial = tx.init(params)
  before = registry.basis_and_memory(initial)
  assert jax.tree.leaves(before), f'{name} holds no basis or memory'
  # Update 0: every leaf's refresh is due; the gradient is poisoned.
  _, poisoned = step(_poisoned(registry.gradients(params, 0), poison), initial,
                     params, **EXTRA)
  after = registry.basis_and_memory(poisoned)
  assert _equal(after, before), 'a non-finite gradient changed a basis/memory'
  assert _all_finite(after)
  # Next update, finite: the refresh runs now.
  _, state = step(registry.gradients(params, 1), poisoned, params, **EXTRA)
  assert _all_finite(registry.basis_and_memory(state))
  old_subspaces = registry.subspace_states(poisoned)
  new_subspaces = registry.subspace_states(state)
  assert len(old_subspaces) == len(new_subspaces)
  for old, new in zip(old_subspaces, new_subspaces):
    assert not _equal(old.basis, new.basis), (
        'the skipped refresh was not retried')
  assert traces[0] == 1


@pytest.mark.parametrize('name', NAMES)
def test_inject_hyperparams_multisteps_apply_if_finite(name):
  """Wrapped in the three optax wrappers, the method gives the same updates.

  Gradients arrive as g0, g0, NaN, g2, g2: MultiSteps(k=2) emits nothing on the
  first mini-step and mean(g0, g0) = g0 on the second; apply_if_finite drops the
  NaN step (no state change); so the emitted updates equal the plain method's
  on g0 then g2.
  """
  entry = registry.REGISTRY[name]
  tx, step, _, params = registry.compiled(name)
  if entry.no_inject:
    pytest.skip(entry.no_inject)
  injected = optax.chain(
      optax.inject_hyperparams(
          entry.factory, static_args=entry.static_args)(
              **entry.arguments(params)),
      # inject_hyperparams stores float hyperparameters in the highest dtype of
      # the params (float32 here), which promotes bfloat16 updates (optax's
      # behaviour, optax.adamw's too); cast back so apply_if_finite's branches
      # agree.
      optax.stateless(lambda u, p: jax.tree.map(
          lambda x, y: x.astype(y.dtype), u, p)),
  )
  wrapped = optax.apply_if_finite(
      optax.MultiSteps(injected, every_k_schedule=2).gradient_transformation(),
      max_consecutive_errors=3)
  wrapped_step = jax.jit(wrapped.update)
  g0, g2 = registry.gradients(params, 0), registry.gradients(params, 2)
  nan = _poisoned(g2, np.nan)
  state = wrapped.init(params)
  emitted = []
  for g in (g0, g0, nan, g2, g2):
    previous = state
    updates, state = wrapped_step(g, state, params, **EXTRA)
    assert _signature(updates) == _signature(params)
    emitted.append(updates)
    if g is nan:
      assert int(state.notfinite_count) == 1
      assert _equal(state.inner_state, previous.inner_state)
      assert all(not np.any(np.asarray(u)) for u in jax.tree.leaves(updates))
  assert all(not np.any(np.asarray(u)) for u in jax.tree.leaves(emitted[0]))
  plain_state = tx.init(params)
  expected = []
  for g in (g0, g2):
    u, plain_state = step(g, plain_state, params, **EXTRA)
    expected.append(u)
  for got, want in ((emitted[1], expected[0]), (emitted[4], expected[1])):
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      tolerance = 2e-2 if a.dtype == jnp.bfloat16 else 1e-5
      np.testing.assert_allclose(
          np.asarray(a, np.float32), np.asarray(b, np.float32),
          rtol=tolerance, atol=tolerance * float(jnp.abs(b).max()))
