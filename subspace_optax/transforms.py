"""Adam and Lion variants the named methods are built from.

optax's own ``scale_by_adam`` and ``scale_by_lion`` are the first choice inside
:func:`subspace_optax.low_rank`. These variants reproduce the reference code of
the named methods (GaLore's Adam with ``ε`` inside the bias correction,
FRUGAL's restartable bias correction, Adam split into its moment ratio and its
bias correction around a projection as in Fira and APOLLO, Lion's momentum
before the sign as in Online Subspace Descent, AdamP's Nesterov Adam), for
composing a method from the same parts.
"""

from subspace_optax._src.transforms.adam import scale_by_torch_adam
from subspace_optax._src.transforms.adam import ScaleByTorchAdamState
from subspace_optax._src.transforms.adam import scale_by_adam_moments
from subspace_optax._src.transforms.adam import scale_by_bias_correction
from subspace_optax._src.transforms.adam import ScaleByAdamMomentsState
from subspace_optax._src.transforms.adam import ScaleByBiasCorrectionState
from subspace_optax._src.transforms.adam import scale_by_resettable_adam
from subspace_optax._src.transforms.adam import ScaleByResettableAdamState
from subspace_optax._src.transforms.lion import scale_by_lion_momentum
from subspace_optax._src.transforms.adam import scale_by_torch_nesterov_adam

__all__ = (
    'scale_by_adam_moments',
    'scale_by_bias_correction',
    'scale_by_lion_momentum',
    'scale_by_resettable_adam',
    'scale_by_torch_adam',
    'scale_by_torch_nesterov_adam',
    'ScaleByAdamMomentsState',
    'ScaleByBiasCorrectionState',
    'ScaleByResettableAdamState',
    'ScaleByTorchAdamState',
)
