"""Argument handling shared by the public factories.

* :func:`static_args`: the arguments ``optax.inject_hyperparams`` must leave as
  Python values (they fix shapes, or are callables it would mistake for
  schedules), declared once per factory with :func:`declare_static_args`.
* :func:`refresh_policy`: the presets' ``refresh=`` (an int ``T`` or a policy).
"""

from __future__ import annotations

import functools
import inspect
import sys
from typing import Any, Callable, TypeVar

import jax

from subspace_optax._src.refresh import every as refresh_lib

Function = TypeVar('Function', bound=Callable[..., Any])


def declare_static_args(*names: str) -> Callable[[Function], Function]:
  """Decorator: ``names`` are the factory's static arguments.

  The factory then fails at once, naming every static argument, when one of
  them arrives as an array (what ``optax.inject_hyperparams`` passes for a
  numeric argument not listed in its ``static_args``).
  """

  def decorate(factory: Function) -> Function:
    signature = inspect.signature(factory)
    unknown = set(names) - set(signature.parameters)
    if unknown:
      raise ValueError(
          f'{factory.__name__} has no parameters {sorted(unknown)}')

    @functools.wraps(factory)
    def wrapper(*args, **kwargs):
      arguments = signature.bind_partial(*args, **kwargs).arguments
      arrays = [n for n in names if isinstance(arguments.get(n), jax.Array)]
      if arrays:
        raise TypeError(
            f'{factory.__name__}(): got an array for {_quoted(arrays)}; its '
            'static arguments set shapes or are callables, so they must be '
            'Python values: with optax.inject_hyperparams pass '
            'static_args=subspace_optax.'
            f'static_args({_public_name(factory)}), i.e. '
            f'static_args={names!r}.')
      return factory(*args, **kwargs)

    wrapper.static_args = tuple(names)
    return wrapper  # pytype: disable=bad-return-type

  return decorate


def _quoted(names) -> str:
  return ', '.join(f'`{n}`' for n in names)


def _public_name(factory) -> str:
  """``subspace_optax.galore``, ``subspace_optax.continual.sculpt``, ..."""
  for module_name in ('subspace_optax', 'subspace_optax.continual'):
    module = sys.modules.get(module_name)
    if factory.__name__ in getattr(module, '__all__', ()):
      return f'{module_name}.{factory.__name__}'
  return factory.__name__


def static_args(factory: Callable[..., Any]) -> tuple[str, ...]:
  """The arguments of ``factory`` that ``inject_hyperparams`` must keep static.

  They fix array shapes (``rank``, ``refresh``, ``bits``...) or are callables
  that ``inject_hyperparams`` would otherwise call as schedules (``mask``,
  ``dimension_numbers``...). Every other numeric argument may be a schedule or
  be changed in the state. Example::

    tx = optax.inject_hyperparams(
        so.galore, static_args=so.static_args(so.galore))(
            learning_rate=1e-3, rank=64)

  Args:
    factory: a public factory of subspace_optax (``so.galore``,
      ``so.low_rank``, ``so.continual.sculpt``...).

  Returns:
    The names, in the order of the factory's signature.

  Raises:
    TypeError: ``factory`` is not a subspace_optax factory.

  Examples:
    >>> import optax
    >>> import subspace_optax as so
    >>> 'rank' in so.static_args(so.galore)
    True
    >>> tx = optax.inject_hyperparams(
    ...     so.galore, static_args=so.static_args(so.galore))(
    ...         learning_rate=1e-3, rank=2)
  """
  names = getattr(factory, 'static_args', None)
  if names is None:
    raise TypeError(
        f'{getattr(factory, "__name__", factory)!r} is not a subspace_optax '
        'factory with declared static arguments.')
  return tuple(names)


def refresh_policy(refresh: Any, stagger: bool) -> refresh_lib.RefreshPolicy:
  """A preset's ``refresh=``: an int ``T`` (``every(T, stagger)``) or a policy.

  Raises:
    TypeError: ``refresh`` is neither a positive Python int nor a policy.
    ValueError: ``refresh`` is not positive, or ``stagger=False`` is combined
      with a policy (which carries its own stagger).
  """
  if isinstance(refresh, refresh_lib.RefreshPolicy):
    if not stagger:
      raise ValueError(
          '`stagger`=False only applies to an int `refresh`; a policy carries '
          'its own, e.g. refresh=subspace_optax.refresh.every(T, '
          'stagger=False).')
    return refresh
  refresh_lib.check_period(refresh, 'refresh')
  return refresh_lib.every(int(refresh), stagger)
