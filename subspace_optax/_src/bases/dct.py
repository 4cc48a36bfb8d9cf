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

import math

import jax
import jax.numpy as jnp
import numpy as np

from subspace_optax._src import utils
from subspace_optax._src.bases import base as bases_lib
from subspace_optax._src.bases import index
from subspace_optax._src.pipeline import sharding


def dct_matrix(size: int) -> np.ndarray:
  """The orthonormal DCT-II matrix ``D`` (float64 numpy), basis vectors as columns.

  .. math::
    D_{ij} = \\sqrt{2/k}\\; c_j \\cos\\frac{π (2i + 1) j}{2k},\\qquad
    c_0 = 1/\\sqrt 2,\\ c_{j>0} = 1,

  so ``DᵀD = I`` and ``Dᵀx`` is ``scipy.fft.dct(x, type=2, norm='ortho')``.

  Args:
    size: ``k``.

  Returns:
    The float64 ``(k, k)`` numpy array ``D``.

  Examples:
    >>> import numpy as np
    >>> import subspace_optax as so
    >>> d = so.bases.dct_matrix(4)
    >>> np.allclose(d.T @ d, np.eye(4))
    True
  """
  i = np.arange(size)[:, None]
  j = np.arange(size)[None, :]
  d = np.sqrt(2.0 / size) * np.cos(np.pi * (2 * i + 1) * j / (2 * size))
  d[:, 0] /= np.sqrt(2.0)
  return d


@utils.compiled('size')
def dct_columns(indices: jax.Array, size: int) -> jax.Array:
  """``D[:, indices]`` (float32, ``size x len(indices)``) without forming ``D``.

  Args:
    indices: int array of column indices, each in ``[0, size)``.
    size: ``k``, the size of the DCT.

  Returns:
    The float32 ``(size, len(indices))`` columns of the DCT-II matrix.

  Examples:
    >>> import jax.numpy as jnp
    >>> import numpy as np
    >>> import subspace_optax as so
    >>> cols = so.bases.dct_columns(jnp.array([0, 3]), 8)
    >>> np.allclose(cols, so.bases.dct_matrix(8)[:, [0, 3]], atol=1e-6)
    True
  """
  one_hot = jax.nn.one_hot(indices, size, dtype=jnp.float32, axis=0)
  return jax.scipy.fft.idct(one_hot, type=2, axis=0, norm='ortho')


def dct_similarity(g: jax.Array) -> jax.Array:
  """``S = DᵀG`` for a ``(k, l)`` matrix: the orthonormal DCT-II of each column."""
  return jax.scipy.fft.dct(g.astype(jnp.float32), type=2, axis=0, norm='ortho')


# The scores are summed over at most this many blocks of columns: the DCT of
# a whole matrix holds two complex64 copies of it (its FFT and a transposed
# copy), four float32 matrices of temporaries.
_SCORE_BLOCKS = 8


def _score_blocks(g: jax.Array) -> int:
  """The number ``n`` of column blocks: the largest divisor of ``l`` up to
  :data:`_SCORE_BLOCKS` whose blocks ``l / n`` a sharded column axis (under
  an Explicit mesh) still divides evenly."""
  l = g.shape[1]
  spec = sharding.explicit_spec(g)
  shards = 1
  if spec is not None and spec[1] is not None:
    mesh = jax.typeof(g).sharding.mesh
    names = spec[1] if isinstance(spec[1], tuple) else (spec[1],)
    shards = math.prod(mesh.shape[name] for name in names)
  return max(n for n in range(1, _SCORE_BLOCKS + 1)
             if l % n == 0 and (l // n) % shards == 0)


def dct_scores(g: jax.Array, norm_order: float = 1.0) -> jax.Array:
  """``‖S_{j,:}‖_p^p`` for each row ``j`` of ``S = DᵀG`` (``(k,)``, float32).

  The rows of ``S`` are summed over ``n`` blocks of columns (up to 8; block
  ``c`` holds the columns ``c, c + n, c + 2n, ...``, a bitcast of ``G`` to
  ``(k, l / n, n)`` indexed on its last axis, so a column-sharded ``G`` stays
  evenly sharded), in a ``lax.fori_loop``: the DCT's temporaries are those of
  one block, not of the matrix.

  Args:
    g: a ``(k, l)`` matrix.
    norm_order: ``p``.

  Returns:
    The float32 ``(k,)`` scores.
  """
  k, l = g.shape
  blocks = _score_blocks(g)
  strided = g.reshape(k, l // blocks, blocks)

  def block_scores(c):
    s = jnp.abs(dct_similarity(
        jax.lax.dynamic_index_in_dim(strided, c, 2, keepdims=False)))
    if not (isinstance(norm_order, (int, float)) and norm_order == 1):
      s = s ** norm_order
    return jnp.sum(s, axis=1)

  # The first block outside the loop: the carry has its (sharded) type.
  return jax.lax.fori_loop(1, blocks, lambda c, scores: scores + block_scores(c),
                           block_scores(0))


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

  Returns:
    A :class:`BasisMethod`, for ``basis=`` of :func:`subspace_optax.low_rank`
    and the presets.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import subspace_optax as so
    >>> tx = so.low_rank(optax.scale_by_adam(), rank=2,
    ...                  basis=so.bases.dct())
    >>> params = {'w': jnp.ones((8, 6))}
    >>> updates, state = tx.update(params, tx.init(params))
    >>> so.bases.dct().name
    'dct'
  """

  def init(k, l, rank):
    del l
    return index.SelectedColumns(jnp.arange(rank, dtype=jnp.int32), k)

  def refresh(g, old, key, align):
    del key, align
    rank = old.indices.shape[-1]
    scores = dct_scores(g, norm_order)
    # top_k needs the whole score vector on every device (a 1 x k gather).
    _, top = jax.lax.top_k(sharding.replicate_matrix(scores[None])[0], rank)
    return index.SelectedColumns(jnp.sort(top).astype(jnp.int32), old.size)

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


