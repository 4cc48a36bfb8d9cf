"""Continual learning: orthogonal updates, memories, baselines and metrics.

Fine-tune one model on a sequence of tasks without forgetting, without extra
parameters per task and without storing old gradients::

  import subspace_optax as so
  from subspace_optax import continual

  tx = continual.sculpt(1e-3, weight_decay=1e-2)     # AdamW -> orthogonal_to
  opt_state = tx.init(params)
  for task in tasks:
    params, opt_state = train(params, opt_state, task)
    memory = continual.sculpt_memory(params)          # important directions
    opt_state = continual.set_memory(opt_state, memory)

See :func:`orthogonal_to` for the projection modes and where each method's
formula comes from.
"""

from subspace_optax._src import deprecation as _deprecation
# Orthogonal updates and their memory.
from subspace_optax._src.continual.memory_updates import add_directions
from subspace_optax._src.continual.memory_updates import get_memory
from subspace_optax._src.continual.memory_updates import set_memory
from subspace_optax._src.continual.orthogonal import orthogonal_to
from subspace_optax._src.continual.orthogonal import project_out
from subspace_optax._src.continual.protected import empty_memory
from subspace_optax._src.continual.protected import OrthogonalState
from subspace_optax._src.continual.protected import protected_fraction
from subspace_optax._src.continual.protected import ProtectedSubspace
# Memory builders (task boundaries).
from subspace_optax._src.continual.sculpt_memory import activation_importance
from subspace_optax._src.continual.gpm_memory import gpm_memory
from subspace_optax._src.continual.gpm_memory import gradient_memory
from subspace_optax._src.continual.sculpt_memory import released_rank
from subspace_optax._src.continual.capture import layer_inputs
from subspace_optax._src.continual.sculpt_memory import sculpt_memory
from subspace_optax._src.finetune.weight_bases import weight_subspace_basis
from subspace_optax._src.utils import RankClampedWarning
# Presets.
from subspace_optax._src.continual.presets import gpm
from subspace_optax._src.continual.presets import gpm_ewc
from subspace_optax._src.continual.presets import sculpt
from subspace_optax._src.continual.presets import sculpt_capacity
# Baselines and schedules.
from subspace_optax._src.continual.regularizers import AnchorState
from subspace_optax._src.continual.regularizers import consolidate_ewc
from subspace_optax._src.continual.regularizers import ewc
from subspace_optax._src.continual.regularizers import EwcState
from subspace_optax._src.continual.regularizers import fisher_diagonal
from subspace_optax._src.continual.regularizers import l2_to_anchor
from subspace_optax._src.continual.regularizers import rewarm_schedule
# Metrics.
from subspace_optax._src.continual.metrics import accuracy_matrix
from subspace_optax._src.continual.metrics import average_accuracy
from subspace_optax._src.continual.metrics import backward_transfer
from subspace_optax._src.continual.metrics import forgetting
from subspace_optax._src.continual.metrics import forward_transfer
from subspace_optax._src.continual.metrics import record
from subspace_optax._src.continual.metrics import accuracy_summary

__all__ = (
    'accuracy_matrix',
    'activation_importance',
    'add_directions',
    'AnchorState',
    'accuracy_summary',
    'average_accuracy',
    'backward_transfer',
    'consolidate_ewc',
    'empty_memory',
    'ewc',
    'EwcState',
    'fisher_diagonal',
    'forgetting',
    'forward_transfer',
    'get_memory',
    'gpm',
    'gpm_ewc',
    'gpm_memory',
    'gradient_memory',
    'l2_to_anchor',
    'layer_inputs',
    'orthogonal_to',
    'OrthogonalState',
    'project_out',
    'protected_fraction',
    'ProtectedSubspace',
    'RankClampedWarning',
    'record',
    'released_rank',
    'rewarm_schedule',
    'sculpt',
    'sculpt_capacity',
    'sculpt_memory',
    'set_memory',
    'weight_subspace_basis',
)

# Renamed before the first release; the old name warns, and goes in 0.2.0.
__getattr__ = _deprecation.renamed_attributes('subspace_optax.continual', {
    'summary': 'subspace_optax.continual:accuracy_summary',
})
