"""I3S: singular directions sampled in proportion to their singular values."""

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


def gumbel_top_k(log_weights: jax.Array, k: int, key: jax.Array) -> jax.Array:
  """``k`` indices sampled without replacement with probability ∝ ``exp(log_weights)``.

  The Gumbel-top-k trick (Kool, van Hoof & Welling, `Stochastic Beams and Where
  to Find Them <https://arxiv.org/abs/1903.06059>`_, 2019): the ``k`` largest
  ``log w_i + Gumbel_i`` are a draw of successive sampling without replacement
  (the first index has probability ``w_i / Σ w``, the next one is drawn from the
  rest, ...). Indices are returned ascending.
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
  """

  def refresh(g, old, key, align):
    g = g.astype(jnp.float32)
    u, s = bases_lib.singular_vectors(sharding.replicate_matrix(g), algorithm)
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


@deprecation.renamed_arguments(
    refresh_every='refresh', weight_decay_mask='mask')
@presets.declare_static_args(
    'rank', 'refresh', 'mask', 'dimension_numbers', 'mu_dtype', 'basis_dtype',
    'precision')
def i3s(
    learning_rate: optax.ScalarOrSchedule,
    rank: int | float = 128,
    *,
    refresh: int | refresh_lib.RefreshPolicy = 200,
    stagger: bool = True,
    side: str = 'reference',
    on_refresh: str = 'keep',
    align_signs: bool = True,
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
  """I3S: GaLore with importance-sampled singular directions.

  Zhang et al., `Breaking the Frozen Subspace: Importance Sampling for
  Low-Rank Optimization in LLM Pretraining <https://arxiv.org/abs/2502.05790>`_,
  NeurIPS 2025. Every ``T`` updates ``Q = U_{:,I}`` with ``I`` drawn without
  replacement with probability ∝ ``σ_i`` (:func:`importance_sampled`); then

  .. math::
    C = QᵀG,\\quad N = Adam(C),\\quad W \\leftarrow W - η\\,(α\\, Q N + λ W).

  Hyper-parameters and state as :func:`subspace_optax.galore`
  (:func:`subspace_optax.memory.galore_bytes`).

  Args: as :func:`subspace_optax.galore`; ``seed`` drives the sampling.

  Examples:
    >>> import jax.numpy as jnp
    >>> import subspace_optax as so
    >>> params = {'w': jnp.ones((8, 6))}
    >>> tx = so.i3s(learning_rate=1e-3, rank=2, refresh=100)
    >>> state = tx.init(params)
    >>> updates, state = tx.update(params, state, params)
    >>> so.state_bytes(state) == so.memory.galore_bytes(params, rank=2)
    True
  """
  return alias.galore(
      learning_rate, rank=rank, refresh=refresh, stagger=stagger,
      basis=importance_sampled(), side=side, on_refresh=on_refresh,
      align_signs=align_signs, scale=scale, b1=b1, b2=b2, eps=eps,
      eps_before_bias_correction=eps_before_bias_correction,
      weight_decay=weight_decay, mask=mask,
      dimension_numbers=dimension_numbers, seed=seed, mu_dtype=mu_dtype,
      basis_dtype=basis_dtype, precision=precision,
  )
