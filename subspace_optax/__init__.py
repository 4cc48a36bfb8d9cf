"""Composable optax transforms for low-rank training and continual learning.

Top level: the pipeline (:func:`low_rank`), the named methods built on it, their
stages, and tools on states. Submodules: :mod:`~subspace_optax.bases` (how a
subspace is chosen), :mod:`~subspace_optax.refresh` (when),
:mod:`~subspace_optax.state_sizes` (analytic state sizes),
:mod:`~subspace_optax.transforms` (reference Adam/Lion formulas to compose
with) and :mod:`~subspace_optax.continual` (continual learning) and
:mod:`~subspace_optax.merging` (Sub-MoE expert merging).
"""

from subspace_optax import bases
from subspace_optax import continual
from subspace_optax import merging
from subspace_optax import state_sizes
from subspace_optax import refresh
from subspace_optax import transforms
from subspace_optax._src import deprecation as _deprecation
# --- the pipeline ---
from subspace_optax._src.pipeline.layout import DimensionNumbers
from subspace_optax._src.pipeline.layout import last_two_axes
from subspace_optax._src.pipeline.low_rank import low_rank
from subspace_optax._src.pipeline.low_rank import SubspaceState
from subspace_optax._src.pipeline.per_layer import NotLayerSeparableError
from subspace_optax._src.pipeline.per_layer import per_layer_train_step
# --- named methods ---
from subspace_optax._src.methods.galore import galore
from subspace_optax._src.methods.apollo import apollo
from subspace_optax._src.methods.apollo import apollo_mini
from subspace_optax._src.methods.auon import auon
from subspace_optax._src.methods.dct_adamw import dct_adamw
from subspace_optax._src.methods.fira import fira
from subspace_optax._src.methods.frugal import frugal
from subspace_optax._src.methods.i3s import i3s
from subspace_optax._src.methods.momentum_reset import reset_moments_every
from subspace_optax._src.methods.online_subspace_descent import online_subspace_descent
from subspace_optax._src.methods.q_galore import q_galore
from subspace_optax._src.methods.adamp import adamp
from subspace_optax._src.methods.adamp import sgdp
from subspace_optax._src.methods.golore import golore
# --- fine-tuning in the weights' singular subspaces (exact reparameterisation) ---
from subspace_optax._src.finetune.reparameterize import Factorization
from subspace_optax._src.finetune.reparameterize import reparameterize
from subspace_optax._src.finetune.reparameterize import ReparameterizeState
from subspace_optax._src.methods.effort import effort
from subspace_optax._src.methods.lora import lora
from subspace_optax._src.methods.milora import milora
from subspace_optax._src.methods.milora import pissa
from subspace_optax._src.methods.salt import salt
from subspace_optax._src.methods.svfit import svfit
from subspace_optax._src.finetune.weight_subspace import weight_subspace
# --- stages of the named methods ---
from subspace_optax._src.transforms.subspace_scaling import apollo_scaling
from subspace_optax._src.transforms.subspace_scaling import scale_gradient_by_subspace
from subspace_optax._src.transforms.auon import scale_by_aspect_ratio
from subspace_optax._src.transforms.auon import scale_by_auon
from subspace_optax._src.transforms.auon import ScaleByAuonState
from subspace_optax._src.methods.fira import fira_residual
from subspace_optax._src.methods.fira import scale_residual_by_subspace
from subspace_optax._src.methods.fira import subspace_norm_ratio
from subspace_optax._src.transforms.momentum_reset import reset_moments
from subspace_optax._src.transforms.momentum_reset import ResetMomentsState
from subspace_optax._src.transforms.norm_growth import clip_norm_growth
from subspace_optax._src.transforms.norm_growth import ClipNormGrowthState
from subspace_optax._src.transforms.radial import project_radial
from subspace_optax._src.transforms.radial import ProjectRadialState
from subspace_optax._src.methods.refactorize import refactorize
# --- low-precision weights and bases ---
from subspace_optax._src.transforms.quantize import dequantize
from subspace_optax._src.transforms.quantize import quantize
from subspace_optax._src.transforms.quantize import QuantizedMatrix
from subspace_optax._src.transforms.quantize import stochastic_round
from subspace_optax._src.pipeline.coverage import FullSizeWarning
from subspace_optax._src.pipeline.layout import conv_kernels
from subspace_optax._src.state.summary import summary
from subspace_optax._src.transforms.quantized_moments import quantize_moments
from subspace_optax._src.transforms.master_weights import master_weights
from subspace_optax._src.transforms.stochastic_rounding import stochastic_rounding
from subspace_optax._src.transforms.stochastic_rounding import StochasticRoundingState
# --- tools on states ---
from subspace_optax._src.state.checkpoint import check_compatible
from subspace_optax._src.state.checkpoint import check_config
from subspace_optax._src.state.checkpoint import CheckpointCorruptError
from subspace_optax._src.state.checkpoint import CheckpointMismatchError
from subspace_optax._src.state.checkpoint import CheckpointSkippedWarning
from subspace_optax._src.state.checkpoint import restore_checkpoint
from subspace_optax._src.state.checkpoint import restore_latest
from subspace_optax._src.state.checkpoint import save_checkpoint
from subspace_optax._src.state.sizes import state_bytes
from subspace_optax._src.arguments import static_args
from subspace_optax._src.pipeline.sharding import state_shardings

__version__ = '0.1.0'

__all__ = (
    # Submodules.
    'bases',
    'continual',
    'merging',
    'state_sizes',
    'refresh',
    'transforms',
    # The pipeline.
    'DimensionNumbers',
    'conv_kernels',
    'last_two_axes',
    'low_rank',
    'SubspaceState',
    'NotLayerSeparableError',
    'per_layer_train_step',
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
    # Fine-tuning in the weights' singular subspaces.
    'effort',
    'Factorization',
    'lora',
    'milora',
    'pissa',
    'reparameterize',
    'ReparameterizeState',
    'salt',
    'svfit',
    'weight_subspace',
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
    'stochastic_rounding',
    'StochasticRoundingState',
    # Tools on states.
    'FullSizeWarning',
    'summary',
    'check_compatible',
    'check_config',
    'CheckpointCorruptError',
    'CheckpointMismatchError',
    'CheckpointSkippedWarning',
    'restore_checkpoint',
    'restore_latest',
    'save_checkpoint',
    'state_bytes',
    'state_shardings',
    'static_args',
)

# Renamed before the first release; the old name warns, and goes in 0.2.0.
__getattr__ = _deprecation.renamed_attributes('subspace_optax', {
    'memory': 'subspace_optax:state_sizes',
})
