"""I3S: singular directions sampled in proportion to their singular values."""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp

from subspace_optax._src.bases import base as bases_lib
from subspace_optax._src.bases import singular
from subspace_optax._src.pipeline import sharding


def gumbel_top_k(log_weights: jax.Array, k: int, key: jax.Array) -> jax.Array:
  """``k`` indices sampled without replacement with probability ∝ ``exp(log_weights)``.

  The Gumbel-top-k trick (Kool, van Hoof & Welling, `Stochastic Beams and Where
  to Find Them <https://arxiv.org/abs/1903.06059>`_, 2019): the ``k`` largest
  ``log w_i + Gumbel_i`` are a draw of successive sampling without replacement
  (the first index has probability ``w_i / Σ w``, the next one is drawn from the
  rest, ...). Indices are returned ascending.

  Args:
    log_weights: ``(..., d)`` log of the (unnormalised) weights.
    k: how many indices to draw (static).
    key: PRNG key.

  Returns:
    int32 indices ``(..., k)``, ascending, without repeats.

  Examples:
    >>> import jax
    >>> import jax.numpy as jnp
    >>> import subspace_optax as so
    >>> log_w = jnp.log(jnp.array([1.0, 1e-9, 1.0, 1e-9]))
    >>> so.bases.gumbel_top_k(log_w, 2, jax.random.key(0))
    Array([0, 2], dtype=int32)
  """
  noise = jax.random.gumbel(key, log_weights.shape, jnp.float32)
  _, top = jax.lax.top_k(log_weights + noise, k)
  return jnp.sort(top)


def importance_sampled(algorithm: Optional[Any] = None) -> bases_lib.BasisMethod:
  """``rank`` singular vectors sampled without replacement, probability ∝ ``σ_i``.

  Zhang et al., `Breaking the Frozen Subspace: Importance Sampling for
  Low-Rank Optimization in LLM Pretraining <https://arxiv.org/abs/2502.05790>`_
  (I3S), NeurIPS 2025. With ``G = UΣVᵀ`` (float32):

  .. math::
    ω_i = σ_i / \\textstyle\\sum_j σ_j,\\qquad
    I \\sim \\text{sample } r \\text{ of } \\{1..\\min(k,l)\\} \\text{ without
    replacement} \\propto ω,\\qquad Q = U_{:, I}.

  Top-``r`` SVD keeps re-selecting a dominant subspace that stops changing
  during pre-training; sampling lets the weaker directions in. The sample uses
  the refresh key (:func:`gumbel_top_k`), so it is deterministic given
  ``(seed, count)``. Columns stay in singular-value order. Cost: one SVD.

  Args:
    algorithm: optional ``jax.lax.linalg.SvdAlgorithm``; None uses JAX's default.

  Returns:
    A :class:`BasisMethod`, for ``basis=`` of :func:`subspace_optax.low_rank`
    and the presets.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import subspace_optax as so
    >>> tx = so.low_rank(optax.scale_by_adam(), rank=2,
    ...                  basis=so.bases.importance_sampled())
    >>> params = {'w': jnp.ones((8, 6))}
    >>> updates, state = tx.update(params, tx.init(params))
    >>> so.bases.importance_sampled().name
    'importance_sampled'
  """

  def refresh(g, old, key, align):
    g = g.astype(jnp.float32)
    u, s = singular.singular_vectors(sharding.replicate_matrix(g), algorithm)
    rank = old.shape[1]
    chosen = gumbel_top_k(jnp.log(s), rank, key)
    q = jnp.take(u, chosen, axis=1)
    if align:
      q = bases_lib.align_signs(q, old)
    return sharding.reshard_like(q, old)

  return bases_lib.BasisMethod(
      'importance_sampled', bases_lib.dense_init, refresh,
      bases_lib.dense_project, bases_lib.dense_unproject,
      bases_lib.dense_transition,
  )


