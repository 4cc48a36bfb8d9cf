"""Basis methods: how each matrix's subspace is chosen.

Pass one as ``basis=`` to :func:`subspace_optax.low_rank` or a preset, by name
(``'svd'``, ``'randomized'``, ...) or as a :class:`BasisMethod` built here.
"""

from subspace_optax._src.bases.base import align_signs
from subspace_optax._src.bases.base import BasisMethod
from subspace_optax._src.bases.base import orthonormalize
from subspace_optax._src.bases.singular import randomized
from subspace_optax._src.bases.singular import svd
# Online, random, DCT and importance-sampled bases.
from subspace_optax._src.bases.dct import dct
from subspace_optax._src.bases.dct import dct_columns
from subspace_optax._src.bases.dct import dct_matrix
from subspace_optax._src.bases.importance import gumbel_top_k
from subspace_optax._src.bases.importance import importance_sampled
from subspace_optax._src.bases.online_pca import online_pca
from subspace_optax._src.bases.online_pca import online_pca_gradient
from subspace_optax._src.bases.online_pca import OnlinePCAState
from subspace_optax._src.bases.online_pca import range_finder
from subspace_optax._src.bases.random_matrices import gaussian
from subspace_optax._src.bases.random_matrices import random_orthonormal
# Index, seeded and quantized bases (FRUGAL, APOLLO, Q-GaLore).
from subspace_optax._src.bases.seeded import seeded_gaussian
from subspace_optax._src.bases.seeded import seeded_matrix
from subspace_optax._src.bases.seeded import SeedState
from subspace_optax._src.bases.index import blocks
from subspace_optax._src.bases.index import BlockState
from subspace_optax._src.bases.index import random_columns
from subspace_optax._src.bases.index import SelectedColumns
from subspace_optax._src.bases.quantized import quantized
# A fixed basis from the weights themselves (fine-tuning).
from subspace_optax._src.bases.weight_singular import weight_singular

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
    'weight_singular',
)
