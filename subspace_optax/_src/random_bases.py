"""Gradient-independent random bases (GoLore, Flora) and the GoLore preset.

Both bases are drawn from the refresh key, which the pipeline derives as
``fold_in(fold_in(key(seed), count), leaf)``: the basis is a deterministic
function of ``(seed, count)`` and no PRNG key is kept in the optimizer state.
The state is the dense ``k x rank`` matrix (the pipeline's ``unproject`` needs
the matrix, not only its seed).
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
import optax

from subspace_optax._src import alias
from subspace_optax._src import bases as bases_lib
from subspace_optax._src import deprecation
from subspace_optax._src import presets
from subspace_optax._src import refresh as refresh_lib
from subspace_optax._src import sharding


def _gaussian_like(old: jax.Array, key: jax.Array) -> jax.Array:
  return sharding.reshard_like(
      jax.random.normal(key, old.shape, jnp.float32), old)


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


@deprecation.renamed_arguments(
    refresh_every='refresh', weight_decay_mask='mask')
@presets.declare_static_args(
    'rank', 'refresh', 'mask', 'dimension_numbers', 'mu_dtype', 'basis_dtype',
    'precision')
def golore(
    learning_rate: optax.ScalarOrSchedule,
    rank: int | float = 128,
    *,
    refresh: int | refresh_lib.RefreshPolicy = 200,
    stagger: bool = True,
    side: str = 'reference',
    on_refresh: str = 'keep',
    scale: float = 0.25,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    eps_before_bias_correction: bool = True,
    weight_decay: float = 0.0,
    mask: Optional[Any] = None,
    dimension_numbers: Any = None,
    seed: int = 0,
    mu_dtype: Optional[Any] = None,
    basis_dtype: Optional[Any] = None,
    precision: Optional[Any] = None,
) -> optax.GradientTransformationExtraArgs:
  """GoLore: GaLore with a random orthonormal basis.

  He et al., `Subspace Optimization for Large Language Models with Convergence
  Guarantees <https://arxiv.org/abs/2410.11289>`_, ICML 2025. Per matrix, with
  ``Q`` drawn uniformly from the Stiefel manifold every ``T`` updates,
  independently of the gradient:

  .. math::
    C = QᵀG,\\quad N = Adam(C),\\quad W \\leftarrow W - η\\,(α\\, Q N + λ W).

  GaLore's SVD of a small-batch gradient is biased toward the noise and may not
  converge; the random subspace is unbiased. The paper recommends GaLore for
  the early phase and GoLore for the final one (switch optimizers between
  phases, e.g. with ``optax.contrib`` schedules or two runs). Column signs are
  not aligned with the previous basis (``align_signs=False``), so successive
  bases stay independent. State: GaLore's
  (:func:`subspace_optax.memory.galore_bytes`).

  Args: as :func:`subspace_optax.galore`.

  Examples:
    >>> import jax.numpy as jnp
    >>> import subspace_optax as so
    >>> params = {'w': jnp.ones((8, 6))}
    >>> tx = so.golore(learning_rate=1e-3, rank=2, refresh=100)
    >>> state = tx.init(params)
    >>> updates, state = tx.update(params, state, params)
    >>> so.state_bytes(state) == so.memory.galore_bytes(params, rank=2)
    True
  """
  return alias.galore(
      learning_rate, rank=rank, refresh=refresh, stagger=stagger,
      basis=random_orthonormal(), side=side, on_refresh=on_refresh,
      align_signs=False, scale=scale, b1=b1, b2=b2, eps=eps,
      eps_before_bias_correction=eps_before_bias_correction,
      weight_decay=weight_decay, mask=mask,
      dimension_numbers=dimension_numbers, seed=seed, mu_dtype=mu_dtype,
      basis_dtype=basis_dtype, precision=precision,
  )
