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
# --- low-rank method family (issue 3) ---
# --- continual learning (issue 4) ---
# --- sharding and performance (issue 6) ---

__version__ = '0.1.0'
