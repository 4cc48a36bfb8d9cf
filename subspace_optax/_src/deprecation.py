"""Deprecated names: renamed keyword arguments and moved module attributes.

Each old name keeps working for one release and warns with a
``DeprecationWarning`` that names its replacement (listed in CHANGELOG.md).
"""

from __future__ import annotations

import functools
import importlib
from typing import Any, Callable, TypeVar
import warnings

Function = TypeVar('Function', bound=Callable[..., Any])


def renamed_arguments(**renames: str) -> Callable[[Function], Function]:
  """Decorator: keyword ``old=value`` is passed on as ``new=value``, warning.

  Example: ``@renamed_arguments(refresh_every='refresh')``. Giving both the old
  and the new name is a ``TypeError`` (which value was meant is unknown).

  Args:
    **renames: ``old_name='new_name'`` pairs.
  """

  def decorate(function: Function) -> Function:

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
      for old, new in renames.items():
        if old not in kwargs:
          continue
        if new in kwargs:
          raise TypeError(
              f'{function.__name__}() got both `{old}` and `{new}`; `{old}` is '
              f'the deprecated name of `{new}`: pass only `{new}`.')
        warnings.warn(
            f'{function.__name__}(): `{old}` is deprecated and will be removed '
            f'in the next release; use `{new}` instead.',
            DeprecationWarning, stacklevel=2)
        kwargs[new] = kwargs.pop(old)
      return function(*args, **kwargs)

    wrapper.renamed_arguments = dict(renames)
    return wrapper  # pytype: disable=bad-return-type

  return decorate


def moved_attributes(module_name: str,
                     moves: dict[str, str]) -> Callable[[str], Any]:
  """A module ``__getattr__`` serving moved names, with a warning.

  Args:
    module_name: the module whose old names these are (for the messages).
    moves: ``old_name -> 'new.module:new_name'`` (``new_name`` defaults to
      ``old_name``), e.g. ``{'galore_bytes': 'subspace_optax.memory'}``. A
      target under ``subspace_optax._src`` marks an internal leaving the API.

  Returns:
    A function to assign to the module's ``__getattr__``.
  """

  def __getattr__(name: str) -> Any:  # pylint: disable=invalid-name
    if name not in moves:
      raise AttributeError(
          f'module {module_name!r} has no attribute {name!r}')
    target, _, new_name = moves[name].partition(':')
    new_name = new_name or name
    if '._src.' in target:  # an internal that left the public namespace
      advice = 'it is internal to subspace_optax'
    else:
      advice = f'use {target}.{new_name} instead'
    warnings.warn(
        f'{module_name}.{name} is deprecated and will be removed in the next '
        f'release; {advice}.', DeprecationWarning, stacklevel=2)
    return getattr(importlib.import_module(target), new_name)

  return __getattr__
