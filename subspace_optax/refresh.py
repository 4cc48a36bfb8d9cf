"""Refresh policies: when each leaf's basis is recomputed.

Pass one as ``refresh=`` to :func:`subspace_optax.low_rank` or a preset; an int
``T`` there means ``every(T)``.
"""

from subspace_optax._src.refresh.every import every
from subspace_optax._src.refresh.every import EveryState
from subspace_optax._src.refresh.every import RefreshPolicy
# Lazy, layer-adaptive refresh (Q-GaLore).
from subspace_optax._src.refresh.lazy import lazy
from subspace_optax._src.refresh.lazy import LazyState

__all__ = (
    'every',
    'EveryState',
    'lazy',
    'LazyState',
    'RefreshPolicy',
)
