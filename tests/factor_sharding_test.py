"""Reparameterised factors are sharded by rule from the weight's sharding.

8 simulated CPU devices (root conftest.py). The registry test in
sharding_test.py checks one compile and stable state shardings for every
fine-tuning preset; this file checks the rule itself and that a sharded step
computes the same update as an unsharded one.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import subspace_optax as so
from subspace_optax._src.finetune import factor_sharding

RANK = 2
SHAPES = {'w': (16, 8), 'stack': (2, 8, 16)}
SPECS = {'w': P('fsdp', None), 'stack': P(None, 'fsdp', None)}


def test_factor_spec_rule():
  """Batch specs kept; the m axis takes s_m, the n axis s_n, once each; ranks
  and vectors replicated."""
  spec = factor_sharding.factor_spec
  assert spec((16, 2), (16, 8), ('a', 'b')) == ('a', None)
  assert spec((2, 8), (16, 8), ('a', 'b')) == (None, 'b')
  assert spec((16, 8), (16, 8), ('a', 'b')) == ('a', 'b')
  assert spec((3, 8, 2), (3, 8, 16), ('l', 'a', None)) == ('l', 'a', None)
  assert spec((3, 16, 2), (3, 8, 16), (None, None, 'a')) == (None, 'a', None)
  assert spec((3, 8), (3, 8, 16), ('l', 'a', None)) == ('l', None)
  # A mesh axis already on a batch axis is not used twice.
  assert spec((3, 8, 2), (3, 8, 16), ('a', 'a', None)) == ('a', None, None)
  # Square weight: a length is ambiguous, the first free axis of it is used.
  assert spec((8, 2), (8, 8), (None, 'a')) == ('a', None)
  assert spec((8, 8), (8, 8), ('a', 'b')) == ('a', 'b')


def _tree(seed, mesh=None):
  keys = jax.random.split(jax.random.key(seed), len(SHAPES))
  tree = {k: jax.random.normal(key, SHAPES[k])
          for key, k in zip(keys, sorted(SHAPES))}
  if mesh is None:
    return tree
  return {k: jax.device_put(v, NamedSharding(mesh, SPECS[k]))
          for k, v in tree.items()}


@pytest.mark.slow
@pytest.mark.parametrize('axis_type', ['explicit', 'auto'])
def test_svfit_factors_follow_the_weight_and_match_unsharded(axis_type):
  """SVFit's frozen U_r is sharded on m like the weight, V_r (n unsharded)
  and s are replicated; a sharded step gives the unsharded step's update,
  sharded like the params."""
  types = {'explicit': AxisType.Explicit, 'auto': AxisType.Auto}
  mesh = jax.make_mesh((8,), ('fsdp',), axis_types=(types[axis_type],))
  tx = so.svfit(1e-2, rank=RANK)
  reference = tx.update(_tree(1), tx.init(_tree(0)), _tree(0))[0]
  with jax.set_mesh(mesh):
    params, grads = _tree(0, mesh), _tree(1, mesh)
    state = tx.init(params)
    updates, after = jax.jit(tx.update)(grads, state, params)
  frozen = state.frozen
  assert frozen['w']['u'].sharding.spec == P('fsdp', None)
  assert frozen['w']['v'].sharding.spec in (P(), P(None, None))
  assert frozen['stack']['u'].sharding.spec == P(None, 'fsdp', None)
  assert state.factors['w']['s'].sharding.spec in (P(), P(None))
  for k in SHAPES:
    assert updates[k].sharding.is_equivalent_to(params[k].sharding,
                                                updates[k].ndim)
    np.testing.assert_allclose(np.asarray(updates[k]), np.asarray(reference[k]),
                               atol=1e-6)
    assert float(jnp.max(jnp.abs(reference[k]))) > 0
  for before, later in zip(jax.tree.leaves(state), jax.tree.leaves(after)):
    assert before.sharding.is_equivalent_to(later.sharding, before.ndim)


@pytest.mark.slow
def test_lora_on_explicit_mesh_matches_unsharded():
  """LoRA (two factor matrices; the VJP's cotangent is the weight gradient)
  on an Explicit mesh: ``down`` (m, r) sharded on m, same update as
  unsharded over two steps (the second one moves ``down``)."""
  mesh = jax.make_mesh((8,), ('fsdp',), axis_types=(AxisType.Explicit,))
  tx = so.lora(1e-2, rank=RANK, alpha=4.0)
  params, grads = _tree(0), _tree(1)
  state = tx.init(params)
  for _ in range(2):
    reference, state = tx.update(grads, state, params)
  with jax.set_mesh(mesh):
    sharded_params, sharded_grads = _tree(0, mesh), _tree(1, mesh)
    sharded = tx.init(sharded_params)
    assert sharded.factors['w']['down'].sharding.spec == P('fsdp', None)
    step = jax.jit(tx.update)
    for _ in range(2):
      updates, sharded = step(sharded_grads, sharded, sharded_params)
  for k in SHAPES:
    np.testing.assert_allclose(np.asarray(updates[k]), np.asarray(reference[k]),
                               atol=1e-6)
    assert float(jnp.max(jnp.abs(reference[k]))) > 0
