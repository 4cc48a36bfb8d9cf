"""Composable optax transforms for low-rank training and continual learning.

Top level: the pipeline (:func:`low_rank`), the named methods built on it, their
stages, and tools on states. Submodules: :mod:`~subspace_optax.bases` (how a
subspace is chosen), :mod:`~subspace_optax.refresh` (when),
:mod:`~subspace_optax.memory` (analytic state sizes),
:mod:`~subspace_optax.transforms` (reference Adam/Lion formulas to compose
with) and :mod:`~subspace_optax.continual` (continual learning).
"""

from subspace_optax import bases
from subspace_optax import continual
from subspace_optax import memory
from subspace_optax import refresh
from subspace_optax import transforms
from subspace_optax._src import deprecation as _deprecation
# --- the pipeline ---
from subspace_optax._src.layout import DimensionNumbers
from subspace_optax._src.layout import last_two_axes
from subspace_optax._src.low_rank import low_rank
from subspace_optax._src.low_rank import SubspaceState
# --- named methods ---
from subspace_optax._src.alias import galore
from subspace_optax._src.apollo import apollo
from subspace_optax._src.apollo import apollo_mini
from subspace_optax._src.auon import auon
from subspace_optax._src.dct import dct_adamw
from subspace_optax._src.fira import fira
from subspace_optax._src.frugal import frugal
from subspace_optax._src.importance import i3s
from subspace_optax._src.momentum_reset import reset_moments_every
from subspace_optax._src.online_pca import online_subspace_descent
from subspace_optax._src.q_galore import q_galore
from subspace_optax._src.radial import adamp
from subspace_optax._src.radial import sgdp
from subspace_optax._src.random_bases import golore
# --- stages of the named methods ---
from subspace_optax._src.apollo import apollo_scaling
from subspace_optax._src.apollo import scale_gradient_by_subspace
from subspace_optax._src.auon import scale_by_aspect_ratio
from subspace_optax._src.auon import scale_by_auon
from subspace_optax._src.auon import ScaleByAuonState
from subspace_optax._src.fira import fira_residual
from subspace_optax._src.fira import scale_residual_by_subspace
from subspace_optax._src.fira import subspace_norm_ratio
from subspace_optax._src.momentum_reset import reset_moments
from subspace_optax._src.momentum_reset import ResetMomentsState
from subspace_optax._src.norm_growth import clip_norm_growth
from subspace_optax._src.norm_growth import ClipNormGrowthState
from subspace_optax._src.radial import project_radial
from subspace_optax._src.radial import ProjectRadialState
from subspace_optax._src.refactorize import refactorize
# --- low-precision weights and bases ---
from subspace_optax._src.quantize import dequantize
from subspace_optax._src.quantize import quantize
from subspace_optax._src.quantize import QuantizedMatrix
from subspace_optax._src.quantize import stochastic_round
from subspace_optax._src.coverage import FullSizeWarning
from subspace_optax._src.layout import conv_kernels
from subspace_optax._src.summary import summary
from subspace_optax._src.quantized_moments import quantize_moments
from subspace_optax._src.master_weights import master_weights
# --- tools on states ---
from subspace_optax._src.checkpoint import check_compatible
from subspace_optax._src.memory import state_bytes
from subspace_optax._src.presets import static_args
from subspace_optax._src.sharding import state_shardings

__version__ = '0.1.0'

__all__ = (
    # Submodules.
    'bases',
    'continual',
    'memory',
    'refresh',
    'transforms',
    # The pipeline.
    'DimensionNumbers',
    'conv_kernels',
    'last_two_axes',
    'low_rank',
    'SubspaceState',
    # Named methods.
    'adamp',
    'apollo',
    'apollo_mini',
    'auon',
    'dct_adamw',
    'fira',
    'frugal',
    'galore',
    'golore',
    'i3s',
    'online_subspace_descent',
    'q_galore',
    'reset_moments_every',
    'sgdp',
    # Stages of the named methods.
    'apollo_scaling',
    'clip_norm_growth',
    'ClipNormGrowthState',
    'fira_residual',
    'project_radial',
    'ProjectRadialState',
    'refactorize',
    'reset_moments',
    'ResetMomentsState',
    'scale_by_aspect_ratio',
    'scale_by_auon',
    'ScaleByAuonState',
    'scale_gradient_by_subspace',
    'scale_residual_by_subspace',
    'subspace_norm_ratio',
    # Low-precision weights and bases.
    'dequantize',
    'quantize',
    'QuantizedMatrix',
    'stochastic_round',
    'quantize_moments',
    'master_weights',
    # Tools on states.
    'FullSizeWarning',
    'summary',
    'check_compatible',
    'state_bytes',
    'state_shardings',
    'static_args',
)

# Names that moved in 0.2.0; they keep working, with a DeprecationWarning,
# until the next release.
_MOVED = {
    **{name: 'subspace_optax.memory' for name in memory.__all__},
    **{name: 'subspace_optax.transforms' for name in transforms.__all__},
    **{name: 'subspace_optax.continual' for name in (
        'ewc', 'gpm', 'l2_to_anchor', 'orthogonal_to', 'OrthogonalState',
        'ProtectedSubspace', 'rewarm_schedule', 'sculpt')},
}
__getattr__ = _deprecation.moved_attributes('subspace_optax', _MOVED)
