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

import jax
import jax.numpy as jnp
import numpy as np
import optax

from subspace_optax._src import alias
from subspace_optax._src import bases as bases_lib
from subspace_optax._src import deprecation
from subspace_optax._src import index_bases
from subspace_optax._src import presets
from subspace_optax._src import refresh as refresh_lib
from subspace_optax._src import sharding


def dct_matrix(size: int) -> np.ndarray:
  """The orthonormal DCT-II matrix ``D`` (float64 numpy), basis vectors as columns.

  .. math::
    D_{ij} = \\sqrt{2/k}\\; c_j \\cos\\frac{π (2i + 1) j}{2k},\\qquad
    c_0 = 1/\\sqrt 2,\\ c_{j>0} = 1,

  so ``DᵀD = I`` and ``Dᵀx`` is ``scipy.fft.dct(x, type=2, norm='ortho')``.
  """
  i = np.arange(size)[:, None]
  j = np.arange(size)[None, :]
  d = np.sqrt(2.0 / size) * np.cos(np.pi * (2 * i + 1) * j / (2 * size))
  d[:, 0] /= np.sqrt(2.0)
  return d


def dct_columns(indices: jax.Array, size: int) -> jax.Array:
  """``D[:, indices]`` (float32, ``size x len(indices)``) without forming ``D``."""
  one_hot = jax.nn.one_hot(indices, size, dtype=jnp.float32, axis=0)
  return jax.scipy.fft.idct(one_hot, type=2, axis=0, norm='ortho')


def dct_similarity(g: jax.Array) -> jax.Array:
  """``S = DᵀG`` for a ``(k, l)`` matrix: the orthonormal DCT-II of each column."""
  return jax.scipy.fft.dct(g.astype(jnp.float32), type=2, axis=0, norm='ortho')


def dct(norm_order: float = 1.0) -> bases_lib.BasisMethod:
  """Columns of the DCT-II matrix that best align with the gradient.

  At a refresh, with ``D`` the orthonormal DCT-II matrix of the projected size:

  .. math::
    S = DᵀG,\\qquad I = \\operatorname{top-}r_j\\ \\|S_{j,:}\\|_p,\\qquad
    Q = D_{:, I},

  (``p = 1`` in the paper). ``C = QᵀG = S_{I,:}`` and ``unproject(C) = QC``. The
  transition between two selections is the partial permutation
  ``R_{ab} = [I_{new,a} = I_{old,b}]`` (``= Q_newᵀ Q_old``): with
  ``on_refresh='transport'`` moments of columns kept in both selections move to
  their new slots and those of new columns start at 0 (DCT-AdamW's
  ``rotate_subspace``). With ``'keep'`` slots are not matched; prefer
  ``'transport'`` or ``'reset'``.

  State: ``rank`` int32 indices per matrix (plus the static size). Signs are
  fixed, so ``align_signs`` has no effect.

  Args:
    norm_order: ``p`` of the row norm ranking the columns (1 in the paper).
  """

  def init(k, l, rank):
    del l
    return index_bases.SelectedColumns(jnp.arange(rank, dtype=jnp.int32), k)

  def refresh(g, old, key, align):
    del key, align
    rank = old.indices.shape[-1]
    s = dct_similarity(g)
    if isinstance(norm_order, (int, float)) and norm_order == 1:
      scores = jnp.sum(jnp.abs(s), axis=1)
    else:
      scores = jnp.sum(jnp.abs(s) ** norm_order, axis=1)
    # top_k needs the whole score vector on every device (a 1 x k gather).
    _, top = jax.lax.top_k(sharding.replicate_matrix(scores[None])[0], rank)
    return index_bases.SelectedColumns(jnp.sort(top).astype(jnp.int32), old.size)

  def project(g, state):
    q = dct_columns(state.indices, state.size)
    return sharding.einsum('kr,kl->rl', q, g.astype(jnp.float32))

  def unproject(c, state):
    q = dct_columns(state.indices, state.size)
    return sharding.einsum('kr,rl->kl', q, c.astype(jnp.float32))

  def transition(old, new):
    return (new.indices[:, None] == old.indices[None, :]).astype(jnp.float32)

  return bases_lib.BasisMethod('dct', init, refresh, project, unproject,
                               transition)


@deprecation.renamed_arguments(
    refresh_every='refresh', weight_decay_mask='mask')
@presets.declare_static_args('rank', 'refresh', 'mask', 'dimension_numbers')
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
  (:func:`subspace_optax.memory.dct_adamw_bytes`). The optional error-feedback
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

  Examples:
    >>> import jax.numpy as jnp
    >>> import subspace_optax as so
    >>> params = {'w': jnp.ones((8, 6))}
    >>> tx = so.dct_adamw(learning_rate=1e-3, rank=2, refresh=100)
    >>> state = tx.init(params)
    >>> updates, state = tx.update(params, state, params)
    >>> so.state_bytes(state) == so.memory.dct_adamw_bytes(params, rank=2)
    True
  """
  return alias.galore(
      learning_rate, rank=rank, refresh=refresh, stagger=stagger,
      basis=dct(norm_order), side=side, on_refresh=on_refresh,
      align_signs=False, scale=scale, b1=b1, b2=b2, eps=eps,
      eps_before_bias_correction=False, weight_decay=weight_decay, mask=mask,
      dimension_numbers=dimension_numbers, seed=seed,
  )


