"""GoLore: GaLore with a random orthonormal basis."""

from __future__ import annotations

from typing import Any, Optional

import optax

from subspace_optax._src import arguments
from subspace_optax._src.bases import random_matrices
from subspace_optax._src.methods import galore
from subspace_optax._src.refresh import every as refresh_lib


@arguments.declare_static_args(
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
  (:func:`subspace_optax.state_sizes.galore_bytes`).

  Args: as :func:`subspace_optax.galore`.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; its ``update`` needs
    ``params`` when ``weight_decay`` is used.

  Examples:
    >>> import jax.numpy as jnp
    >>> import subspace_optax as so
    >>> params = {'w': jnp.ones((8, 6))}
    >>> tx = so.golore(learning_rate=1e-3, rank=2, refresh=100)
    >>> state = tx.init(params)
    >>> updates, state = tx.update(params, state, params)
    >>> so.state_bytes(state) == so.state_sizes.galore_bytes(params, rank=2)
    True
  """
  return galore.galore(
      learning_rate, rank=rank, refresh=refresh, stagger=stagger,
      basis=random_matrices.random_orthonormal(), side=side, on_refresh=on_refresh,
      align_signs=False, scale=scale, b1=b1, b2=b2, eps=eps,
      eps_before_bias_correction=eps_before_bias_correction,
      weight_decay=weight_decay, mask=mask,
      dimension_numbers=dimension_numbers, seed=seed, mu_dtype=mu_dtype,
      basis_dtype=basis_dtype, precision=precision,
  )
