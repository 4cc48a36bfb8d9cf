"""Refresh policies: when each leaf's basis is recomputed (public namespace)."""

from subspace_optax._src.refresh import every
from subspace_optax._src.refresh import EveryState
from subspace_optax._src.refresh import RefreshPolicy
from subspace_optax._src.refresh import resolve
# Lazy, layer-adaptive refresh (Q-GaLore).
from subspace_optax._src.lazy_refresh import lazy
from subspace_optax._src.lazy_refresh import LazyState
