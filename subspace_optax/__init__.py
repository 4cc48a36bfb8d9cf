"""subspace_optax: composable optax transforms for low-rank training and continual learning."""

from subspace_optax import bases
from subspace_optax import refresh
# --- core pipeline (lead) ---
from subspace_optax._src.adam import scale_by_torch_adam
from subspace_optax._src.adam import ScaleByTorchAdamState
from subspace_optax._src.alias import galore
from subspace_optax._src.layout import DimensionNumbers
from subspace_optax._src.layout import last_two_axes
from subspace_optax._src.low_rank import low_rank
from subspace_optax._src.low_rank import SubspaceState
from subspace_optax._src.memory import galore_bytes
from subspace_optax._src.memory import state_bytes
# --- low-rank method family ---
from subspace_optax._src.auon import auon
from subspace_optax._src.auon import auon_bytes
from subspace_optax._src.auon import scale_by_aspect_ratio
from subspace_optax._src.auon import scale_by_auon
from subspace_optax._src.auon import ScaleByAuonState
from subspace_optax._src.dct import dct_adamw
from subspace_optax._src.dct import dct_adamw_bytes
from subspace_optax._src.importance import i3s
from subspace_optax._src.momentum_reset import reset_moments
from subspace_optax._src.momentum_reset import reset_moments_every
from subspace_optax._src.momentum_reset import ResetMomentsState
from subspace_optax._src.online_pca import online_subspace_descent
from subspace_optax._src.online_pca import online_subspace_descent_bytes
from subspace_optax._src.online_pca import scale_by_lion_momentum
from subspace_optax._src.radial import adamp
from subspace_optax._src.radial import adamp_bytes
from subspace_optax._src.radial import project_radial
from subspace_optax._src.radial import ProjectRadialState
from subspace_optax._src.radial import scale_by_torch_nesterov_adam
from subspace_optax._src.radial import sgdp
from subspace_optax._src.random_bases import golore
from subspace_optax._src.refactorize import refactorize
# FRUGAL, Fira, APOLLO, Q-GaLore and their pieces.
from subspace_optax._src.apollo import apollo
from subspace_optax._src.apollo import apollo_bytes
from subspace_optax._src.apollo import apollo_mini
from subspace_optax._src.apollo import apollo_scaling
from subspace_optax._src.apollo import scale_gradient_by_subspace
from subspace_optax._src.bias_correction import scale_by_adam_moments
from subspace_optax._src.bias_correction import scale_by_bias_correction
from subspace_optax._src.bias_correction import ScaleByAdamMomentsState
from subspace_optax._src.bias_correction import ScaleByBiasCorrectionState
from subspace_optax._src.fira import fira
from subspace_optax._src.fira import fira_bytes
from subspace_optax._src.fira import fira_residual
from subspace_optax._src.fira import scale_residual_by_subspace
from subspace_optax._src.fira import subspace_norm_ratio
from subspace_optax._src.frugal import frugal
from subspace_optax._src.frugal import frugal_bytes
from subspace_optax._src.frugal import scale_by_resettable_adam
from subspace_optax._src.frugal import ScaleByResettableAdamState
from subspace_optax._src.norm_growth import clip_norm_growth
from subspace_optax._src.norm_growth import ClipNormGrowthState
from subspace_optax._src.q_galore import q_galore
from subspace_optax._src.q_galore import q_galore_bytes
from subspace_optax._src.quantize import dequantize
from subspace_optax._src.quantize import quantize
from subspace_optax._src.quantize import QuantizedMatrix
from subspace_optax._src.quantize import stochastic_round
# --- continual learning ---
from subspace_optax import continual
from subspace_optax._src.continual import gpm
from subspace_optax._src.continual import sculpt
from subspace_optax._src.orthogonal import orthogonal_to
from subspace_optax._src.protected import OrthogonalState
from subspace_optax._src.protected import ProtectedSubspace
from subspace_optax._src.regularizers import ewc
from subspace_optax._src.regularizers import l2_to_anchor
from subspace_optax._src.regularizers import rewarm_schedule
# --- sharding and performance ---
from subspace_optax._src.sharding import state_shardings
# --- reliability ---
from subspace_optax._src.checkpoint import check_compatible

__version__ = '0.1.0'
# --- added by adam ---
from subspace_optax._src.quantized_moments import quantize_moments
# --- added by reliability ---
from subspace_optax._src.master_weights import master_weights
