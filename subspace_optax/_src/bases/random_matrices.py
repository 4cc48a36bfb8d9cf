"""Gradient-independent random bases (GoLore, Flora).

Both bases are drawn from the refresh key, which the pipeline derives as
``fold_in(fold_in(key(seed), count), leaf)``: the basis is a deterministic
function of ``(seed, count)`` and no PRNG key is kept in the optimizer state.
The state is the dense ``k x rank`` matrix (the pipeline's ``unproject`` needs
the matrix, not only its seed).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from subspace_optax._src.bases import base as bases_lib
from subspace_optax._src.pipeline import sharding


def _gaussian_like(old: jax.Array, key: jax.Array) -> jax.Array:
  return sharding.reshard_like(bases_lib.normal_matrix(key, old.shape), old)


def random_orthonormal() -> bases_lib.BasisMethod:
  """A basis drawn uniformly from the Stiefel manifold, ignoring the gradient.

  He et al., `Subspace Optimization for Large Language Models with Convergence
  Guarantees <https://arxiv.org/abs/2410.11289>`_ (GoLore), ICML 2025:

  .. math::
    Ω \\sim N(0, 1)^{k×r},\\qquad Q = orth(Ω)\\ (QR\\ with\\ R_{ii} > 0).

  The QR of a Gaussian matrix with a positive diagonal is Haar-distributed. It
  is computed by Cholesky-QR (:func:`~subspace_optax.bases.orthonormalize`), so
  a row-sharded basis is never gathered. Unlike an SVD of a noisy small-batch
  gradient, the subspace is unbiased, which is what GoLore's convergence proof
  needs. Cost ``O(k r²)`` per refresh; the gradient is not read.

  Returns:
    A :class:`BasisMethod`, for ``basis=`` of :func:`subspace_optax.low_rank`
    and the presets.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import subspace_optax as so
    >>> tx = so.low_rank(optax.scale_by_adam(), rank=2,
    ...                  basis=so.bases.random_orthonormal())
    >>> params = {'w': jnp.ones((8, 6))}
    >>> updates, state = tx.update(params, tx.init(params))
    >>> so.bases.random_orthonormal().name
    'random_orthonormal'
  """

  def refresh(g, old, key, align):
    del g
    draw, noise = jax.random.split(key)
    q = bases_lib.orthonormalize(_gaussian_like(old, draw), noise)
    if align:
      q = bases_lib.align_signs(q, old)
    return sharding.reshard_like(q, old)

  return bases_lib.BasisMethod(
      'random_orthonormal', bases_lib.dense_init, refresh,
      bases_lib.dense_project, bases_lib.dense_unproject,
      bases_lib.dense_transition,
  )


def gaussian() -> bases_lib.BasisMethod:
  """A Gaussian sketch with entries ``N(0, 1/rank)``, not orthonormalised.

  Hao, Cao & Mou, `Flora: Low-Rank Adapters Are Secretly Gradient Compressors
  <https://arxiv.org/abs/2402.03293>`_, ICML 2024 (also APOLLO's projection,
  arXiv 2412.05270):

  .. math::
    Q_{ij} \\sim N(0, 1/r),\\qquad C = QᵀG,\\qquad
    \\mathbb{E}[Q Qᵀ] = I_k,

  so the back-projection ``QC = QQᵀG`` is an unbiased estimate of ``G``. The
  transition ``Q_newᵀ Q_old`` is Flora's moment transfer. Cost ``O(k r)``.

  Returns:
    A :class:`BasisMethod`, for ``basis=`` of :func:`subspace_optax.low_rank`
    and the presets.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import subspace_optax as so
    >>> tx = so.low_rank(optax.scale_by_adam(), rank=2,
    ...                  basis=so.bases.gaussian())
    >>> params = {'w': jnp.ones((8, 6))}
    >>> updates, state = tx.update(params, tx.init(params))
    >>> so.bases.gaussian().name
    'gaussian'
  """

  def refresh(g, old, key, align):
    del g
    rank = old.shape[1]
    q = _gaussian_like(old, key) / jnp.sqrt(jnp.float32(rank))
    if align:
      q = bases_lib.align_signs(q, old)
    return q

  return bases_lib.BasisMethod(
      'gaussian', bases_lib.dense_init, refresh, bases_lib.dense_project,
      bases_lib.dense_unproject, bases_lib.dense_transition,
  )


