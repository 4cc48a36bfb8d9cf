"""Activation whitening for Sub-MoE's joint SVD (SVD-LLM style).

Wang et al., `SVD-LLM: Truncation-aware Singular Value Decomposition for Large
Language Model Compression <https://arxiv.org/abs/2403.07378>`_, 2024: with
calibration inputs ``X`` and ``XᵀX = SSᵀ`` (Cholesky), ``XS^{-ᵀ}`` has
orthonormal columns, so ``||X(W' - W)||_F = ||Sᵀ(W' - W)||_F`` and truncating
the SVD of ``SᵀW`` is the truncation that is optimal on the calibration
inputs. :func:`~subspace_optax.merging.merge_group` applies it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def finite(name: str, x) -> None:
  """Raise a ``ValueError`` naming ``name`` if ``x`` holds NaN or inf."""
  bad = int(np.sum(~np.isfinite(np.asarray(x, np.float64))))
  if bad:
    raise ValueError(
        f'{name} holds {bad} non-finite value(s) (NaN or inf); whiten with '
        'finite calibration inputs only.')


def input_cholesky(inputs: jax.Array, ridge: float = 1e-5) -> jax.Array:
  """Lower Cholesky factors ``S`` of ``XᵀX + λI``, ``λ = ridge · tr(XᵀX)/m``.

  The whitening of :func:`~subspace_optax.merging.merge_group`; the small
  ridge keeps ``S`` invertible when the calibration inputs do not span every
  input direction (fewer tokens than ``m``, dead units).

  Args:
    inputs: ``(..., N, m)`` calibration inputs of a weight (leading axes: one
      set per expert).
    ridge: ``λ`` relative to the mean eigenvalue of ``XᵀX``.

  Returns:
    ``(..., m, m)`` lower-triangular factors (float32 or wider).

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> import subspace_optax as so
    >>> x = jax.random.normal(jax.random.key(0), (32, 4))
    >>> s = so.merging.input_cholesky(x, ridge=0.0)
    >>> bool(jnp.allclose(s @ s.T, x.T @ x, rtol=1e-4, atol=1e-3))
    True
  """
  x = inputs.astype(jnp.promote_types(inputs.dtype, jnp.float32))
  gram = jnp.einsum('...na,...nb->...ab', x, x,
                    precision=jax.lax.Precision.HIGHEST)
  m = gram.shape[-1]
  scale = jnp.trace(gram, axis1=-2, axis2=-1)[..., None, None] / m
  gram = gram + ridge * jnp.where(scale > 0, scale, 1.0) * jnp.eye(m)
  return jnp.linalg.cholesky(gram)


def cholesky_factors(experts, whiten, e: int) -> dict:
  """``{name: (E, m, m)}`` Cholesky factors of each whitened weight's inputs.

  Raises:
    ValueError: a name that is not an expert weight, inputs that are not
      ``(N, m)`` or ``(E, N, m)``, or non-finite inputs.
  """
  unknown = sorted(set(whiten) - set(experts))
  if unknown:
    raise ValueError(
        f'whiten names {unknown} are not experts {sorted(experts)}.')
  factors = {}
  for name, x in whiten.items():
    m = jnp.shape(experts[name])[1]
    shape = tuple(jnp.shape(x))
    if not (len(shape) == 2 or len(shape) == 3 and shape[0] == e) or (
        shape[-1] != m or shape[-2] < 1):
      raise ValueError(
          f'whiten[{name!r}] must be the calibration inputs of that weight, '
          f'(N, m) shared by all experts or (E, N, m) one set per expert, with '
          f'm={m} its input size and E={e}; got {shape}.')
    finite(f'whiten[{name!r}]', x)
    factor = jnp.broadcast_to(input_cholesky(jnp.asarray(x)), (e, m, m))
    finite(f'the Cholesky factor of whiten[{name!r}]', factor)
    factors[name] = factor
  return factors
