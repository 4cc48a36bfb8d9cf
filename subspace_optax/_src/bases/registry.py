"""The built-in basis methods by name, for ``basis='svd'`` and the like."""

from __future__ import annotations

from typing import Callable

from subspace_optax._src.bases import base as bases_lib
from subspace_optax._src.bases import dct
from subspace_optax._src.bases import importance
from subspace_optax._src.bases import index
from subspace_optax._src.bases import online_pca
from subspace_optax._src.bases import random_matrices
from subspace_optax._src.bases import seeded
from subspace_optax._src.bases import singular

# Every built-in basis method by name: its factory, whose arguments all have
# defaults.
BUILT_IN: dict[str, Callable[[], bases_lib.BasisMethod]] = {
    'svd': singular.svd,
    'randomized': singular.randomized,
    'online_pca': online_pca.online_pca,
    'random_orthonormal': random_matrices.random_orthonormal,
    'gaussian': random_matrices.gaussian,
    'random_columns': index.random_columns,
    'blocks': index.blocks,
    'dct': dct.dct,
    'importance_sampled': importance.importance_sampled,
    'seeded_gaussian': seeded.seeded_gaussian,
}

# Short names accepted wherever a basis name is (FRUGAL's reference names).
ALIASES: dict[str, str] = {
    'random': 'random_orthonormal',
    'columns': 'random_columns',
}


def names() -> list[str]:
  """Every name ``basis=`` accepts: :data:`BUILT_IN` and :data:`ALIASES`.

  Returns:
    The names, sorted.

  Examples:
    >>> from subspace_optax._src.bases import registry
    >>> 'random' in registry.names() and 'svd' in registry.names()
    True
  """
  return sorted({*BUILT_IN, *ALIASES})


def resolve(basis: str | bases_lib.BasisMethod) -> bases_lib.BasisMethod:
  """A basis method from its name (default arguments) or itself.

  Args:
    basis: a name of :data:`BUILT_IN` or :data:`ALIASES` (``'random'``: random
      orthonormal, ``'columns'``: random columns), or a :class:`BasisMethod`
      (for other arguments, or a method of your own, e.g.
      ``basis=subspace_optax.bases.randomized(oversample=16)``).

  Returns:
    The :class:`BasisMethod`.

  Raises:
    ValueError: for an unknown name, listing the valid ones.

  Examples:
    >>> from subspace_optax._src.bases import registry
    >>> registry.resolve('random').name
    'random_orthonormal'
  """
  if isinstance(basis, bases_lib.BasisMethod):
    return basis
  if isinstance(basis, str):
    name = ALIASES.get(basis, basis)
    if name in BUILT_IN:
      return BUILT_IN[name]()
  raise ValueError(
      f'Unknown basis {basis!r}: `basis` must be one of {names()} '
      '(subspace_optax.bases.<name>() for other arguments) or a '
      'subspace_optax.bases.BasisMethod.'
  )
