"""Group-wise quantization (Q-GaLore) and the quantized basis wrapper."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import spectra
import subspace_optax as so
from subspace_optax import bases


def _matrix(shape=(21, 5), seed=0):
  return spectra.normal(shape, seed)


def _group_ranges(x, group_size):
  """Per-entry ``(max(x_max, 0) - min(x_min, 0))`` of its group, numpy."""
  x = np.asarray(x, np.float64)
  out = np.empty_like(x)
  for start in range(0, x.shape[0], group_size):
    block = x[start:start + group_size]
    out[start:start + group_size] = (np.maximum(block.max(0), 0)
                                     - np.minimum(block.min(0), 0))
  return out


@pytest.mark.parametrize('bits', [4, 8])
@pytest.mark.parametrize('group_size', [4, 7, 256])
@pytest.mark.parametrize('columns', [5, 6])
def test_round_trip_error_is_at_most_half_a_step(bits, group_size, columns):
  x = _matrix((21, columns))
  q = so.quantize(x, bits, group_size)
  levels = 2**bits - 1
  groups = -(-21 // group_size)
  assert q.scale.shape == q.zero.shape == (groups, columns)
  assert q.codes.dtype == jnp.uint8
  assert q.codes.shape == (21, columns if bits == 8 else -(-columns // 2))
  step = _group_ranges(x, group_size) / levels
  # The stored step is exactly each group's range / (2^b - 1).
  np.testing.assert_allclose(
      np.repeat(np.asarray(q.scale), group_size, axis=0)[:21], step, rtol=1e-6)
  error = np.abs(np.asarray(so.dequantize(q, bits, group_size)) - np.asarray(x))
  assert np.all(error <= step / 2 * (1 + 1e-5) + 1e-7), error.max()
  # Not trivially small either: rounding to 2^b levels loses information.
  assert error.max() > step.max() / 20


def test_int4_codes_pack_two_per_byte_and_round_trip_exactly():
  """Values on the 4-bit grid survive quantize -> pack -> unpack exactly."""
  rng = np.random.default_rng(0)
  codes = rng.integers(0, 16, size=(8, 5))
  codes[0] = 0
  codes[1] = 15  # every column spans the whole grid
  step = 0.5
  x = (codes - 6) * step  # zero point 6: the range [-3, 4.5] contains 0
  q = so.quantize(jnp.asarray(x, jnp.float32), 4, 8)
  np.testing.assert_array_equal(q.zero, 6)
  np.testing.assert_allclose(q.scale, step, rtol=1e-6)
  packed = np.asarray(q.codes)
  assert packed.shape == (8, 3)
  np.testing.assert_array_equal(packed[:, :2] & 15, codes[:, 0:4:2])
  np.testing.assert_array_equal(packed[:, :2] >> 4, codes[:, 1:4:2])
  # The odd last column sits alone in a low nibble.
  np.testing.assert_array_equal(packed[:, 2], codes[:, 4])
  np.testing.assert_allclose(so.dequantize(q, 4, 8), x, atol=1e-6)


@pytest.mark.parametrize('bits', [4, 8])
def test_stochastic_rounding_in_quantize_is_unbiased(bits):
  x = _matrix((16, 4))
  keys = jax.random.split(jax.random.key(0), 400)
  draws = jax.vmap(
      lambda k: so.dequantize(so.quantize(x, bits, 16, k), bits, 16))(keys)
  step = _group_ranges(x, 16) / (2**bits - 1)
  mean_error = np.abs(np.asarray(draws.mean(0)) - np.asarray(x))
  # Unbiased wherever x is on the code grid's span [-z s, (2^b - 1 - z) s]. The
  # zero point z is rounded, so up to half a step at either end of a group's
  # range lies outside it and is clipped (biased): those entries are excluded.
  q = so.quantize(x, bits, 16)
  scale, zero = np.asarray(q.scale), np.asarray(q.zero, np.float64)
  low, high = -zero * scale, (2**bits - 1 - zero) * scale
  inside = (np.asarray(x) > low) & (np.asarray(x) < high)
  assert inside.mean() > 0.8
  assert np.all(mean_error[inside] < 5 * step[inside] / 2 / np.sqrt(400))
  # Not a deterministic rounding in disguise: draws differ.
  assert np.any(np.asarray(draws[0]) != np.asarray(draws[1]))


@pytest.mark.parametrize('bits', [4, 8])
def test_quantized_basis_spans_the_same_subspace(bits):
  """A quantized SVD basis is the SVD basis up to the quantization error."""
  k, l, rank, group = 24, 10, 3, 8
  g, u, _ = spectra.known_spectrum(k, l, spectra.gapped_sigma(rank, l))
  g = jnp.asarray(g, jnp.float32)
  plain = bases.svd()
  method = bases.quantized('svd', bits, group)
  key = jax.random.key(0)
  exact = plain.refresh(g, plain.init(k, l, rank), key, True)
  state = method.refresh(g, method.init(k, l, rank), key, True)
  assert isinstance(state, so.QuantizedMatrix)
  dense = np.asarray(so.dequantize(state, bits, group), np.float64)
  step = _group_ranges(exact, group) / (2**bits - 1)
  # Entry by entry within half a step of the exact (sign-aligned) basis ...
  assert np.all(np.abs(dense - np.asarray(exact)) <= step / 2 + 1e-6)
  # ... so its span is the top subspace up to ‖ΔQ‖_F.
  bound = np.linalg.norm(step / 2) * 2
  assert spectra.distance(np.linalg.qr(dense)[0], u[:, :rank]) < bound
  assert bound < (0.5 if bits == 4 else 0.03)
  c = method.project(g, state)
  np.testing.assert_allclose(c, dense.T @ np.asarray(g), rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(method.unproject(c, state), dense @ np.asarray(c),
                             rtol=1e-5, atol=1e-4)
  other = method.refresh(-g, state, key, True)
  np.testing.assert_allclose(
      method.transition(state, other),
      np.asarray(so.dequantize(other, bits, group)).T @ dense, atol=1e-5)
