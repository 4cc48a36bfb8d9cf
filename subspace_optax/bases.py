"""Basis methods: how each matrix's subspace is chosen.

Pass one as ``basis=`` to :func:`subspace_optax.low_rank` or a preset, by name
(``'svd'``, ``'randomized'``, ...) or as a :class:`BasisMethod` built here.
"""

from subspace_optax._src import deprecation as _deprecation
from subspace_optax._src.bases import align_signs
from subspace_optax._src.bases import BasisMethod
from subspace_optax._src.bases import orthonormalize
from subspace_optax._src.bases import randomized
from subspace_optax._src.bases import svd
# Online, random, DCT and importance-sampled bases.
from subspace_optax._src.dct import dct
from subspace_optax._src.dct import dct_columns
from subspace_optax._src.dct import dct_matrix
from subspace_optax._src.importance import gumbel_top_k
from subspace_optax._src.importance import importance_sampled
from subspace_optax._src.online_pca import online_pca
from subspace_optax._src.online_pca import online_pca_gradient
from subspace_optax._src.online_pca import OnlinePCAState
from subspace_optax._src.online_pca import range_finder
from subspace_optax._src.random_bases import gaussian
from subspace_optax._src.random_bases import random_orthonormal
# Index, seeded and quantized bases (FRUGAL, APOLLO, Q-GaLore).
from subspace_optax._src.apollo import seeded_gaussian
from subspace_optax._src.apollo import seeded_matrix
from subspace_optax._src.apollo import SeedState
from subspace_optax._src.index_bases import blocks
from subspace_optax._src.index_bases import BlockState
from subspace_optax._src.index_bases import random_columns
from subspace_optax._src.index_bases import SelectedColumns
from subspace_optax._src.quantize import quantized

__all__ = (
    'align_signs',
    'BasisMethod',
    'blocks',
    'BlockState',
    'dct',
    'dct_columns',
    'dct_matrix',
    'gaussian',
    'gumbel_top_k',
    'importance_sampled',
    'online_pca',
    'online_pca_gradient',
    'OnlinePCAState',
    'orthonormalize',
    'quantized',
    'random_columns',
    'random_orthonormal',
    'randomized',
    'range_finder',
    'seeded_gaussian',
    'seeded_matrix',
    'SeedState',
    'SelectedColumns',
    'svd',
)

# Internals that left the public namespace in 0.2.0 (removed in the next one).
__getattr__ = _deprecation.moved_attributes('subspace_optax.bases', {
    'resolve': 'subspace_optax._src.bases',
})
