"""Group-wise integer quantization of matrices and stochastic rounding.

Q-GaLore (Zhang et al., `Q-GaLore: Quantized GaLore with INT4 Projection and
Layer-Adaptive Low-Rank Gradients <https://arxiv.org/abs/2407.08296>`_, 2024)
stores the projection matrix in 4 bits and the weights in 8 bits with
asymmetric min-max quantization per group of entries, with ``x_min`` and
``x_max`` the group's extremes:

.. math::
  s = \\frac{\\max(x_{max} - x_{min},\\ 10^{-5})}{2^b - 1},\\quad
  z = -round(x_{min}/s),\\quad
  q = clip(round(x/s) + z,\\ 0,\\ 2^b-1),\\quad
  \\hat x = (q - z)\\, s.

Here the range ``[x_min, x_max]`` is widened to contain 0, so ``z`` is an exact
code in ``[0, 2^b - 1]`` and every entry is in range; the reference clips ``z``
instead, which cuts off groups whose entries all have one sign. The two agree
whenever a group's range contains 0, as it does for basis columns.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from subspace_optax._src import utils
from subspace_optax._src.pipeline import sharding

BITS = (4, 8)


class QuantizedMatrix(NamedTuple):
  """A ``k x c`` matrix in ``bits``-bit codes, groups of rows per column.

  Attributes:
    codes: uint8; ``(k, c)`` for 8 bits, ``(k, ceil(c / 2))`` for 4 bits (two
      codes per byte: column ``2j`` in the low nibble, ``2j + 1`` in the high).
    scale: float32 ``(ceil(k / group_size), c)``: step of each group (a group is
      ``group_size`` consecutive rows of one column).
    zero: uint8 ``(ceil(k / group_size), c)``: zero point of each group.
  """

  codes: jax.Array
  scale: jax.Array
  zero: jax.Array


def _check_bits(bits: int) -> None:
  if bits not in BITS:
    raise ValueError(f'`bits` must be one of {BITS}, got {bits!r}.')


def _groups(x: jax.Array, group_size: int) -> jax.Array:
  """``(k, c)`` -> ``(ceil(k / g), g, c)``, the last group padded with its edge."""
  k = x.shape[0]
  num = -(-k // group_size)
  pad = num * group_size - k
  if pad:
    x = jnp.pad(x, ((0, pad), (0, 0)), mode='edge')
  return x.reshape(num, group_size, x.shape[1])


def _ungroup(x: jax.Array, group_size: int, k: int) -> jax.Array:
  """Repeat ``(ceil(k / g), c)`` group values to ``(k, c)``."""
  return jnp.repeat(x, group_size, axis=0,
                    total_repeat_length=x.shape[0] * group_size)[:k]


def quantize(
    x: jax.Array, bits: int = 8, group_size: int = 256,
    key: Optional[jax.Array] = None,
) -> QuantizedMatrix:
  """Asymmetric min-max quantization of a ``(k, c)`` matrix (see module doc).

  Groups are ``group_size`` consecutive rows of one column (the reference
  groups 256 consecutive entries of the flattened matrix: same group size,
  different grouping). Rounding is to nearest, or stochastic (unbiased:
  ``E[\\hat x] = x`` inside the range) when a ``key`` is given, as Q-GaLore
  does for its INT8 weights.

  Args:
    x: a 2-D float array.
    bits: 8, or 4 (two codes packed per byte).
    group_size: rows per group; the last group of a column may be shorter.
    key: optional PRNG key for stochastic rounding.

  Returns:
    A :class:`QuantizedMatrix` (uint8 codes, float32 scales, uint8 zero
    points).

  Examples:
    >>> import jax.numpy as jnp
    >>> import subspace_optax as so
    >>> q = so.quantize(jnp.ones((8, 2)), bits=4, group_size=4)
    >>> q.codes.shape, q.codes.dtype  # two 4-bit codes per byte
    ((8, 1), dtype('uint8'))
  """
  _check_bits(bits)
  if x.ndim != 2:
    raise ValueError(f'quantize takes a 2-D matrix, got shape {x.shape}.')
  if group_size <= 0:
    raise ValueError(f'`group_size` must be positive, got {group_size}.')
  return _quantize(x, bits, group_size, key)


@utils.compiled('bits', 'group_size')
def _quantize(x, bits, group_size, key):
  k, c = x.shape
  x = x.astype(jnp.float32)
  # Group ranges from the whole matrix (a gather of the basis when sharded).
  grouped = _groups(sharding.replicate_matrix(x), group_size)
  # The range contains 0 (see the module docstring).
  top = jnp.maximum(jnp.max(grouped, axis=1), 0.0)
  bottom = jnp.minimum(jnp.min(grouped, axis=1), 0.0)
  levels = 2**bits - 1
  scale = jnp.maximum(top - bottom, 1e-5) / levels
  zero = jnp.clip(-jnp.round(bottom / scale), 0, levels)
  scaled = x / _ungroup(scale, group_size, k)
  if key is None:
    rounded = jnp.round(scaled)
  else:
    rounded = jnp.floor(scaled + jax.random.uniform(key, scaled.shape))
  codes = jnp.clip(rounded + _ungroup(zero, group_size, k), 0, levels).astype(
      jnp.uint8)
  if bits == 4:
    if c % 2:
      codes = jnp.pad(codes, ((0, 0), (0, 1)))
    codes = codes[:, 0::2] | (codes[:, 1::2] << 4)
  return QuantizedMatrix(codes, scale, zero.astype(jnp.uint8))


def dequantize(
    q: QuantizedMatrix, bits: int = 8, group_size: int = 256
) -> jax.Array:
  """The float32 ``(k, c)`` matrix ``(codes - zero) · scale``.

  ``bits`` and ``group_size`` must be those given to :func:`quantize` (they are
  not stored: static values, not arrays).

  Args:
    q: a :class:`QuantizedMatrix`.
    bits: the ``bits`` given to :func:`quantize`.
    group_size: the ``group_size`` given to :func:`quantize`.

  Returns:
    The float32 ``(k, c)`` matrix.

  Examples:
    >>> import jax.numpy as jnp
    >>> import subspace_optax as so
    >>> x = jnp.array([[0.0, 1.0], [0.5, 0.0]])  # each column's min and max
    >>> so.dequantize(so.quantize(x, bits=8, group_size=2), 8, 2)
    Array([[0. , 1. ],
           [0.5, 0. ]], dtype=float32)
  """
  _check_bits(bits)
  return _dequantize(q, bits, group_size)


@utils.compiled('bits', 'group_size')
def _dequantize(q, bits, group_size):
  k = q.codes.shape[0]
  c = q.scale.shape[1]
  codes = q.codes
  if bits == 4:
    codes = jnp.stack([codes & 15, codes >> 4], axis=-1).reshape(k, -1)[:, :c]
  zero = _ungroup(q.zero, group_size, k).astype(jnp.float32)
  return (codes.astype(jnp.float32) - zero) * _ungroup(q.scale, group_size, k)


def stochastic_round(
    x: jax.Array, dtype: jnp.dtype, key: jax.Array
) -> jax.Array:
  """Round ``x`` to ``dtype`` up or down at random, unbiased: ``E[round(x)] = x``.

  ``x`` goes to one of its two neighbours in ``dtype`` with probabilities
  proportional to the distance to the other one (Gupta et al., `Deep Learning
  with Limited Numerical Precision <https://arxiv.org/abs/1502.02551>`_, 2015),
  so small updates to low-precision weights are not all rounded away; Q-GaLore
  uses it for its INT8 weights. Float targets (bfloat16, float16, float8...)
  round to neighbouring representable values; integer targets to neighbouring
  integers, clipped to the type's range. Values already representable, and
  non-finite values, are returned as nearest rounding gives them.

  Args:
    x: float array.
    dtype: the target dtype.
    key: PRNG key.

  Returns:
    ``x`` rounded to ``dtype`` (an array of that dtype and ``x``'s shape).

  Examples:
    >>> import jax
    >>> import jax.numpy as jnp
    >>> import subspace_optax as so
    >>> x = jnp.full(1000, 0.25)
    >>> r = so.stochastic_round(x, jnp.int8, jax.random.key(0))
    >>> sorted(set(r.tolist()))  # 0 or 1, about a quarter of ones
    [0, 1]
  """
  return _stochastic_round(x, jnp.dtype(dtype), key)


@utils.compiled('dtype')
def _stochastic_round(x, dtype, key):
  x = jnp.asarray(x, jnp.float32)
  draw = jax.random.uniform(key, x.shape, jnp.float32)
  if jnp.issubdtype(dtype, jnp.integer):
    info = jnp.iinfo(dtype)
    low = jnp.floor(x)
    rounded = low + (draw < x - low).astype(jnp.float32)
    return jnp.clip(rounded, info.min, info.max).astype(dtype)
  nearest = x.astype(dtype)
  near = nearest.astype(jnp.float32)
  toward = jnp.where(near < x, jnp.inf, -jnp.inf).astype(dtype)
  other = jnp.nextafter(nearest, toward)
  gap = other.astype(jnp.float32) - near
  chance = jnp.where(gap != 0, (x - near) / jnp.where(gap != 0, gap, 1.0), 0.0)
  pick_other = (draw < chance) & jnp.isfinite(x) & jnp.isfinite(gap)
  return jnp.where(pick_other, other, nearest)
