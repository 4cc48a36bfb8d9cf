"""Matrices with a known spectrum and subspace distances, for the basis tests.

Not a test module: shared helpers of ``spectrum_test``, ``bases_test``,
``quantize_test`` and ``transport_test``.
"""

from __future__ import annotations

from typing import Sequence

import jax.numpy as jnp
import numpy as np


def normal(shape, seed: int) -> jnp.ndarray:
  """A reproducible float32 standard normal array (a generic gradient)."""
  rng = np.random.default_rng(seed)
  return jnp.asarray(rng.normal(size=shape), jnp.float32)


def orthonormal(rows: int, columns: int, seed: int) -> np.ndarray:
  """A ``rows x columns`` matrix with orthonormal columns (float64)."""
  q, r = np.linalg.qr(np.random.default_rng(seed).normal(size=(rows, columns)))
  return q * np.sign(np.diag(r))


def known_spectrum(
    k: int, l: int, sigma: Sequence[float], seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """``(G, U, σ)``: ``G = U diag(σ) Vᵀ`` (float64), ``σ`` descending."""
  sigma = np.asarray(sigma, np.float64)
  u = orthonormal(k, len(sigma), seed)
  v = orthonormal(l, len(sigma), seed + 1)
  return (u * sigma) @ v.T, u, sigma


def gapped_sigma(rank: int, size: int) -> np.ndarray:
  """``rank`` large singular values (10, 9, ...) then a tail of at most 1e-2."""
  top = 10.0 - np.arange(rank)
  tail = 1e-2 * 0.8 ** np.arange(size - rank)
  return np.concatenate([top, tail])


def distance(q, u) -> float:
  """``‖(I - QQᵀ) U‖₂``: sine of the largest principal angle from ``span(U)`` to
  ``span(Q)`` (``Q`` orthonormal; 0 when ``span(U) ⊆ span(Q)``, 1 when some
  direction of ``U`` is orthogonal to ``Q``)."""
  q, u = np.asarray(q, np.float64), np.asarray(u, np.float64)
  return float(np.linalg.norm(u - q @ (q.T @ u), 2))


def orthonormality_error(q) -> float:
  """``max |QᵀQ - I|``."""
  q = np.asarray(q, np.float64)
  return float(np.abs(q.T @ q - np.eye(q.shape[1])).max())
