"""I3S: singular directions sampled in proportion to their singular values."""

from __future__ import annotations

from typing import Any, Optional

import optax

from subspace_optax._src import arguments
from subspace_optax._src.bases import importance as importance_lib
from subspace_optax._src.methods import galore
from subspace_optax._src.refresh import every as refresh_lib


@arguments.declare_static_args(
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
  (:func:`subspace_optax.state_sizes.galore_bytes`).

  Args: as :func:`subspace_optax.galore`; ``seed`` drives the sampling.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; its ``update`` needs
    ``params`` when ``weight_decay`` is used.

  Examples:
    >>> import jax.numpy as jnp
    >>> import subspace_optax as so
    >>> params = {'w': jnp.ones((8, 6))}
    >>> tx = so.i3s(learning_rate=1e-3, rank=2, refresh=100)
    >>> state = tx.init(params)
    >>> updates, state = tx.update(params, state, params)
    >>> so.state_bytes(state) == so.state_sizes.galore_bytes(params, rank=2)
    True
  """
  return galore.galore(
      learning_rate, rank=rank, refresh=refresh, stagger=stagger,
      basis=importance_lib.importance_sampled(), side=side, on_refresh=on_refresh,
      align_signs=align_signs, scale=scale, b1=b1, b2=b2, eps=eps,
      eps_before_bias_correction=eps_before_bias_correction,
      weight_decay=weight_decay, mask=mask,
      dimension_numbers=dimension_numbers, seed=seed, mu_dtype=mu_dtype,
      basis_dtype=basis_dtype, precision=precision,
  )
