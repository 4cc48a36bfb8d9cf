"""Bases stored in 4 or 8 bits (Q-GaLore), dequantised on use."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from subspace_optax._src.bases import base as bases_lib
from subspace_optax._src.bases import registry
from subspace_optax._src.transforms import quantize as quantize_lib


def quantized(
    basis: str | bases_lib.BasisMethod = 'svd', bits: int = 8,
    group_size: int = 256,
) -> bases_lib.BasisMethod:
  """A dense basis stored in ``bits``-bit codes and dequantised on use.

  Q-GaLore's projection storage (arXiv 2407.08296, §3.2): after each refresh of
  the wrapped method the ``k x r`` basis is quantized with :func:`quantize`
  (round to nearest, groups of ``group_size`` rows per column); ``project``,
  ``unproject`` and ``transition`` use the dequantised matrix. The state is
  ``k r`` bytes (8 bits) or ``k ceil(r/2)`` bytes (4 bits, packed two per byte;
  the reference keeps one 4-bit code per byte) plus a float32 scale and a uint8
  zero point per group. Signs of a refreshed basis are aligned against the
  dequantised old one.

  Args:
    basis: a method whose state is the dense ``k x r`` matrix (``'svd'``,
      ``'randomized'``, ``'random_orthonormal'``, ...).
    bits: 8 or 4.
    group_size: rows per quantization group (Q-GaLore: 256 entries).

  Returns:
    A :class:`BasisMethod`, for ``basis=`` of :func:`subspace_optax.low_rank`
    and the presets. whose state is :class:`~subspace_optax.QuantizedMatrix`
    codes.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import subspace_optax as so
    >>> method = so.bases.quantized('svd', bits=4, group_size=4)
    >>> tx = so.low_rank(optax.scale_by_adam(), rank=2, basis=method)
    >>> params = {'w': jnp.ones((8, 6))}
    >>> updates, state = tx.update(params, tx.init(params))
    >>> type(state.basis['w']).__name__
    'QuantizedMatrix'
  """
  quantize_lib._check_bits(bits)
  method = registry.resolve(basis)

  def pack(dense) -> quantize_lib.QuantizedMatrix:
    return quantize_lib.quantize(dense, bits, group_size)

  def unpack(state: quantize_lib.QuantizedMatrix) -> jax.Array:
    return quantize_lib.dequantize(state, bits, group_size)

  def init(k: int, l: int, rank: int) -> quantize_lib.QuantizedMatrix:
    dense = method.init(k, l, rank)
    if not isinstance(dense, jax.Array) or dense.ndim != 2:
      raise ValueError(
          f'quantized() wraps bases whose state is a dense k x rank matrix; '
          f'{method.name!r} has state {jax.tree.map(jnp.shape, dense)}.')
    return pack(dense)

  def wrap_refresh(refresh):
    return lambda g, old, key, align: pack(refresh(g, unpack(old), key, align))

  transition = None
  if method.transition is not None:
    transition = lambda old, new: method.transition(unpack(old), unpack(new))
  fields = dict(
      name=f'quantized_{method.name}_{bits}bit', init=init,
      refresh=wrap_refresh(method.refresh),
      project=lambda g, state: method.project(g, unpack(state)),
      unproject=lambda c, state: method.unproject(c, unpack(state)),
      transition=transition)
  if getattr(method, 'first_refresh', None) is not None:
    fields['first_refresh'] = wrap_refresh(method.first_refresh)
  return method._replace(**fields)


