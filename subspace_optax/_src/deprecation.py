"""Names renamed before the first release, still served with a warning.

Each old name warns with a ``DeprecationWarning`` that names its replacement
(listed in CHANGELOG.md) and is removed in 0.2.0.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable

from subspace_optax._src import utils


def renamed_attributes(module_name: str,
                       renames: dict[str, str]) -> Callable[[str], Any]:
  """A module ``__getattr__`` serving renamed attributes, with a warning.

  Args:
    module_name: the module whose old names these are (for the messages).
    renames: ``old_name -> 'module:new_name'``, e.g.
      ``{'memory': 'subspace_optax:state_sizes'}``.

  Returns:
    A function to assign to the module's ``__getattr__``.
  """

  def __getattr__(name: str) -> Any:  # pylint: disable=invalid-name
    if name not in renames:
      raise AttributeError(
          f'module {module_name!r} has no attribute {name!r}')
    target, _, new_name = renames[name].partition(':')
    utils.warn_at_caller(
        f'{module_name}.{name} is deprecated and will be removed in 0.2.0; '
        f'use {target}.{new_name} instead.', DeprecationWarning)
    return getattr(importlib.import_module(target), new_name)

  return __getattr__
