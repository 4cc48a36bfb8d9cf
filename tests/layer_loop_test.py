"""The CPU's layer loop gives the staged update's result (layer_loop.py).

On the CPU, ``low_rank`` updates a stack of layers one layer at a time; GPUs
run the staged update over the whole stack. Both schedules are compared here
on the CPU: the staged one by forcing ``per_matrix.on_platform`` to take its
GPU branch (which also vectorises the unprojection, as on a GPU).
"""

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import subspace_optax as so
from benchmarks import methods as bench_methods
from subspace_optax._src.pipeline import layer_loop
from subspace_optax._src.pipeline import layout as layout_lib
from subspace_optax._src.pipeline import per_matrix
from subspace_optax._src.pipeline import stages

L, D, H = 3, 8, 12


def make_params(dtype=jnp.float32):
  k = jax.random.split(jax.random.key(0), 4)
  params = {
      'embed': {'kernel': jax.random.normal(k[0], (20, D))},
      'blocks': {
          'mlp': {'up': {'kernel': jax.random.normal(k[1], (L, D, H))},
                  'down': {'kernel': jax.random.normal(k[2], (L, H, D))}},
          'norm': {'scale': jnp.ones((L, D))}},
      'lm_head': {'kernel': jax.random.normal(k[3], (D, 16))},
  }
  return jax.tree.map(lambda x: x.astype(dtype), params)


def gradients(step, params):
  keys = jax.random.split(jax.random.key(100 + step), len(jax.tree.leaves(params)))
  leaves, treedef = jax.tree.flatten(params)
  return treedef.unflatten([jax.random.normal(k, x.shape, x.dtype)
                            for k, x in zip(keys, leaves)])


@contextlib.contextmanager
def gpu_schedule():
  """``on_platform`` takes its GPU branch while the update is traced."""
  original = per_matrix.on_platform
  per_matrix.on_platform = lambda *args, cpu, gpu: gpu(*args)
  try:
    yield
  finally:
    per_matrix.on_platform = original


def run(tx, params, grads, staged: bool):
  update = jax.jit(lambda g, s, p: tx.update(g, s, p))
  state, out = tx.init(params), []
  for g in grads:
    with gpu_schedule() if staged else contextlib.nullcontext():
      updates, state = update(g, state, params)
    out.append(updates)
  return out, state


def subspace_state(state):
  (found,) = [x for x in jax.tree.leaves(
      state, is_leaf=lambda x: isinstance(x, so.SubspaceState))
              if isinstance(x, so.SubspaceState)]
  return found


def assert_trees_close(a, b, atol=1e-5):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    rtol = 1e-2 if x.dtype == jnp.bfloat16 else 1e-4
    np.testing.assert_allclose(np.asarray(x, np.float32),
                               np.asarray(y, np.float32), atol=atol,
                               rtol=rtol, equal_nan=True)


def build(name):
  rank = bench_methods.get(name).rank
  return bench_methods.get(name).build(
      learning_rate=1e-2, rank=rank if isinstance(rank, float) else 4,
      refresh=2, weight_decay=0.1, seed=0)


# A sign (FRUGAL's residual) or a quantisation step turns float32 noise
# between the two schedules' products into whole steps; float64 agrees.
FLOAT64 = {'frugal', 'frugal_blocks', 'frugal_random', 'frugal_columns',
           'q_galore', 'q_galore_8bit_moments'}
FAST = {'galore', 'golore', 'fira', 'apollo_mini', 'galore_randomized',
        'online_subspace_descent'}


@pytest.mark.parametrize('name', [
    n if n in FAST else pytest.param(n, marks=pytest.mark.slow)
    for n in bench_methods.REGISTRY if n != 'optax_galore'])
def test_layer_loop_equals_the_staged_update(name):
  x64 = name in FLOAT64
  with jax.enable_x64(x64):
    params = make_params(jnp.float64 if x64 else jnp.float32)
    grads = [gradients(step, params) for step in range(3)]  # refresh at 0, 2
    tx = build(name)
    looped, looped_state = run(tx, params, grads, staged=False)
    staged, staged_state = run(tx, params, grads, staged=True)
  assert_trees_close(looped, staged)
  assert_trees_close(looped_state, staged_state, atol=1e-4)
  # The stack's update is not zero (a dropped layer would also agree with a
  # schedule that dropped it).
  up = np.asarray(looped[-1]['blocks']['mlp']['up']['kernel'])
  assert np.all(np.abs(up).max(axis=(1, 2)) > 0)


def test_a_non_finite_layer_skips_the_refresh_of_the_whole_leaf():
  # Layer 1 is Inf at step 0 (a refresh step): as in the staged update, no
  # layer of that leaf takes a basis from it, and the leaf stays due.
  tx = build('galore')
  params = make_params()
  grads = [gradients(step, params) for step in range(2)]
  up = grads[0]['blocks']['mlp']['up']['kernel']
  grads[0]['blocks']['mlp']['up']['kernel'] = up.at[1, 0, 0].set(jnp.inf)
  looped, looped_state = run(tx, params, grads, staged=False)
  staged, staged_state = run(tx, params, grads, staged=True)
  assert_trees_close(looped, staged)
  assert_trees_close(looped_state, staged_state, atol=1e-4)
  basis = lambda state: subspace_state(state).basis['blocks']['mlp']['up'][
      'kernel']
  state_0 = run(tx, params, grads[:1], staged=False)[1]
  np.testing.assert_array_equal(basis(state_0), basis(tx.init(params)))


def test_stack_of_takes_the_largest_stacks_layers():
  params = {'a': jnp.zeros((4, 8, 8)), 'b': jnp.zeros((3, 16, 16)),
            'c': jnp.zeros((4, 6, 6)), 'bias': jnp.zeros((4, 8)),
            'w': jnp.zeros((8, 8)), 'one': jnp.zeros((1, 8, 8))}
  layouts = layout_lib.flat_layouts(params, so.last_two_axes, 'reference', 2)
  split = layer_loop.stack_of(params, layouts)
  names = sorted(params)  # dict leaves flatten in key order
  assert dict(zip(names, split.is_stack)) == {
      'a': False, 'b': True, 'bias': False, 'c': False, 'one': False,
      'w': False}
  plain = {'w': jnp.zeros((8, 8)), 'one': jnp.zeros((1, 8, 8))}
  assert layer_loop.stack_of(
      plain, layout_lib.flat_layouts(plain, so.last_two_axes, 'reference',
                                     2)) is None


def test_an_inner_optimizer_of_the_whole_tree_keeps_the_staged_update():
  # Global-norm clipping of the coefficients needs every layer's C first:
  # the layer loop cannot run it, so the staged update does (same result on
  # every platform).
  inner = optax.chain(optax.clip_by_global_norm(0.1), optax.scale_by_adam())
  tx = so.low_rank(inner, rank=2, refresh=2, basis='svd',
                   dimension_numbers=so.last_two_axes)
  params = make_params()
  grads = [gradients(step, params) for step in range(2)]
  looped, _ = run(tx, params, grads, staged=False)
  staged, _ = run(tx, params, grads, staged=True)
  assert_trees_close(looped, staged)
  layouts = layout_lib.flat_layouts(params, so.last_two_axes, 'reference', 2)
  split = layer_loop.stack_of(params, layouts)
  assert split is not None
  assert layer_loop.Plans(tx).get(params, split) is None


def _nan_on_large_layers(trigger):
  """The SVD basis, NaN on a matrix with an entry above ``trigger``."""
  svd = so.bases.svd()

  def refresh(g, old, key, align):
    new = svd.refresh(g, old, key, align)
    return jnp.where(jnp.max(jnp.abs(g)) > trigger, jnp.nan, new)

  return svd._replace(name='nan_on_large', refresh=refresh)


def test_a_refresh_that_fails_on_one_layer_keeps_every_layers_basis():
  # The new basis of layer 2 only is NaN: as in the staged update, no layer
  # takes its new basis and the leaf stays due; the next refresh runs.
  tx = so.low_rank(optax.scale_by_adam(), rank=2, refresh=100,
                   basis=_nan_on_large_layers(100.0),
                   dimension_numbers=so.last_two_axes)
  params = {'s': jnp.zeros((L, 6, 4))}
  good = gradients(0, params)
  bad = {'s': good['s'].at[2].multiply(1e4)}
  looped, looped_state = run(tx, params, [bad, good], staged=False)
  staged, staged_state = run(tx, params, [bad, good], staged=True)
  assert_trees_close(looped, staged)
  assert_trees_close(looped_state, staged_state)
  failed = run(tx, params, [bad], staged=False)[1]
  np.testing.assert_array_equal(failed.basis['s'], tx.init(params).basis['s'])
  assert not np.allclose(looped_state.basis['s'], tx.init(params).basis['s'])


def test_a_lazy_policy_records_the_whole_leafs_similarity():
  # Q-GaLore's lazy policy stretches a stacked leaf's period from the
  # similarity of its new bases to the old, averaged over the layers: each
  # layer's update records the whole leaf's (computed before the loop), so
  # the loop runs and gives the staged update's state. Refreshes at every
  # step record a similarity at steps 1 and 2; then the period doubles.
  tx = so.low_rank(
      optax.scale_by_adam(), rank=2, basis='svd',
      refresh=so.refresh.lazy(1, threshold=0.0, window=2, stagger=False),
      dimension_numbers=so.last_two_axes)
  params = make_params()
  layouts = layout_lib.flat_layouts(params, so.last_two_axes, 'reference', 2)
  assert layer_loop.Plans(tx).get(
      params, layer_loop.stack_of(params, layouts)) is not None
  grads = [gradients(step, params) for step in range(4)]
  looped, looped_state = run(tx, params, grads, staged=False)
  staged, staged_state = run(tx, params, grads, staged=True)
  assert_trees_close(looped, staged)
  assert_trees_close(looped_state, staged_state)
  lazy = looped_state.refresh['blocks']['mlp']['up']['kernel']
  assert (int(lazy.period), int(lazy.refreshes)) == (2, 3)
  # The recorded similarity is the mean over the layers, not one layer's.
  up = [g['blocks']['mlp']['up']['kernel'] for g in grads]
  per_layer = [
      stages.similarity(_transition(up[1][l], up[2][l]), 2) for l in range(L)]
  np.testing.assert_allclose(lazy.similarities[-1], np.mean(per_layer),
                             rtol=1e-5)
  assert np.ptp(per_layer) > 1e-3


def _transition(previous, new):
  """``QₙᵀQₚ`` of the rank-2 SVD bases of two gradients (one matrix)."""
  basis = lambda g: np.linalg.svd(np.asarray(g), full_matrices=False)[0][:, :2]
  return jnp.asarray(basis(new).T @ basis(previous))
