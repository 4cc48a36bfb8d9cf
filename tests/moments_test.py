"""The moments table covers every state of the library's presets."""

import collections

import jax
import jax.numpy as jnp
import optax
import pytest

import registry
import subspace_optax as so
from subspace_optax._src.transforms import moments
from subspace_optax._src.transforms import quantized_moments

# State fields that hold floats but are not optimizer moments: bases,
# anchors, memories, limiter norms, quantization scales, refresh statistics.
NOT_MOMENTS = frozenset({
    'anchor', 'fisher', 'basis', 'next_basis', 'left', 'right', 'norm',
    'scale', 'similarities',
    # reparameterize: the trained factors (the inner optimizer's params, whose
    # moments sit in its own state) and constants such as singular vectors.
    'factors', 'frozen',
})


def _is_state(x) -> bool:
  return bool(moments.field_names(x))


def _float_fields(state):
  """``{(state type, field)}`` of every NamedTuple field holding float leaves
  directly (not inside a nested NamedTuple), moment fields not entered."""
  found = set()

  def visit(node):
    for name in moments.field_names(node):
      if name in moments.MOMENTS:
        continue
      for leaf in jax.tree.leaves(getattr(node, name), is_leaf=_is_state):
        if _is_state(leaf):
          visit(leaf)
        elif jnp.issubdtype(jnp.result_type(leaf), jnp.floating):
          found.add((type(node).__name__, name))

  for top in jax.tree.leaves(state, is_leaf=_is_state):
    if _is_state(top):
      visit(top)
  return found


@pytest.mark.parametrize('name', registry.NAMES)
def test_every_float_state_field_is_a_moment_or_known(name):
  """A state field of floats is either in the moments table (so reset,
  transport and 8-bit storage find it) or a known non-moment. A new inner
  optimizer whose moment is called, say, ``velocity`` fails here instead of
  silently escaping ``on_refresh='reset'``."""
  params = registry.make_params()
  state = jax.eval_shape(registry.REGISTRY[name].make(params).init, params)
  unknown = {f for f in _float_fields(state) if f[1] not in NOT_MOMENTS}
  assert not unknown, (
      f'{name}: float state fields {sorted(unknown)} are neither moments '
      '(subspace_optax/_src/moments.py) nor listed in NOT_MOMENTS.')


def test_unknown_moment_name_is_caught():
  """The check above can fail: a trace stored under another name."""
  velocity = collections.namedtuple('VelocityState', ['count', 'velocity'])
  state = velocity(jnp.zeros([], jnp.int32), {'w': jnp.zeros(3)})
  assert _float_fields(state) == {('VelocityState', 'velocity')}
  assert not _float_fields(optax.TraceState({'w': jnp.zeros(3)}))


def test_map_moments_moves_first_and_second_moments_by_name():
  mu = {'a': jnp.ones((2, 3))}
  state = (optax.ScaleByAdamState(jnp.zeros([], jnp.int32), mu, mu),
           optax.TraceState(mu))
  treedef = jax.tree.structure(mu)
  seen = []

  def fn(second, leaves):
    seen.append(second)
    return [2.0 * x if second else -x for x in leaves]

  moved = moments.map_moments(state, treedef, [(2, 3)], fn)
  assert sorted(seen) == [False, False, True]
  assert float(moved[0].mu['a'][0, 0]) == -1.0
  assert float(moved[0].nu['a'][0, 0]) == 2.0
  assert float(moved[1].trace['a'][0, 0]) == -1.0
  # A subtree of another shape is left alone.
  same = moments.map_moments(state, treedef, [(3, 2)], fn)
  assert float(same[0].mu['a'][0, 0]) == 1.0


def test_map_moments_decodes_and_reencodes_8_bit_moments():
  tx = so.quantize_moments(optax.scale_by_adam(), block_size=8, min_size=0)
  x = {'a': jnp.linspace(-1.0, 1.0, 16).reshape(2, 8)}
  _, state = tx.update(x, tx.init(x))
  treedef = jax.tree.structure(x)
  moved = moments.map_moments(
      state, treedef, [(2, 8)], lambda second, leaves: [0 * v for v in leaves])
  inner = moved.inner_state
  for stored in (inner.mu['a'], inner.nu['a']):
    assert isinstance(stored, quantized_moments.QuantizedMoment)
    assert not jnp.any(stored.codes) and not jnp.any(stored.scale)
