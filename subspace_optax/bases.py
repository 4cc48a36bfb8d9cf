"""Basis methods: how each matrix's subspace is chosen (public namespace)."""

from subspace_optax._src.bases import align_signs
from subspace_optax._src.bases import BasisMethod
from subspace_optax._src.bases import orthonormalize
from subspace_optax._src.bases import randomized
from subspace_optax._src.bases import resolve
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
from subspace_optax._src.index_bases import SelectedColumns
from subspace_optax._src.index_bases import random_columns
from subspace_optax._src.quantize import quantized
