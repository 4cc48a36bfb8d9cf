"""GaLore preset: parity with optax.contrib.galore and its weaknesses fixed."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from optax import contrib
import orbax.checkpoint as ocp
import pytest

import subspace_optax as so


def _gradient_stream(shape, steps, seed=0):
  return [jax.random.normal(jax.random.key(seed + t), shape) for t in range(steps)]


def test_matches_optax_contrib_galore_between_refreshes():
  """Same side, optax Adam, SVD basis: equal updates until contrib re-projects."""
  params = {'w': jnp.zeros((32, 16))}
  ours = so.galore(1e-2, rank=4, refresh=5, scale=0.25,
                   eps=1e-8, eps_before_bias_correction=False, stagger=False, side='compact')
  theirs = contrib.galore(1e-2, rank=4, update_proj_gap=5, scale=0.25)
  s1, s2 = ours.init(params), theirs.init(params)
  for g in _gradient_stream((32, 16), 5):
    u1, s1 = ours.update({'w': g}, s1, params)
    u2, s2 = theirs.update({'w': g}, s2, params)
    np.testing.assert_allclose(u1['w'], u2['w'], rtol=1e-4, atol=1e-7)


def test_stacked_layers_are_projected_per_layer():
  """optax.contrib.galore leaves (L, m, n) leaves at full size; ours projects them."""
  params = {'blocks': jnp.zeros((4, 32, 16))}
  ours = so.galore(1e-2, rank=4, dimension_numbers=so.last_two_axes, side='compact')
  state = ours.init(params)
  low = state[0]
  assert low.basis['blocks'].shape == (4, 32, 4)
  assert low.inner_state.mu['blocks'].shape == (4, 4, 16)
  theirs = contrib.galore(1e-2, rank=4).init(params)
  assert so.state_bytes(state) < so.state_bytes(theirs) / 2
  # Each layer has its own basis: the top singular vectors of its own gradient.
  g = jax.random.normal(jax.random.key(0), (4, 32, 16))
  _, state = ours.update({'blocks': g}, state, params)
  for layer in range(4):
    u = np.linalg.svd(np.asarray(g[layer]))[0][:, :4]
    q = np.asarray(state[0].basis['blocks'][layer])
    np.testing.assert_allclose(np.abs(u.T @ q), np.eye(4), atol=1e-4)


def test_orbax_round_trip_with_unprojected_leaves(tmp_path):
  """contrib.galore's (0, 0) placeholders cannot be saved; MaskedNode can."""
  params = {'w': jnp.zeros((16, 8)), 'b': jnp.zeros((8,))}
  tx = so.galore(1e-2, rank=2, refresh=3, side='compact')
  state = tx.init(params)
  update = jax.jit(tx.update)
  for g in _gradient_stream((16, 8), 4):
    _, state = update({'w': g, 'b': g[0]}, state, params)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(tmp_path / 'state', state)
  checkpointer.wait_until_finished()
  restored = checkpointer.restore(tmp_path / 'state', jax.eval_shape(tx.init, params))
  assert jax.tree.structure(restored) == jax.tree.structure(state)
  jax.tree.map(np.testing.assert_array_equal, restored, state)
  g = jax.random.normal(jax.random.key(9), (16, 8))
  a, _ = update({'w': g, 'b': g[0]}, state, params)
  b, _ = update({'w': g, 'b': g[0]}, restored, params)
  jax.tree.map(np.testing.assert_array_equal, a, b)
  with pytest.raises(ValueError, match='zero size'):
    theirs = contrib.galore(1e-2, rank=2)
    checkpointer.save(tmp_path / 'theirs', theirs.init(params))
    checkpointer.wait_until_finished()


def test_nnx_optimizer_trains_a_model():
  from flax import nnx

  class Model(nnx.Module):

    def __init__(self, rngs):
      self.hidden = nnx.Linear(8, 32, rngs=rngs)
      self.out = nnx.Linear(32, 1, rngs=rngs)

    def __call__(self, x):
      return self.out(jax.nn.relu(self.hidden(x)))

  model = Model(nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, so.galore(3e-2, rank=4, refresh=10, scale=1.0, side='compact'),
                            wrt=nnx.Param)
  x = jax.random.normal(jax.random.key(1), (64, 8))
  y = jnp.sin(x[:, :1]) + x[:, 1:2]

  @nnx.jit
  def step(model, optimizer):
    loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
    optimizer.update(model, grads)
    return loss

  first = float(step(model, optimizer))
  for _ in range(60):
    last = float(step(model, optimizer))
  assert last < 0.3 * first
  low = optimizer.opt_state[0]
  basis_shapes = [jnp.shape(b) for b in jax.tree.leaves(low.basis)]
  assert (32, 4) in basis_shapes  # hidden kernel (8, 32): the 32 side is projected
