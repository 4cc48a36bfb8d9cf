"""Basis methods: how each matrix's subspace is chosen (public namespace)."""

from subspace_optax._src.bases import align_signs
from subspace_optax._src.bases import BasisMethod
from subspace_optax._src.bases import orthonormalize
from subspace_optax._src.bases import randomized
from subspace_optax._src.bases import register
from subspace_optax._src.bases import resolve
from subspace_optax._src.bases import svd
