"""SVD-free basis: columns of a fixed DCT matrix chosen by alignment.

Modoranu et al., `SVD-Free Low-Rank Adaptive Gradient Optimization for Large
Language Models <https://arxiv.org/abs/2505.17967>`_ (later "FFT-based Dynamic
Subspace Selection"), 2025.

Every matrix size ``k`` has one orthonormal DCT-II matrix ``D`` (``k x k``). It
is never stored: the similarity ``S = DᵀG`` is a DCT of the gradient along the
projected axis (FFT, ``O(k l log k)``), and the ``rank`` selected columns
``D[:, I]`` are an inverse DCT of one-hot vectors (``O(k r log k)``). The state
of a matrix is its ``rank`` int32 column indices.
"""

from __future__ import annotations

from typing import Any, Optional

import optax

from subspace_optax._src import arguments
from subspace_optax._src.bases import dct as dct_lib
from subspace_optax._src.methods import galore
from subspace_optax._src.refresh import every as refresh_lib


@arguments.declare_static_args('rank', 'refresh', 'mask', 'dimension_numbers',
                               'mu_dtype')
def dct_adamw(
    learning_rate: optax.ScalarOrSchedule,
    rank: int | float = 128,
    *,
    refresh: int | refresh_lib.RefreshPolicy = 200,
    stagger: bool = True,
    side: str = 'reference',
    on_refresh: str = 'transport',
    scale: float = 1.0,
    norm_order: float = 1.0,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    mask: Optional[Any] = None,
    dimension_numbers: Any = None,
    seed: int = 0,
    mu_dtype: Optional[Any] = None,
) -> optax.GradientTransformationExtraArgs:
  """DCT-AdamW: Adam in a subspace spanned by DCT columns, no SVD.

  Modoranu et al., `SVD-Free Low-Rank Adaptive Gradient Optimization for Large
  Language Models <https://arxiv.org/abs/2505.17967>`_, 2025. Every ``T``
  updates the ``rank`` DCT-II columns with the largest ``ℓ1`` alignment
  ``‖(DᵀG)_{j,:}‖_1`` are selected (:func:`dct`); then

  .. math::
    C = D_{:,I}ᵀ G,\\quad N = Adam(C),\\quad
    W \\leftarrow W - η\\,(α\\, D_{:,I} N + λ W),

  with the Adam ``ε`` after the bias correction (``optax.scale_by_adam``, as the
  reference) and moments moved between selections by the partial permutation
  (``on_refresh='transport'``; the reference's ``rotate_subspace=True``).
  Memory: GaLore's moments plus ``rank`` int32 indices instead of a dense basis
  (:func:`subspace_optax.state_sizes.dct_adamw_bytes`). The optional error-feedback
  buffer of the reference (an ``m x n`` state) is not included.

  Args:
    learning_rate: a float or an optax schedule.
    rank: subspace rank (int, clamped per matrix) or a fraction of ``min(m, n)``.
    refresh: updates between column selections ``T``, or a
      :mod:`subspace_optax.refresh` policy.
    stagger: spread the refreshes of different leaves over the period (int
      ``refresh`` only).
    side: see :func:`subspace_optax.low_rank`.
    on_refresh: ``'transport'`` (default), ``'reset'`` or ``'keep'``.
    scale: multiplies the unprojected update.
    norm_order: ``p`` of the row norm ranking the columns.
    b1, b2, eps: Adam's hyper-parameters.
    weight_decay: decoupled weight decay.
    mask: optax mask for the weight decay.
    dimension_numbers: which leaves to project; see :func:`subspace_optax.low_rank`.
    seed: unused by this basis (kept for a uniform signature).
    mu_dtype: dtype in which Adam's first moment is stored (as in
      ``optax.adamw``), e.g. ``jnp.bfloat16``; computed in float32. None:
      float32. The second moment stays float32.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; its ``update`` needs
    ``params`` when ``weight_decay`` is used.

  Examples:
    >>> import jax.numpy as jnp
    >>> import subspace_optax as so
    >>> params = {'w': jnp.ones((8, 6))}
    >>> tx = so.dct_adamw(learning_rate=1e-3, rank=2, refresh=100)
    >>> state = tx.init(params)
    >>> updates, state = tx.update(params, state, params)
    >>> so.state_bytes(state) == so.state_sizes.dct_adamw_bytes(params, rank=2)
    True
  """
  return galore.galore(
      learning_rate, rank=rank, refresh=refresh, stagger=stagger,
      basis=dct_lib.dct(norm_order), side=side, on_refresh=on_refresh,
      align_signs=False, scale=scale, b1=b1, b2=b2, eps=eps,
      eps_before_bias_correction=False, weight_decay=weight_decay, mask=mask,
      dimension_numbers=dimension_numbers, seed=seed, mu_dtype=mu_dtype,
  )


