"""Balanced re-factorization of a low-rank weight ``W = BA``."""

from __future__ import annotations

import jax
import jax.numpy as jnp

_HIGHEST = jax.lax.Precision.HIGHEST


def refactorize(b: jax.Array, a: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Rebalance the factors of ``W = BA`` without changing ``W``.

  Glentis et al., `Scalable Parameter and Memory Efficient Pretraining for LLM:
  Recipes and Insights <https://arxiv.org/abs/2505.22922>`_, 2025 ("weight
  refactorization", every 200 steps, with momentum reset): with the SVD
  ``BA = UΣVᵀ``,

  .. math::
    B' = U\\sqrt{Σ},\\qquad A' = \\sqrt{Σ}\\,Vᵀ,\\qquad B'A' = BA,\\qquad
    B'ᵀB' = A'A'ᵀ = Σ.

  The balanced split gives the best-conditioned Hessian of the factorization
  (their lemma). The ``m x n`` product is never formed: with ``B = Q_B R_B``
  and ``Aᵀ = Q_A R_A``, ``BA = Q_B (R_B R_Aᵀ) Q_Aᵀ`` and only the ``r x r``
  core is decomposed, ``R_B R_Aᵀ = U_r Σ V_rᵀ``, so ``U = Q_B U_r``,
  ``V = Q_A V_r``. Cost ``O((m + n) r²)``.

  Leading axes are batch axes (stacked layers). Computed in float32 and cast
  back to the input dtypes. Use it on the params between optimizer steps (it is
  a re-parametrization, not a gradient transform); the optimizer moments of
  ``B`` and ``A`` no longer match the new factors, so reset them too
  (:func:`subspace_optax.reset_moments`), as the paper does.

  Args:
    b: ``(..., m, r)`` left factor.
    a: ``(..., r, n)`` right factor.

  Returns:
    ``(b', a')`` with the shapes and dtypes of ``(b, a)``.

  Examples:
    >>> import jax.numpy as jnp
    >>> import subspace_optax as so
    >>> b, a = jnp.array([[2.0], [0.0]]), jnp.array([[1.0, 0.0, 0.0]]) / 2
    >>> b2, a2 = so.refactorize(b, a)
    >>> bool(jnp.allclose(b2 @ a2, b @ a, atol=1e-6))  # same product
    True
    >>> bool(jnp.allclose(b2.T @ b2, a2 @ a2.T, atol=1e-6))  # balanced
    True
  """
  if b.shape[-1] != a.shape[-2] or b.shape[:-2] != a.shape[:-2]:
    raise ValueError(
        f'Factors of shapes {b.shape} and {a.shape} do not form W = BA; give '
        '(..., m, r) and (..., r, n) with the same leading axes.')
  b32 = b.astype(jnp.float32)
  a32 = a.astype(jnp.float32)
  q_b, r_b = jnp.linalg.qr(b32)
  q_a, r_a = jnp.linalg.qr(jnp.swapaxes(a32, -1, -2))
  core = jnp.matmul(r_b, jnp.swapaxes(r_a, -1, -2), precision=_HIGHEST)
  u_r, sigma, vt_r = jnp.linalg.svd(core, full_matrices=False)
  root = jnp.sqrt(sigma)
  u = jnp.matmul(q_b, u_r, precision=_HIGHEST)
  vt = jnp.matmul(vt_r, jnp.swapaxes(q_a, -1, -2), precision=_HIGHEST)
  new_b = u * root[..., None, :]
  new_a = root[..., :, None] * vt
  missing = b.shape[-1] - sigma.shape[-1]  # r > min(m, n): zero extra factors
  if missing:
    pad = [(0, 0)] * (b.ndim - 1)
    new_b = jnp.pad(new_b, pad + [(0, missing)])
    new_a = jnp.pad(new_a, pad[:-1] + [(0, missing), (0, 0)])
  return new_b.astype(b.dtype), new_a.astype(a.dtype)
