"""Refresh policies: when each leaf's basis is recomputed.

Pass one as ``refresh=`` to :func:`subspace_optax.low_rank` or a preset; an int
``T`` there means ``every(T)``.
"""

from subspace_optax._src import deprecation as _deprecation
from subspace_optax._src.refresh import every
from subspace_optax._src.refresh import EveryState
from subspace_optax._src.refresh import RefreshPolicy
# Lazy, layer-adaptive refresh (Q-GaLore).
from subspace_optax._src.lazy_refresh import lazy
from subspace_optax._src.lazy_refresh import LazyState

__all__ = (
    'every',
    'EveryState',
    'lazy',
    'LazyState',
    'RefreshPolicy',
)

# Internals that left the public namespace in 0.2.0 (removed in the next one).
__getattr__ = _deprecation.moved_attributes('subspace_optax.refresh', {
    'resolve': 'subspace_optax._src.refresh',
})
