"""8-bit optimizer moments: block-wise dynamic quantization around any optax state.

Dettmers, Lewis, Shleifer & Zettlemoyer, `8-bit Optimizers via Block-wise
Quantization <https://arxiv.org/abs/2110.02861>`_, ICLR 2022. Each moment
leaf is cut into blocks of ``b`` consecutive entries along its last axis; a
block is stored as one float32 scale ``a = max |x|`` and one byte per entry,
the index of the nearest value of a fixed 8-bit codebook to ``x / a``:

.. math::
  \\hat x = a \\cdot \\mathrm{book}[\\mathrm{code}],\\qquad
  \\mathrm{code} = \\arg\\min_i |x / a - \\mathrm{book}[i]|.

The codebook is the paper's *dynamic tree* map (§2.3): after an optional sign
bit, the number ``E`` of leading zero bits gives the decade ``10^{-E}``, the
first one bit is an indicator, and the remaining ``f`` bits a linear fraction
in ``[0.1, 1]``:

.. math::
  \\mathrm{value} = ±10^{-E}\\,\\Big(0.1 + 0.9\\,\\frac{j + 1/2}{2^f}\\Big),

so the codes cover 7 (signed) or 8 (unsigned) decades below the block's
maximum, with relative steps of ``0.9 / (0.1 · 2^f)``: ``2^f`` codes in the
top decade, half as many in each lower one. The largest value is set to exactly 1, so the entry that
sets a block's scale round-trips exactly, and 0 is a code (a zero moment stays
exactly zero). First moments (``mu``, ``trace``, ``momentum`` of the moments
table) use the signed map; second moments (``nu``) are non-negative and span
many decades, so they use the unsigned map with its 8th decade. A linear
absmax map would round every ``v < a / 510`` of a block to 0, and Adam would
then divide by ``sqrt(0) + ε``: a step ``1/ε`` times too large; the dynamic
map keeps every ``v`` above ``3·10⁻⁸ a`` non-zero, to within 3.5 % of ``v`` in
the top decade and ``4.5 / 2^{7-E}`` in decade ``E`` (bitsandbytes' 8-bit
Adam stores ``v`` the same way).

Rounding is to the nearest code (deterministic: a resumed run is bit-exact).
Blocks are ``b = gcd(block_size, n)`` entries of the last axis (``n``), so no
padding is needed and the codes have the moment's shape and sharding; blocks
stay on one device whenever the per-device part of the last axis is a multiple
of ``b``. Leaves with fewer than ``min_size`` entries (bitsandbytes' default
4096) or blocks shorter than 32 entries stay float32, as in bitsandbytes.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec
import numpy as np
import optax

from subspace_optax._src import utils
from subspace_optax._src.pipeline import sharding
from subspace_optax._src.transforms import moments as moments_lib

MIN_BLOCK = 32


class QuantizedMoment(NamedTuple):
  """A moment stored in 8 bits.

  Attributes:
    codes: the moment's shape; int8 ``±(1 + index)`` of the signed map (first
      moments), uint8 index of the unsigned map (second moments).
    scale: float32 ``(*shape[:-1], n // b)``: each block's ``max |x|``.
  """

  codes: jax.Array
  scale: jax.Array


def dynamic_magnitudes(signed: bool) -> np.ndarray:
  """The non-negative values of the dynamic tree map, ascending, 0 first.

  128 values (0 and 127 magnitudes, 7 bits after the sign) when ``signed``,
  256 otherwise.
  """
  bits = 7 if signed else 8
  values = [np.zeros(1)]
  for fraction_bits in range(bits):  # ascending: most zero bits first
    decade = 10.0**-(bits - 1 - fraction_bits)
    edges = np.linspace(0.1, 1.0, 2**fraction_bits + 1)
    values.append((edges[:-1] + edges[1:]) / 2 * decade)
  magnitudes = np.concatenate(values)
  magnitudes[-1] = 1.0
  return magnitudes.astype(np.float32)


def _by_decade(fraction_bits: jax.Array, values) -> jax.Array:
  """``values[fraction_bits]`` for a short list of constants, by selects.

  Elementwise (a table lookup would be a gather, which an explicitly sharded
  array does not support), and cheap enough for XLA to fuse wherever it is
  used (``jnp.power``/``jnp.exp2`` are not: XLA:CPU materialises them, one
  float32 buffer the size of the moment each).
  """
  out = jnp.full(fraction_bits.shape, values[0], jnp.float32)
  for k, value in enumerate(values[1:], 1):
    out = jnp.where(fraction_bits == k, jnp.float32(value), out)
  return out


def _decades(bits: int) -> list[float]:
  """``10^{-E}`` of the values with ``f = 0 .. bits - 1`` fraction bits."""
  return [float(np.float32(10.0**-(bits - 1 - f))) for f in range(bits)]


def _inverse_power_of_two(exponent: jax.Array) -> jax.Array:
  """``2^{-exponent}`` exactly (float32 bits), for ``0 <= exponent < 127``."""
  return jax.lax.bitcast_convert_type(
      ((127 - exponent) << 23).astype(jnp.int32), jnp.float32)


def _decode_magnitude(index: jax.Array, signed: bool) -> jax.Array:
  """``dynamic_magnitudes(signed)[index]`` from the bits (no table gather).

  The indicator bit gives ``f``, the number of fraction bits, and the decade
  ``10^{f - bits + 1}``; the bits below it give the position ``j``.
  """
  bits = 7 if signed else 8
  index = index.astype(jnp.int32)
  fraction_bits = 31 - jax.lax.clz(jnp.maximum(index, 1))  # the indicator bit
  position = (index - (1 << fraction_bits)).astype(jnp.float32)
  value = _by_decade(fraction_bits, _decades(bits)) * (
      0.1 + 0.9 * (position + 0.5) * _inverse_power_of_two(fraction_bits))
  value = jnp.where(index == 2**bits - 1, 1.0, value)
  return jnp.where(index == 0, 0.0, value)


def _nearest_magnitude(y: jax.Array, signed: bool) -> jax.Array:
  """Index of the nearest magnitude to ``y`` in ``[0, 1]`` (int32).

  Exactly the number of midpoints ``(m[i-1] + m[i]) / 2`` of the decoded
  magnitudes below ``y``. The decade of ``y`` (compares with the constants
  ``10^{-E}``) and the linear position inside it give a candidate index
  ``c`` within one of the answer; comparing ``y`` with the two midpoints
  around ``c`` corrects it. Elementwise work only, three decodes: XLA fuses
  it into one loop over ``y``. (Comparing ``y`` with all 255 midpoints at
  once builds an ``(entries, 255)`` array that XLA:CPU materialises, 2.5 TB
  for a LLaMA-7B step; a table lookup is a gather, which an explicitly
  sharded ``y`` does not support.) NaN gives 0.
  """
  bits = 7 if signed else 8
  last = 2**bits - 1  # the number of midpoints, and the largest index
  y = jnp.where(y > 0, jnp.minimum(y, 1.0), 0.0)  # NaN -> 0
  fraction_bits = jnp.zeros_like(y, jnp.int32)  # y's sharding
  for f in range(1, bits):  # decade f starts at 10^{f - bits}
    fraction_bits = fraction_bits + (y >= np.float32(10.0**(f - bits))).astype(
        jnp.int32)
  width = 1 << fraction_bits
  position = (y / _by_decade(fraction_bits, _decades(bits)) - 0.1) / 0.9 * (
      width.astype(jnp.float32)) - 0.5
  position = jnp.clip(jnp.round(position), 0, width - 1).astype(jnp.int32)
  candidate = width + position
  lower, value, upper = (
      _decode_magnitude(i, signed) for i in (
          jnp.maximum(candidate - 1, 0), candidate,
          jnp.minimum(candidate + 1, last)))
  below, above = (lower + value) / 2, (value + upper) / 2
  return (candidate + ((candidate < last) & (above < y)).astype(jnp.int32)
          - ((candidate > 0) & ~(below < y)).astype(jnp.int32))


def block_length(shape: tuple[int, ...], block_size: int) -> int:
  """Entries per block along the last axis: ``gcd(block_size, n)``."""
  return math.gcd(block_size, shape[-1])


def _axis_size(mesh, axis) -> int:
  names = axis if isinstance(axis, tuple) else (axis,)
  return math.prod(mesh.shape[a] for a in names)


def _reshape(x: jax.Array, shape: tuple[int, ...], spec) -> jax.Array:
  if spec is None:
    return x.reshape(shape)
  return jax.lax.reshape(x, shape, out_sharding=NamedSharding(
      jax.typeof(x).sharding.mesh, PartitionSpec(*spec)))


def _block_specs(x: jax.Array, block: int):
  """``(x, blocked spec, scale spec)``: where blocks and scales live.

  A sharded last axis keeps its mesh axis on the block index when the blocks
  divide the devices' parts, else on the entries within a block (the block's
  max is then reduced across devices), else it is gathered.
  """
  spec = sharding.explicit_spec(x)
  if spec is None:
    return x, None, None
  *lead, last = spec
  lead = tuple(lead)
  if last is None:
    return x, lead + (None, None), lead + (None,)
  devices = _axis_size(jax.typeof(x).sharding.mesh, last)
  if (x.shape[-1] // block) % devices == 0:
    return x, lead + (last, None), lead + (last,)
  if block % devices == 0:
    return x, lead + (None, last), lead + (None,)
  x = jax.sharding.reshard(x, NamedSharding(
      jax.typeof(x).sharding.mesh, PartitionSpec(*lead, None)))
  return x, lead + (None, None), lead + (None,)


@utils.compiled('signed', 'block_size')
def quantize_moment(
    x: jax.Array, signed: bool, block_size: int = 256
) -> QuantizedMoment:
  """``x`` in 8-bit dynamic codes with one float32 ``max |x|`` per block."""
  shape = x.shape
  block = block_length(shape, block_size)
  spec = sharding.explicit_spec(x)
  x, blocked_spec, _ = _block_specs(x.astype(jnp.float32), block)
  blocks = _reshape(
      x, shape[:-1] + (shape[-1] // block, block), blocked_spec)
  scale = jnp.max(jnp.abs(blocks), axis=-1)
  y = blocks / jnp.where(scale > 0, scale, 1.0)[..., None]
  if signed:
    index = _nearest_magnitude(jnp.abs(y), True)
    codes = jnp.where(y < 0, -index, index).astype(jnp.int8)
  else:
    codes = _nearest_magnitude(jnp.maximum(y, 0.0), False).astype(jnp.uint8)
  return QuantizedMoment(_reshape(codes, shape, spec), scale)


@utils.compiled()
def dequantize_moment(q: QuantizedMoment) -> jax.Array:
  """The float32 moment ``scale · book[codes]`` of :func:`quantize_moment`."""
  shape = q.codes.shape
  block = shape[-1] // q.scale.shape[-1]
  signed = q.codes.dtype == jnp.int8
  spec = sharding.explicit_spec(q.codes)
  codes, blocked_spec, _ = _block_specs(q.codes, block)
  codes = _reshape(codes, shape[:-1] + (shape[-1] // block, block),
                   blocked_spec)
  index = codes.astype(jnp.int32)
  value = _decode_magnitude(jnp.abs(index), signed)
  if signed:
    value = jnp.where(index < 0, -value, value)
  return _reshape(value * q.scale[..., None], shape, spec)


def _quantizable_shape(shape, block_size: int, min_size: int) -> bool:
  return (bool(shape) and math.prod(shape) >= min_size
          and block_length(shape, block_size) >= min(block_size, MIN_BLOCK))


def _quantizable(x, block_size: int, min_size: int) -> bool:
  return jnp.issubdtype(x.dtype, jnp.floating) and _quantizable_shape(
      jnp.shape(x), block_size, min_size)


def moment_bytes(
    shape: tuple[int, ...], block_size: int = 256, min_size: int = 4096
) -> int:
  """Bytes of one float32 moment of ``shape`` under :func:`quantize_moments`:
  ``|x| + 4 |x| / b`` (codes and scales) if quantized, else ``4 |x|``."""
  size = math.prod(shape)
  if not _quantizable_shape(tuple(shape), block_size, min_size):
    return 4 * size
  return size + 4 * (size // block_length(tuple(shape), block_size))


def _requantize_like(old: QuantizedMoment, value: jax.Array) -> QuantizedMoment:
  block = old.codes.shape[-1] // old.scale.shape[-1]
  return quantize_moment(value, old.codes.dtype == jnp.int8, block)


moments_lib.register_encoding(
    QuantizedMoment, dequantize_moment, _requantize_like)


class QuantizeMomentsState(NamedTuple):
  # The inner state, its moment leaves stored as QuantizedMoment.
  inner_state: optax.OptState


def quantize_moments(
    inner: optax.GradientTransformation,
    *,
    block_size: int = 256,
    min_size: int = 4096,
) -> optax.GradientTransformationExtraArgs:
  """Store the moments of ``inner``'s state in 8 bits (block-wise dynamic map).

  Dettmers et al., `8-bit Optimizers via Block-wise Quantization
  <https://arxiv.org/abs/2110.02861>`_, 2022 (see the module docstring for
  the format). The moment fields of any optax state (Adam's ``mu``/``nu``,
  Lion's ``mu``, ``optax.trace``'s ``trace``; the moments table of
  ``subspace_optax``) are kept as int8/uint8 codes plus one float32 scale per
  block; every update dequantizes them, runs ``inner.update``, and quantizes
  the new moments:

  .. math::
    (u, s') = inner(g, \\mathrm{deq}(s)),\\qquad s \\leftarrow \\mathrm{quant}(s').

  Works as a plain optax transform and inside
  :func:`~subspace_optax.low_rank` (the moments then have the low-rank
  shape; ``on_refresh='reset'``/``'transport'`` act on the dequantized
  moments). State: 1 byte per moment entry plus 4 bytes per block, i.e.
  ``1 + 4/b`` bytes instead of 4 (``≈ 0.27×`` float32 at ``b = 256``).

  Args:
    inner: any optax transformation whose moment fields follow the table.
    block_size: entries per block along the last axis (a leaf's blocks are
      ``gcd(block_size, n)`` long).
    min_size: leaves with fewer entries stay float32 (bitsandbytes: 4096).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with ``inner``'s state, moments
    encoded.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import subspace_optax as so
    >>> tx = so.quantize_moments(optax.scale_by_adam(), min_size=256)
    >>> params = jnp.ones((4, 256))
    >>> updates, state = tx.update(params, tx.init(params))
    >>> state[0].mu.codes.dtype  # int8 codes for the signed first moment
    dtype('int8')
  """
  if isinstance(block_size, bool) or not isinstance(block_size, int) or (
      block_size <= 0):
    raise ValueError(
        f'`block_size` must be a positive Python int, got {block_size!r}.')
  if isinstance(min_size, bool) or not isinstance(min_size, int) or (
      min_size < 0):
    raise ValueError(
        f'`min_size` must be a Python int >= 0, got {min_size!r}.')
  inner = optax.with_extra_args_support(inner)

  def encode(name, subtree):
    signed = name not in moments_lib.SECOND_MOMENTS
    return jax.tree.map(
        lambda x: quantize_moment(x, signed, block_size)
        if _quantizable(x, block_size, min_size) else x, subtree)

  def decode(name, subtree):
    del name
    return jax.tree.map(moments_lib.decode, subtree,
                        is_leaf=moments_lib.is_encoded)

  def init_fn(params):
    return QuantizeMomentsState(
        moments_lib.map_moment_fields(inner.init(params), encode))

  def update_fn(updates, state, params=None, **extra_args):
    inner_state = moments_lib.map_moment_fields(state.inner_state, decode)
    updates, inner_state = inner.update(
        updates, inner_state, params, **extra_args)
    return updates, QuantizeMomentsState(
        moments_lib.map_moment_fields(inner_state, encode))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
