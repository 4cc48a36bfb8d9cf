"""Refresh cost under jax.vmap (ensembles) and for layer-stacked params.

``jax.vmap`` turns a ``lax.cond`` with a batched predicate into a select of
both branches; the refresh goes through ``batching.cond`` so that an ensemble
still refreshes only on steps where some member is due. Stacked ``(L, m, n)``
leaves refresh each matrix once: one batched factorisation (a loop over
``L`` inside that one refresh on multi-device CPU, see
``batching.loop_on_cpu``), or one per layer in the CPU's layer loop (after
its check that every layer's new basis is finite).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import subspace_optax as so
from subspace_optax._src.pipeline import batching

MEMBERS = 3


def _sub_jaxprs(params):
  for value in params.values():
    for item in value if isinstance(value, (tuple, list)) else (value,):
      if hasattr(item, 'eqns'):
        yield item
      elif hasattr(getattr(item, 'jaxpr', None), 'eqns'):
        yield item.jaxpr


def _equations(jaxpr, inside_cond=False, loop=1):
  """(equation, inside a cond branch?, trip count of the enclosing scans) for
  every equation, recursively."""
  for eqn in jaxpr.eqns:
    yield eqn, inside_cond, loop
    nested = inside_cond or eqn.primitive.name == 'cond'
    length = eqn.params['length'] if eqn.primitive.name == 'scan' else 1
    for sub in _sub_jaxprs(eqn.params):
      yield from _equations(sub, nested, loop * length)


def _find(jaxpr, name):
  return [(e, inside) for e, inside, _ in _equations(jaxpr.jaxpr)
          if e.primitive.name == name]


def _matrices_per_call(jaxpr, name):
  """How many matrices each ``name`` factorisation covers: its batch, times
  the trip count of a loop around it (with several CPU devices the batch is a
  loop, see ``batching.loop_on_cpu``)."""
  return [loop * int(np.prod(e.invars[0].aval.shape[:-2], dtype=int))
          for e, _, loop in _equations(jaxpr.jaxpr) if e.primitive.name == name]


def _ensemble(seed, shape=(24, 16)):
  keys = jax.random.split(jax.random.key(seed), 2)
  return {'w': jax.random.normal(keys[0], (MEMBERS,) + shape),
          'b': jax.random.normal(keys[1], (MEMBERS, shape[1]))}


def _tx(basis='svd'):
  return so.galore(1e-2, rank=4, refresh=3, stagger=False, basis=basis, side='compact')


def test_cond_outside_vmap_is_a_cond():
  out = batching.cond(jnp.asarray(True), lambda x: x + 1, lambda x: x, 1.0)
  assert out == 2.0
  jaxpr = jax.make_jaxpr(
      lambda p, x: batching.cond(p, jnp.sin, jnp.cos, x))(True, 1.0)
  assert [inside for _, inside in _find(jaxpr, 'sin')] == [True]


def test_cond_with_a_concrete_predicate_runs_only_its_branch():
  """Eager (no trace): the branch the predicate picks, and only that one."""

  def never(x):
    raise AssertionError(f'the branch not picked ran on {x}')

  assert batching.cond(jnp.asarray(True), lambda x: x + 1, never, 1.0) == 2.0
  assert batching.cond(jnp.asarray(False), never, lambda x: x - 1, 1.0) == 0.0


def test_vmapped_update_keeps_the_svd_inside_a_cond():
  """Under vmap the SVD sits in a cond branch (runs only when some member is
  due), never in straight-line code (which would run every step)."""
  tx = _tx()
  params = _ensemble(0)
  state = jax.vmap(tx.init)(params)
  jaxpr = jax.make_jaxpr(jax.vmap(tx.update))(_ensemble(1), state, params)
  svds = _find(jaxpr, 'svd')
  assert svds, 'no svd in the jaxpr'
  assert all(inside for _, inside in svds), 'an svd runs outside any cond'
  assert _matrices_per_call(jaxpr, 'svd') == [MEMBERS]  # one batched call


def test_vmapped_update_matches_members_one_by_one():
  """Same states and updates as running each member alone, including a member
  whose refresh is skipped (non-finite gradient at step 0) while the others
  refresh: the per-member predicate is honoured inside the batched cond."""
  tx = _tx()
  params = _ensemble(0)
  grads = [_ensemble(s) for s in (1, 2, 3, 4)]
  grads[0]['w'] = grads[0]['w'].at[1, 0, 0].set(jnp.nan)
  vmapped = jax.jit(jax.vmap(tx.update))
  single = jax.jit(tx.update)
  state = jax.vmap(tx.init)(params)
  members = [tx.init(jax.tree.map(lambda x, i=i: x[i], params))
             for i in range(MEMBERS)]
  for g in grads:  # steps 0..3: refreshes due at 0 and 3
    updates, state = vmapped(g, state, params)
    for i in range(MEMBERS):
      one = jax.tree.map(lambda x, i=i: x[i], (g, params))
      member_updates, members[i] = single(one[0], members[i], one[1])
      for a, b in zip(jax.tree.leaves((updates, state)),
                      jax.tree.leaves((member_updates, members[i]))):
        np.testing.assert_allclose(a[i], b, rtol=2e-5, atol=2e-6,
                                   equal_nan=True)
  # Member 1 skipped its step-0 refresh, so it refreshed at step 1 instead.
  basis = state[0].basis['w']
  assert not np.allclose(basis[1], jnp.eye(24, 4))


@pytest.mark.parametrize('basis, factorisation', [
    ('svd', 'svd'), ('randomized', 'eigh')])
def test_stacked_layers_refresh_in_one_batched_call(basis, factorisation):
  """A (L, m, n) leaf is refreshed by one factorisation batched over L, in
  each of the two schedules the update holds (``lax.platform_dependent``):
  the staged update of GPUs, and the layer loop of the CPU
  (``layer_loop.py``: one matrix per call, in a loop of L), which checks
  first, one matrix at a time, that every layer's new basis is finite."""
  layers = 5
  params = {'s': jnp.ones((layers, 24, 16))}
  tx = so.low_rank(optax.scale_by_adam(), rank=4, refresh=3, basis=basis,
                   dimension_numbers=so.last_two_axes, side='compact')
  state = tx.init(params)
  jaxpr = jax.make_jaxpr(tx.update)(params, state)
  calls = _find(jaxpr, factorisation)
  assert len(calls) == 3, len(calls)
  assert all(inside for _, inside in calls)  # behind the refresh cond
  assert _matrices_per_call(jaxpr, factorisation) == [layers] * 3
