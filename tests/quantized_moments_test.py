"""8-bit block-wise moments (quantize_moments): format, accuracy, state, resume."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from jax.sharding import AxisType
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import subspace_optax as so
from subspace_optax._src.transforms import quantized_moments as qm


@pytest.mark.parametrize('signed', [True, False])
def test_codebook_is_the_dynamic_tree_map(signed):
  """0 first, ascending, top value exactly 1; decade E holds 2^(bits-1-E)
  values linearly spaced in [0.1, 1]·10^-E; decoding from the bits gives
  the table."""
  table = qm.dynamic_magnitudes(signed)
  bits = 7 if signed else 8
  assert len(table) == 2**bits and table[0] == 0 and table[-1] == 1.0
  assert np.all(np.diff(table) > 0)
  for e in range(bits):
    in_decade = (table > 0.1 * 10.0**-e) & (table <= 10.0**-e)
    assert in_decade.sum() == 2 ** (bits - 1 - e), e
  decoded = qm._decode_magnitude(jnp.arange(2**bits), signed)  # pylint: disable=protected-access
  np.testing.assert_allclose(decoded, table, rtol=3e-7)


@pytest.mark.parametrize('signed', [True, False])
def test_encoding_picks_the_nearest_code(signed):
  """The code is the number of midpoints between decoded neighbours below
  ``y``: checked at every midpoint, one float32 step either side of it, at
  every code value, and at random values over 9 decades; NaN gives 0."""
  table = np.asarray(qm._decode_magnitude(jnp.arange(2 ** (7 if signed else 8)), signed))  # pylint: disable=protected-access
  midpoints = ((table[:-1] + table[1:]) / np.float32(2)).astype(np.float32)
  rng = np.random.default_rng(0)
  y = np.concatenate([
      midpoints, np.nextafter(midpoints, np.float32(2)),
      np.nextafter(midpoints, np.float32(-1)), table,
      rng.uniform(0, 1, 20000), 10.0 ** rng.uniform(-9, 0, 20000),
      [np.nan]]).astype(np.float32)
  expected = np.searchsorted(midpoints, y, side='left')
  expected[np.isnan(y)] = 0
  got = jax.jit(lambda y: qm._nearest_magnitude(y, signed))(y)  # pylint: disable=protected-access
  np.testing.assert_array_equal(got, expected)


def _max_half_gap(signed):
  return np.max(np.diff(qm.dynamic_magnitudes(signed))) / 2


@pytest.mark.parametrize('signed', [True, False])
def test_round_trip_error_is_bounded_per_block(signed):
  """|x - x̂| <= a_block · (largest codebook gap) / 2, with a_block the
  block's own max: a block of tiny values is not drowned by a large one."""
  rng = np.random.default_rng(0)
  x = rng.standard_normal((3, 64)) * np.repeat(
      10.0 ** rng.uniform(-6, 2, (3, 4)), 16, axis=1)
  if not signed:
    x = x * x
  q = qm.quantize_moment(jnp.asarray(x, jnp.float32), signed, block_size=16)
  assert q.codes.shape == x.shape and q.scale.shape == (3, 4)
  assert q.codes.dtype == (jnp.int8 if signed else jnp.uint8)
  back = np.asarray(qm.dequantize_moment(q), np.float64)
  absmax = np.abs(x).reshape(3, 4, 16).max(-1)
  np.testing.assert_allclose(q.scale, absmax, rtol=1e-7)
  bound = np.repeat(absmax, 16, axis=1) * _max_half_gap(signed) * (1 + 1e-6)
  assert np.all(np.abs(back - x) <= bound)
  # The entry that sets a block's scale round-trips (to float32 rounding).
  blocks = np.abs(x).reshape(3, 4, 16)
  top = np.take_along_axis(
      back.reshape(3, 4, 16), blocks.argmax(-1)[..., None], -1)[..., 0]
  np.testing.assert_allclose(np.abs(top), absmax, rtol=1e-6)


def test_second_moments_keep_small_values_a_linear_map_loses():
  """v over 7 decades in one block: every v >= 1e-7·a stays non-zero, within
  4.5 / 2^(7-E) of itself in decade E. A linear absmax map with 255 levels
  would round every v < a/510 (most of this block) to 0."""
  v = 10.0 ** np.linspace(-7, 0, 256)
  q = qm.quantize_moment(jnp.asarray(v, jnp.float32), False, block_size=256)
  back = np.asarray(qm.dequantize_moment(q), np.float64)
  assert np.all(back > 0)
  decade = np.minimum(np.floor(-np.log10(v)), 7)
  assert np.all(np.abs(back / v - 1) <= 4.5 / 2 ** (7 - decade) + 1e-6)
  assert np.mean(v < 1 / 510) > 0.5


def _params():
  return {'w': jnp.ones((16, 64)), 'b': jnp.ones((64,)), 'small': jnp.ones(8)}


def test_a_moment_that_stays_zero_stays_exactly_zero():
  """Zero gradient entries (a whole block, and single entries next to
  non-zero ones) keep m and v exactly 0, so Adam's update there is 0."""
  tx = so.quantize_moments(optax.scale_by_adam(), block_size=32, min_size=0)
  params = _params()
  g = jax.tree.map(jnp.ones_like, params)
  g['w'] = g['w'].at[:, :32].set(0.0).at[:, 40].set(0.0)
  state = tx.init(params)
  step = jax.jit(tx.update)
  for _ in range(3):
    u, state = step(g, state)
  assert not jnp.any(u['w'][:, :32]) and not jnp.any(u['w'][:, 40])
  for moment in (state.inner_state.mu['w'], state.inner_state.nu['w']):
    assert not jnp.any(qm.dequantize_moment(moment)[:, :32])
    assert not jnp.any(qm.dequantize_moment(moment)[:, 40])


def test_state_bytes_are_codes_and_scales():
  """int8/uint8 codes (1 byte per entry) + one float32 per block; leaves
  below min_size stay float32."""
  tx = so.quantize_moments(optax.scale_by_adam(), block_size=32, min_size=64)
  state = tx.init(_params())
  w_moment = 16 * 64 + 4 * (16 * 64 // 32)
  b_moment = 64 + 4 * 2
  small_moment = 4 * 8
  assert so.state_bytes(state) == 4 + 2 * (w_moment + b_moment + small_moment)
  assert qm.moment_bytes((16, 64), 32, 64) == w_moment
  assert qm.moment_bytes((8,), 32, 64) == small_moment
  assert isinstance(state.inner_state.mu['w'], qm.QuantizedMoment)
  assert not isinstance(state.inner_state.mu['small'], qm.QuantizedMoment)


def _transformer_params(d=256, layers=2, vocab=1024):
  layer = {'q': (d, d), 'k': (d, d), 'v': (d, d), 'o': (d, d),
           'up': (d, 4 * d), 'gate': (d, 4 * d), 'down': (4 * d, d),
           'norm': (d,)}
  shapes = {f'layer{i}': layer for i in range(layers)}
  shapes['embed'] = (vocab, d)
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s, jnp.float32), shapes,
                      is_leaf=lambda s: isinstance(s, tuple))


def _galore(inner, rank):
  return optax.chain(so.low_rank(inner, rank=rank, refresh=200, basis='svd', side='compact'),
                     optax.scale_by_learning_rate(1e-3))


def test_8_bit_moments_shrink_galore_and_q_galore_states():
  """Rank 1/4 on a transformer-like tree. GaLore keeps a float32 basis (a
  quarter of each matrix's entries), so 8-bit moments take it only from
  0.23x to 0.15x AdamW; Q-GaLore (int4 basis) goes from 0.12x to 0.043x."""
  params = _transformer_params()
  adamw = so.state_bytes(jax.eval_shape(optax.adamw(1e-3).init, params))
  size = lambda tx: so.state_bytes(jax.eval_shape(tx.init, params)) / adamw
  galore32 = size(_galore(so.transforms.scale_by_torch_adam(), 0.25))
  galore8 = size(_galore(so.quantize_moments(so.transforms.scale_by_torch_adam()), 0.25))
  q_galore8 = size(so.q_galore(1e-3, rank=0.25, side='compact'))
  q_galore32 = size(so.q_galore(1e-3, rank=0.25, eight_bit_moments=False, side='compact'))
  assert galore8 < 0.16 and galore32 - galore8 > 0.07
  assert q_galore8 <= 0.05 and q_galore32 > 2.5 * q_galore8
  assert so.state_sizes.q_galore_bytes(params, rank=0.25, side='compact') == q_galore8 * adamw


def test_update_close_to_float32_adam_and_traced_once():
  rng = np.random.default_rng(0)
  params = {'w': jnp.zeros((8, 256))}
  tx8 = so.quantize_moments(so.transforms.scale_by_torch_adam(), min_size=0)
  tx32 = so.transforms.scale_by_torch_adam()
  traces = [0]

  def update8(g, s):
    traces[0] += 1
    return tx8.update(g, s)

  update8 = jax.jit(update8)
  s8, s32 = tx8.init(params), tx32.init(params)
  for _ in range(5):
    g = {'w': jnp.asarray(rng.standard_normal((8, 256)), jnp.float32)}
    u8, s8 = update8(g, s8)
    u32, s32 = tx32.update(g, s32)
  assert traces[0] == 1
  error = np.linalg.norm(u8['w'] - u32['w']) / np.linalg.norm(u32['w'])
  assert error < 0.05, error


@pytest.mark.parametrize('inner', ['lion', 'trace'])
def test_first_moment_only_states(inner):
  tx = so.quantize_moments(
      {'lion': optax.scale_by_lion(), 'trace': optax.trace(0.9)}[inner],
      block_size=64, min_size=0)
  params = _params()
  g = jax.tree.map(jnp.ones_like, params)
  state = tx.init(params)
  _, state = tx.update(g, state)
  stored = jax.tree.leaves(
      state, is_leaf=lambda x: isinstance(x, qm.QuantizedMoment))
  assert any(isinstance(x, qm.QuantizedMoment) and x.codes.dtype == jnp.int8
             for x in stored)


def test_inside_low_rank_with_reset_and_transport():
  """The moments have the low-rank shape; reset zeroes and transport moves
  the dequantized moments (no error, state types unchanged)."""
  params = {'w': jnp.ones((64, 32))}
  for on_refresh in ('reset', 'transport'):
    tx = so.low_rank(so.quantize_moments(optax.scale_by_adam(), min_size=0),
                     rank=8, refresh=2, basis='svd', on_refresh=on_refresh, side='compact')
    state = tx.init(params)
    step = jax.jit(tx.update)
    rng = np.random.default_rng(0)
    for _ in range(4):
      g = {'w': jnp.asarray(rng.standard_normal((64, 32)), jnp.float32)}
      u, new = step(g, state)
      assert jax.tree.map(jax.typeof, new) == jax.tree.map(jax.typeof, state)
      state = new
    assert np.isfinite(np.asarray(u['w'])).all()
    mu = state.inner_state.inner_state.mu['w']
    assert isinstance(mu, qm.QuantizedMoment) and mu.codes.shape == (8, 32)


def test_resume_through_orbax_is_bit_exact(tmp_path):
  tx = so.low_rank(so.quantize_moments(so.transforms.scale_by_torch_adam(), min_size=0),
                   rank=4, refresh=2, basis='svd', side='compact')
  params = {'w': jnp.ones((32, 64)), 'b': jnp.ones((64,))}
  rng = np.random.default_rng(0)
  grads = [jax.tree.map(lambda p: jnp.asarray(
      rng.standard_normal(p.shape), jnp.float32), params) for _ in range(6)]
  step = jax.jit(tx.update)
  state = tx.init(params)
  for g in grads[:3]:
    _, state = step(g, state)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(tmp_path / 'state', state)
  checkpointer.wait_until_finished()
  restored = checkpointer.restore(
      tmp_path / 'state', jax.eval_shape(tx.init, params))
  for g in grads[3:]:
    u1, state = step(g, state)
    u2, restored = step(g, restored)
    for a, b in zip(jax.tree.leaves((u1, state)), jax.tree.leaves((u2, restored))):
      assert np.asarray(a).tobytes() == np.asarray(b).tobytes()


@pytest.mark.parametrize('block_size', [32, 256])
def test_sharded_moments_keep_their_sharding(block_size):
  """8-device Explicit mesh, last axis sharded: blocks of 32 stay on one
  device (scales sharded too); blocks of 256 span the devices (scales
  replicated). Codes keep the moment's sharding; init and update agree; the
  values equal the unsharded computation."""
  mesh = jax.make_mesh((8,), ('fsdp',), axis_types=(AxisType.Explicit,))
  tx = so.quantize_moments(optax.scale_by_adam(), block_size=block_size,
                           min_size=0)
  g = jnp.asarray(np.random.default_rng(0).standard_normal((4, 256)),
                  jnp.float32)
  plain_u, plain_state = tx.update({'w': g}, tx.init({'w': g}))
  with jax.set_mesh(mesh):
    sharded = {'w': jax.device_put(g, NamedSharding(mesh, P(None, 'fsdp')))}
    state = jax.jit(tx.init)(sharded)
    u, new = jax.jit(tx.update)(sharded, state)
  assert jax.tree.map(jax.typeof, state) == jax.tree.map(jax.typeof, new)
  mu = new.inner_state.mu['w']
  assert mu.codes.sharding.spec == P(None, 'fsdp')
  assert ('fsdp' in tuple(mu.scale.sharding.spec)) == (block_size == 32)
  for a, b in zip(jax.tree.leaves((u, new)),
                  jax.tree.leaves((plain_u, plain_state))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_bad_arguments_are_named():
  with pytest.raises(ValueError, match='block_size'):
    so.quantize_moments(optax.scale_by_adam(), block_size=0)
  with pytest.raises(ValueError, match='min_size'):
    so.quantize_moments(optax.scale_by_adam(), min_size=-1)
