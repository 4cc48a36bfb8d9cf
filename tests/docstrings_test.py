"""Every public name is documented in optax's style.

The rule, for each name in ``__all__`` of the public modules (``subspace_optax``
and its ``bases``, ``refresh``, ``transforms``, ``state_sizes`` and
``continual``):

* every function and class has a docstring;
* every function has ``Args:`` (when it takes arguments), ``Returns:`` and
  ``Examples:`` sections; the examples are doctests, run by
  ``--doctest-modules`` on ``subspace_optax/`` (tiny arrays, well under a
  second each);
* classes (states, NamedTuples, dataclasses, warnings) need only the
  docstring: their fields are documented where they are returned.
"""

import inspect

import pytest

import subspace_optax as so

MODULES = {
    'subspace_optax': so,
    'subspace_optax.bases': so.bases,
    'subspace_optax.refresh': so.refresh,
    'subspace_optax.transforms': so.transforms,
    'subspace_optax.state_sizes': so.state_sizes,
    'subspace_optax.continual': so.continual,
    'subspace_optax.merging': so.merging,
}


def _public():
  for module_name, module in MODULES.items():
    for name in module.__all__:
      obj = getattr(module, name)
      if not inspect.ismodule(obj):
        yield f'{module_name}.{name}', obj


PUBLIC = dict(_public())


def _missing(obj) -> list[str]:
  doc = inspect.getdoc(obj) or ''
  if not doc.strip():
    return ['a docstring']
  if inspect.isclass(obj):
    return []
  missing = []
  try:
    takes_arguments = bool(inspect.signature(obj).parameters)
  except (TypeError, ValueError):
    takes_arguments = True
  if takes_arguments and 'Args:' not in doc:
    missing.append('Args:')
  for section in ('Returns:', 'Examples:'):
    if section not in doc:
      missing.append(section)
  return missing


@pytest.mark.parametrize('name', sorted(PUBLIC))
def test_public_docstring_has_the_sections(name):
  missing = _missing(PUBLIC[name])
  assert not missing, f'{name} lacks {", ".join(missing)}'


def test_examples_are_doctests():
  for name, obj in PUBLIC.items():
    if inspect.isclass(obj):
      continue
    doc = inspect.getdoc(obj) or ''
    examples = doc.split('Examples:', 1)[-1]
    assert '>>> ' in examples, f'{name}: Examples: has no doctest'
