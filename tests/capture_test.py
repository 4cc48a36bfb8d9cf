"""Tests of continual.layer_inputs: each layer's inputs of a flax NNX model."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import subspace_optax as so
from subspace_optax import continual as cl


class _Net(nnx.Module):
  """Embed -> Linear -> relu -> Linear (called twice: shared weights)."""

  def __init__(self, rngs):
    self.embed = nnx.Embed(11, 6, rngs=rngs)
    self.first = nnx.Linear(6, 5, rngs=rngs)
    self.shared = nnx.Linear(5, 5, use_bias=False, rngs=rngs)

  def __call__(self, tokens):
    h = jax.nn.relu(self.first(self.embed(tokens)))
    return self.shared(jnp.tanh(self.shared(h)))


class _Block(nnx.Module):
  def __init__(self, rngs):
    self.linear = nnx.Linear(4, 4, use_bias=False, rngs=rngs)

  def __call__(self, x):
    return jnp.tanh(self.linear(x))


class _Scanned(nnx.Module):
  """Three blocks built with nnx.vmap and run with nnx.scan."""

  def __init__(self, rngs):
    @nnx.split_rngs(splits=3)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make(rngs):
      return _Block(rngs)
    self.blocks = make(rngs)

  def __call__(self, x):
    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
    def run(x, block):
      return block(x)
    return run(x, self.blocks)


def test_inputs_are_the_layers_actual_inputs():
  net = _Net(nnx.Rngs(0))
  tokens = jnp.array([[1, 2, 3], [4, 5, 10]])
  inputs = cl.layer_inputs(net, tokens)
  # Structure of the params, None where no layer input belongs.
  assert inputs['first']['bias'] is None
  embedded = net.embed(tokens).reshape(-1, 6)
  np.testing.assert_allclose(inputs['first']['kernel'], embedded, atol=1e-6)
  one_hot = np.eye(11)[np.ravel(tokens)]
  np.testing.assert_array_equal(inputs['embed']['embedding'], one_hot)
  h = jax.nn.relu(net.first(net.embed(tokens))).reshape(-1, 5)
  both_calls = np.concatenate([h, np.tanh(h @ net.shared.kernel[...])])
  np.testing.assert_allclose(inputs['shared']['kernel'], both_calls,
                             atol=1e-5)


def test_classes_are_restored_even_when_the_call_raises():
  call = nnx.Linear.__call__
  cl.layer_inputs(_Net(nnx.Rngs(0)), jnp.array([[1, 2]]))
  assert nnx.Linear.__call__ is call
  with pytest.raises(ValueError, match='integer'):
    cl.layer_inputs(_Net(nnx.Rngs(0)), jnp.ones((2, 3)))  # float token ids
  assert nnx.Linear.__call__ is call


def test_a_subclass_is_captured_once():
  class Dense(nnx.Linear):
    pass

  class Model(nnx.Module):
    def __init__(self, rngs):
      self.a = Dense(3, 2, rngs=rngs)
      self.b = nnx.Linear(2, 2, rngs=rngs)

    def __call__(self, x):
      return self.b(self.a(x))

  x = jnp.arange(12.0).reshape(4, 3)
  inputs = cl.layer_inputs(Model(nnx.Rngs(0)), x)
  np.testing.assert_array_equal(inputs['a']['kernel'], x)  # 4 rows, not 8
  assert inputs['b']['kernel'].shape == (4, 2)


def test_scanned_layers_get_stacked_inputs():
  net = _Scanned(nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (2, 7, 4))
  inputs = cl.layer_inputs(net, x)
  kernels = net.blocks.linear.kernel[...]
  assert inputs['blocks']['linear']['kernel'].shape == (3, 14, 4)
  h = x.reshape(-1, 4)
  for layer in range(3):
    np.testing.assert_allclose(inputs['blocks']['linear']['kernel'][layer], h,
                               atol=1e-5)
    h = jnp.tanh(h @ kernels[layer])


def test_gpm_on_captured_inputs_leaves_old_outputs_unchanged():
  """The end-to-end invariant: after protecting task A's inputs at threshold
  1, training on task B does not move the model's output on task A."""
  net = _Scanned(nnx.Rngs(0))
  graphdef, params = nnx.split(net, nnx.Param)
  params = nnx.to_pure_dict(params)
  old = jax.random.normal(jax.random.key(2), (3, 2, 4)) @ jnp.diag(
      jnp.array([1.0, 1.0, 0.0, 0.0]))  # task A spans 2 of 4 input features

  def forward(p, x):
    state = nnx.state(net, nnx.Param)
    nnx.replace_by_pure_dict(state, p)
    return nnx.merge(graphdef, state)(x)

  memory = cl.gpm_memory(cl.layer_inputs(net, old), 1.0, params=params,
                         dimension_numbers=so.last_two_axes)
  assert int(memory['blocks']['linear']['kernel'].left_count[0]) == 2
  tx = optax.chain(optax.adam(0.1), cl.orthogonal_to(
      memory, mode='left', dimension_numbers=so.last_two_axes))
  state = tx.init(params)
  new = jax.random.normal(jax.random.key(3), (3, 2, 4))
  before = forward(params, old)
  for _ in range(5):
    grads = jax.grad(lambda p: jnp.sum(forward(p, new) ** 2))(params)
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
  assert float(jnp.max(jnp.abs(forward(params, new) - forward(
      nnx.to_pure_dict(nnx.state(net, nnx.Param)), new)))) > 1e-2  # trained
  np.testing.assert_allclose(forward(params, old), before, atol=1e-5)


def test_errors_are_named():
  with pytest.raises(ValueError, match='nnx.Module'):
    cl.layer_inputs(lambda x: x, jnp.ones(3))
  with pytest.raises(ValueError, match='captured no input'):
    cl.layer_inputs(_Net(nnx.Rngs(0)), jnp.array([[1]]),
                    layer_types=(nnx.Conv,))
