"""One-shot subspace tools on parameter trees: Sub-MoE expert merging.

:func:`sub_moe` compresses a Mixture-of-Experts without training: experts are
grouped by k-means on their calibration outputs, each group's weights share
one basis from a joint SVD, and their other factors are merged weighted by
routing frequency. :func:`kmeans` is the k-means (k-means++ seeding) it uses,
in JAX.
"""

from subspace_optax._src.merging.kmeans import kmeans
from subspace_optax._src.merging.kmeans import kmeans_plus_plus
from subspace_optax._src.merging.kmeans import KMeansResult
from subspace_optax._src.merging.sub_moe import group_experts
from subspace_optax._src.merging.sub_moe import merge_group
from subspace_optax._src.merging.sub_moe import MergeResult
from subspace_optax._src.merging.sub_moe import remap_logits
from subspace_optax._src.merging.sub_moe import sub_moe
from subspace_optax._src.merging.whitening import input_cholesky

__all__ = (
    'group_experts',
    'kmeans',
    'kmeans_plus_plus',
    'KMeansResult',
    'input_cholesky',
    'merge_group',
    'MergeResult',
    'remap_logits',
    'sub_moe',
)
