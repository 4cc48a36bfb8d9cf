"""Tests of the reparameterisation transform: exactness, stacks, other
leaves, penalties, state format and named errors."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from subspace_optax._src.finetune import reparameterize as rep
from subspace_optax._src.finetune import weight_bases
from subspace_optax._src.methods import lora as lora_lib
from subspace_optax._src.methods import svfit as svfit_lib
import subspace_optax as so


def _params():
  keys = jax.random.split(jax.random.key(1), 3)
  return {
      'w': jax.random.normal(keys[0], (10, 7)) / 3,
      'stack': jax.random.normal(keys[1], (3, 6, 5)) / 3,
      'b': jnp.zeros((5,)),
  }


def _grads(params, t):
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(100 + t), len(leaves))
  return treedef.unflatten(
      [jax.random.normal(k, p.shape, p.dtype) for k, p in zip(keys, leaves)])


def _train(tx, params, steps):
  state = tx.init(params)
  first = state
  step = jax.jit(tx.update)
  for t in range(steps):
    updates, state = step(_grads(params, t), state, params)
    params = optax.apply_updates(params, updates)
  return params, first, state


def _weight(factorization, state, leaf, params0):
  """W_0 - R(f_0) + R(f_t), batched over the leading axes."""
  rebuild = factorization.reconstruct
  for _ in range(params0[leaf].ndim - 2):
    rebuild = jax.vmap(rebuild)
  f0, ft, c = (state[0].factors[leaf], state[1].factors[leaf],
               state[0].frozen[leaf])
  return params0[leaf] - rebuild(f0, c) + rebuild(ft, c)


@pytest.mark.parametrize('factorization', [
    svfit_lib.svfit_factorization(3), lora_lib.lora_factorization(2)])
def test_params_stay_equal_to_the_reparameterised_weight(factorization):
  params = _params()
  tx = rep.reparameterize(factorization, optax.adamw(3e-2, weight_decay=0.1))
  final, first, last = _train(tx, params, 30)
  for leaf in ('w', 'stack'):
    want = _weight(factorization, (first, last), leaf, params)
    np.testing.assert_allclose(final[leaf], want, atol=2e-6)
    assert float(jnp.max(jnp.abs(final[leaf] - params[leaf]))) > 1e-2
  np.testing.assert_array_equal(final['b'], params['b'])  # frozen


def test_a_stack_is_one_factorisation_per_matrix():
  params = _params()
  tx = svfit_lib.svfit(1e-2, 2)
  stacked, _, _ = _train(tx, params, 5)
  for i in range(3):
    single = {'w': params['stack'][i]}
    state = tx.init(single)
    np.testing.assert_allclose(
        state.factors['w']['s'],
        tx.init(params).factors['stack']['s'][i], rtol=1e-6)
    for t in range(5):
      g = {'w': _grads(params, t)['stack'][i]}
      updates, state = tx.update(g, state, single)
      single = optax.apply_updates(single, updates)
    np.testing.assert_allclose(single['w'], stacked['stack'][i], atol=1e-6)


def test_other_leaves_get_the_others_transform():
  params = _params()
  tx = svfit_lib.svfit(1e-2, 2, others=optax.adam(0.1))
  final, _, _ = _train(tx, params, 4)
  bias, state = params['b'], optax.adam(0.1).init(params['b'])
  for t in range(4):
    u, state = optax.adam(0.1).update(_grads(params, t)['b'], state)
    bias = bias + u
  np.testing.assert_allclose(final['b'], bias, rtol=1e-6)


def test_mask_leaves_a_matrix_out():
  params = _params()
  mask = {'w': True, 'stack': False, 'b': False}
  tx = svfit_lib.svfit(1e-2, 2, mask=mask)
  state = tx.init(params)
  assert isinstance(state.factors['stack'], optax.MaskedNode)
  updates, _ = tx.update(_grads(params, 0), state, params)
  assert float(jnp.max(jnp.abs(updates['stack']))) == 0.0
  assert float(jnp.max(jnp.abs(updates['w']))) > 0.0


def test_penalty_gradient_is_added_and_weight_decay_acts_on_factors():
  def init(w, key, path):
    del key, path
    return {'a': jnp.ones(w.shape[:-2] + (w.shape[-1],))}, {}

  def reconstruct(f, c):
    del c
    return jnp.zeros((4, 3)) + f['a']  # W = 1 aᵀ

  def penalty(f, c):
    del c
    return 0.5 * jnp.sum(f['a'] ** 2)

  factorization = rep.Factorization('toy', init, reconstruct, penalty)
  inner = optax.chain(optax.add_decayed_weights(0.25), optax.sgd(1.0))
  tx = rep.reparameterize(factorization, inner)
  params = {'w': jnp.zeros((4, 3))}
  state = tx.init(params)
  g = {'w': jnp.ones((4, 3)) * jnp.array([1.0, 2.0, 3.0])}
  updates, state = tx.update(g, state, params)
  # gradient 4·g_col (chain rule) + a (penalty), plus 0.25·a decay.
  want = 1.0 - (4 * jnp.array([1.0, 2.0, 3.0]) + 1.0 + 0.25)
  np.testing.assert_allclose(state.factors['w']['a'], want, rtol=1e-6)
  np.testing.assert_allclose(updates['w'], jnp.broadcast_to(want - 1.0, (4, 3)),
                             rtol=1e-6)


def test_bfloat16_params_get_bfloat16_updates_and_float32_factors():
  params = {'w': (jnp.eye(6, 4) * 2).astype(jnp.bfloat16)}
  tx = svfit_lib.svfit(1e-2, 2)
  state = tx.init(params)
  assert state.factors['w']['s'].dtype == jnp.float32
  updates, _ = tx.update({'w': jnp.ones((6, 4), jnp.bfloat16)}, state, params)
  assert updates['w'].dtype == jnp.bfloat16


def test_state_is_an_orbax_checkpoint(tmp_path):
  params = _params()
  tx = lora_lib.lora(1e-2, 2, others=optax.adam(1e-2))
  _, _, state = _train(tx, params, 3)
  assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(state))
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(tmp_path / 'state', state)
  checkpointer.wait_until_finished()
  restored = checkpointer.restore(tmp_path / 'state',
                                  jax.eval_shape(tx.init, params))
  assert jax.tree.structure(restored) == jax.tree.structure(state)
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
    np.testing.assert_array_equal(a, b)


def test_extra_args_pass_through():
  params = _params()
  tx = svfit_lib.svfit(1e-2, 2)
  updates, _ = tx.update(_grads(params, 0), tx.init(params), params, value=1.0)
  assert updates['w'].shape == (10, 7)


def test_non_matrix_leaf_in_mask_names_the_leaf():
  mask = {'w': True, 'stack': True, 'b': True}
  with pytest.raises(ValueError, match=r"\['b'\].*not a matrix.*mask"):
    svfit_lib.svfit(1e-2, 2, mask=mask).init(_params())


def test_stack_without_batch_handling_names_the_leaf():
  with pytest.raises(ValueError, match=r"\['stack'\].*not 2-D.*stacked=True"):
    svfit_lib.svfit(1e-2, 2, stacked=False).init(_params())


def test_mask_of_another_structure_is_refused():
  with pytest.raises(ValueError, match='`mask` must be a pytree'):
    svfit_lib.svfit(1e-2, 2, mask={'w': True}).init(_params())


def test_updates_of_another_tree_are_refused():
  params = _params()
  tx = svfit_lib.svfit(1e-2, 2)
  state = tx.init(params)
  with pytest.raises(ValueError, match='do not have the structure'):
    tx.update({'w': params['w']}, state, params)
  grads = dict(_grads(params, 0), w=jnp.ones((7, 10)))
  with pytest.raises(ValueError, match=r"\['w'\].*shape \(7, 10\).*\(10, 7\)"):
    tx.update(grads, state, params)


def test_infinite_weight_in_a_stack_names_the_leaf():
  params = _params()
  params['stack'] = params['stack'].at[2, 0, 0].set(jnp.inf)
  with pytest.raises(ValueError, match=r"\['stack'\].*non-finite"):
    lora_lib.lora(1e-2, 2).init(params)


@pytest.mark.parametrize('end', ['top', 'bottom'])
def test_weight_basis_memory_protects_its_end_of_the_spectrum(end):
  params = _params()
  memory = weight_bases.weight_subspace_basis(
      params, 2, end=end, mask={'w': True, 'stack': False, 'b': False})
  tx = so.continual.orthogonal_to(memory)
  state = tx.init(params)
  updates, _ = tx.update(_grads(params, 0), state, params)
  u, s, vt = np.linalg.svd(np.asarray(params['w']), full_matrices=False)
  part = slice(0, 2) if end == 'top' else slice(5, 7)
  other = slice(5, 7) if end == 'top' else slice(0, 2)
  delta = np.asarray(updates['w'])
  assert np.max(np.abs(u[:, part].T @ delta)) < 1e-5
  assert np.max(np.abs(delta @ vt[part].T)) < 1e-5
  assert np.max(np.abs(u[:, other].T @ delta)) > 1e-2
  # Stored as is by set_memory into a larger empty memory: the same
  # projection, up to float32 rounding (its products run over a zero column
  # more, in another order on some CPUs: 10 ulps apart on an AMD EPYC).
  tx = so.continual.orthogonal_to(capacity=3)
  state = so.continual.set_memory(tx.init(params), memory)
  again, _ = tx.update(_grads(params, 0), state, params)
  np.testing.assert_allclose(again['w'], updates['w'], rtol=1e-5, atol=1e-6)


def test_weight_basis_stacks_and_modes():
  params = _params()
  memory = weight_bases.weight_subspace_basis(params, 0.5, mode='left')
  leaf = memory['stack']
  assert leaf.left.shape == (3, 6, 2) and leaf.left_count.shape == (3,)
  assert isinstance(leaf.right, optax.MaskedNode)
  assert isinstance(memory['b'], optax.MaskedNode)
  with pytest.raises(ValueError, match=r"\['stack'\].*`rank`=6.*=5"):
    weight_bases.weight_subspace_basis(params, 6)
