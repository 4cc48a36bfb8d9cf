"""Analytic optimizer-state sizes, one formula per method.

Each ``<method>_bytes(params, ...)`` gives the exact bytes of that method's
state for ``params`` (arrays or ``jax.ShapeDtypeStruct``), without building it;
:func:`subspace_optax.state_bytes` measures any state.
"""

from subspace_optax._src.state.sizes import adamp_bytes
from subspace_optax._src.state.residual_sizes import apollo_bytes
from subspace_optax._src.state.sizes import auon_bytes
from subspace_optax._src.state.sizes import dct_adamw_bytes
from subspace_optax._src.state.residual_sizes import fira_bytes
from subspace_optax._src.state.residual_sizes import frugal_bytes
from subspace_optax._src.state.sizes import galore_bytes
from subspace_optax._src.state.sizes import online_subspace_descent_bytes
from subspace_optax._src.state.sizes import q_galore_bytes

__all__ = (
    'adamp_bytes',
    'apollo_bytes',
    'auon_bytes',
    'dct_adamw_bytes',
    'fira_bytes',
    'frugal_bytes',
    'galore_bytes',
    'online_subspace_descent_bytes',
    'q_galore_bytes',
)
