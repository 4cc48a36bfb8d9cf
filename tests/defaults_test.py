"""One meaning and one documented default per shared argument.

The rule for defaults: every preset defaults to the value of its reference
implementation where it has one (the paper's released code, or the PyTorch
package it builds on), so ``eps`` is 1e-6 where the reference is GaLore's
PyTorch AdamW and 1e-8 where it is ``torch.optim.AdamW``, bitsandbytes or
``adamp``; each deliberate departure is stated in the table of defaults
(``docs/defaults.md``, columns ``preset | eps | scale | rank | refresh | side |
unprotected | reference value(s) | departure and why``). :data:`DEFAULTS` is
the same data: the signature test keeps it equal to the code, the table test
keeps ``docs/defaults.md`` equal to it (skipped until that file exists).

Shared arguments with one meaning everywhere, also checked here: ``basis``
(every preset that takes it accepts every built-in name and FRUGAL's aliases,
and names the valid ones on a typo), ``mu_dtype`` (the storage dtype of Adam's
first moment, on every Adam-based preset, counted by the ``mu_bytes`` of its
state-size formula) and ``unprotected`` (``'train'`` or ``'freeze'``).
"""

import ast
import inspect
import pathlib
import re

import jax
import jax.numpy as jnp
import optax
import pytest

import subspace_optax as so
from subspace_optax import continual as cl
from subspace_optax._src.bases import registry

TABLE = pathlib.Path(__file__).resolve().parents[1] / 'docs' / 'defaults.md'

# ``—`` in the table: the factory has no such argument, or no default for it.
NA = None
COLUMNS = ('eps', 'scale', 'rank', 'refresh', 'side', 'unprotected')
# Where an argument goes by another name.
ARGUMENT = {('auon', 'eps'): 'adam_eps'}

DEFAULTS = {
    'galore': (1e-6, 0.25, 128, 200, 'reference', NA),
    'q_galore': (1e-8, 0.25, 128, 200, 'reference', NA),
    'fira': (1e-6, 0.25, 128, 200, 'reference', NA),
    'golore': (1e-6, 0.25, 128, 200, 'reference', NA),
    'i3s': (1e-6, 0.25, 128, 200, 'reference', NA),
    'frugal': (1e-8, 1.0, 0.25, 200, 'reference', NA),
    'apollo': (1e-6, 1.0, 256, 200, 'reference', NA),
    'apollo_mini': (1e-6, 128.0, NA, 200, 'compact', NA),
    'dct_adamw': (1e-8, 1.0, 128, 200, 'reference', NA),
    'online_subspace_descent': (1e-6, 0.25, 128, NA, 'reference', NA),
    'low_rank': (NA, 1.0, NA, 200, 'reference', NA),
    'adamp': (1e-8, NA, NA, NA, NA, NA),
    'sgdp': (1e-8, NA, NA, NA, NA, NA),
    'auon': (1e-8, NA, NA, NA, NA, NA),
    'project_radial': (1e-8, NA, NA, NA, NA, NA),
    'scale_by_auon': (1e-7, NA, NA, NA, NA, NA),
    'transforms.scale_by_torch_adam': (1e-6, NA, NA, NA, NA, NA),
    'transforms.scale_by_adam_moments': (1e-6, NA, NA, NA, NA, NA),
    'transforms.scale_by_resettable_adam': (1e-8, NA, NA, NA, NA, NA),
    'transforms.scale_by_torch_nesterov_adam': (1e-8, NA, NA, NA, NA, NA),
    'continual.orthogonal_to': (NA, NA, NA, NA, NA, 'train'),
    'continual.gpm': (NA, NA, NA, NA, NA, 'freeze'),
    'continual.gpm_ewc': (1e-8, NA, NA, NA, NA, 'freeze'),
    'continual.sculpt': (1e-8, NA, NA, NA, NA, 'train'),
    'svfit': (1e-8, NA, 'energy', NA, NA, NA),
    'salt': (1e-8, NA, 0.1, NA, NA, NA),
    'effort': (1e-8, NA, 1, NA, NA, NA),
    'milora': (1e-8, NA, 16, NA, NA, NA),
    'pissa': (1e-8, NA, 16, NA, NA, NA),
    'lora': (1e-8, NA, 8, NA, NA, NA),
}

# Adam-based presets: ``mu_dtype`` stores Adam's first moment.
MU_DTYPE_PRESETS = {
    'galore': (so.galore, dict(rank=2), so.state_sizes.galore_bytes),
    'q_galore': (so.q_galore, dict(rank=2, group_size=4),
                 lambda p, r, **kw: so.state_sizes.q_galore_bytes(
                     p, r, group_size=4, **kw)),
    'fira': (so.fira, dict(rank=2), so.state_sizes.fira_bytes),
    'golore': (so.golore, dict(rank=2), so.state_sizes.galore_bytes),
    'i3s': (so.i3s, dict(rank=2), so.state_sizes.galore_bytes),
    'frugal': (so.frugal, dict(rank=0.5), so.state_sizes.frugal_bytes),
    'apollo': (so.apollo, dict(rank=2), so.state_sizes.apollo_bytes),
    'apollo_mini': (so.apollo_mini, {}, lambda p, **kw: (
        so.state_sizes.apollo_bytes(p, 1, side=inspect.signature(
            so.apollo_mini).parameters['side'].default, **kw))),
    'dct_adamw': (so.dct_adamw, dict(rank=2), so.state_sizes.dct_adamw_bytes),
    'online_subspace_descent': (so.online_subspace_descent, dict(rank=2),
                                so.state_sizes.online_subspace_descent_bytes),
    'adamp': (so.adamp, {}, lambda p, rank=None, **kw: (
        so.state_sizes.adamp_bytes(p, **kw))),
    'continual.gpm_ewc': (cl.gpm_ewc, dict(strength=1.0), None),
    'continual.sculpt': (cl.sculpt, {}, None),
}


def _factory(name):
  obj = so
  for part in name.split('.'):
    obj = getattr(obj, part)
  return obj


def _default(name, column):
  """The signature default of ``column`` in ``name``, or NA."""
  parameters = inspect.signature(_factory(name)).parameters
  parameter = parameters.get(ARGUMENT.get((name, column), column))
  if parameter is None or parameter.default is inspect.Parameter.empty:
    return NA
  return parameter.default


@pytest.mark.parametrize('name', sorted(DEFAULTS))
def test_signature_defaults_match_the_table_data(name):
  got = tuple(_default(name, column) for column in COLUMNS)
  assert got == DEFAULTS[name], dict(zip(COLUMNS, got))


def test_every_public_preset_with_a_shared_argument_is_listed():
  listed = set(DEFAULTS)
  for prefix, module in (('', so), ('continual.', so.continual),
                         ('transforms.', so.transforms)):
    for name in module.__all__:
      obj = getattr(module, name)
      if inspect.ismodule(obj) or inspect.isclass(obj) or not callable(obj):
        continue
      try:
        parameters = inspect.signature(obj).parameters
      except (TypeError, ValueError):
        continue
      if {'eps', 'adam_eps', 'unprotected'} & set(parameters) or (
          {'rank', 'refresh'} <= set(parameters)):
        assert prefix + name in listed, f'{prefix + name} missing from table'


def _cell(text):
  text = text.strip().strip('`').strip()
  if text in ('—', '-', ''):
    return NA
  return ast.literal_eval(text)


def _table_rows():
  """``{preset: {column: value}}`` from the Markdown table of TABLE."""
  header, rows = None, {}
  for line in TABLE.read_text(encoding='utf-8').splitlines():
    line = line.strip()
    if not line.startswith('|'):
      continue
    cells = [c.strip() for c in line.strip('|').split('|')]
    if header is None:
      if cells and cells[0].lower() == 'preset':
        header = [c.lower() for c in cells]
      continue
    if all(re.fullmatch(r':?-+:?', c) for c in cells):
      continue
    row = dict(zip(header, cells))
    preset = row['preset'].strip('`').strip()
    preset = preset.removeprefix('subspace_optax.').removeprefix('so.')
    rows[preset] = {c: _cell(row[c]) for c in COLUMNS if c in row}
  return rows


def test_docs_table_matches_the_code():
  if not TABLE.exists():
    pytest.skip(f'{TABLE} not written yet (the table of defaults lives there)')
  rows = _table_rows()
  assert set(rows) == set(DEFAULTS), set(rows) ^ set(DEFAULTS)
  for name, row in rows.items():
    expected = dict(zip(COLUMNS, DEFAULTS[name]))
    for column, value in row.items():
      assert value == expected[column], (name, column, value)


# --------------------------------------------------------------- basis names

PARAMS = {'w': jnp.arange(48.0).reshape(8, 6) / 48.0}


@pytest.mark.parametrize('factory', [so.galore, so.frugal, so.fira,
                                     so.q_galore])
@pytest.mark.parametrize('name', ['random', 'columns', 'random_orthonormal',
                                  'random_columns'])
def test_presets_accept_the_same_basis_names(factory, name):
  if factory is so.q_galore and name in ('columns', 'random_columns'):
    pytest.skip('q_galore quantizes a dense basis')
  tx = factory(1e-3, rank=2, basis=name)
  updates, _ = tx.update(PARAMS, tx.init(PARAMS), PARAMS)
  assert updates['w'].shape == (8, 6)


def test_an_alias_is_the_named_method():
  assert registry.resolve('random').name == 'random_orthonormal'
  assert registry.resolve('columns').name == 'random_columns'


@pytest.mark.parametrize('factory', [so.galore, so.frugal, so.apollo,
                                     so.low_rank])
def test_unknown_basis_names_the_valid_ones(factory):
  kwargs = dict(inner=so.transforms.scale_by_torch_adam(), rank=2) if (
      factory is so.low_rank) else dict(learning_rate=1e-3)
  with pytest.raises(ValueError, match=r"Unknown basis 'nope'.*'random'.*"
                     r"'random_orthonormal'.*'svd'"):
    factory(basis='nope', **kwargs).init(PARAMS)


# ------------------------------------------------------------------ mu_dtype


def _first_moments(state):
  found = []

  def visit(path, x):
    keys = jax.tree_util.keystr(path)
    if re.search(r'\.mu\b', keys) and 'optimizer_state' not in keys:
      found.append(x)

  jax.tree_util.tree_map_with_path(visit, state)
  return found


@pytest.mark.parametrize('name', sorted(MU_DTYPE_PRESETS))
def test_mu_dtype_stores_the_first_moment(name):
  factory, kwargs, size = MU_DTYPE_PRESETS[name]
  assert 'mu_dtype' in so.static_args(factory)
  params = {'w': jnp.ones((8, 6)), 'b': jnp.ones(6)}
  tx = factory(1e-3, mu_dtype=jnp.bfloat16, **kwargs)
  state = tx.init(params)
  _, state = tx.update(params, state, params)
  moments = _first_moments(state)
  assert moments and all(m.dtype == jnp.bfloat16 for m in moments), [
      m.dtype for m in moments]
  if size is not None:
    rank = kwargs.get('rank')
    sized = size(params, rank, mu_bytes=2) if rank is not None else size(
        params, mu_bytes=2)
    assert so.state_bytes(state) == sized


def test_mu_dtype_rejects_a_non_float_dtype():
  with pytest.raises(ValueError, match='`mu_dtype`'):
    so.apollo(1e-3, rank=2, mu_dtype=jnp.int8)


# --------------------------------------------------------------- unprotected


@pytest.mark.parametrize('factory,kwargs,mode', [
    (cl.orthogonal_to, {}, 'two_sided'),
    (cl.gpm, dict(learning_rate=1e-2), 'left'),
    (cl.gpm_ewc, dict(learning_rate=1e-2, strength=1.0), 'left'),
    (cl.sculpt, dict(learning_rate=1e-2), 'two_sided')])
def test_unprotected_has_one_meaning(factory, kwargs, mode):
  params = {'w': jnp.ones((6, 4)), 'b': jnp.ones(4)}
  masked = optax.MaskedNode()
  right = (masked, masked) if mode == 'left' else (jnp.eye(4)[:, :1],
                                                    jnp.array(1))
  memory = {'w': cl.ProtectedSubspace(jnp.eye(6)[:, :1], right[0],
                                      jnp.array(1), right[1]),
            'b': masked}
  grads = {'w': jnp.ones((6, 4)), 'b': jnp.ones(4)}
  for choice, moves in (('train', True), ('freeze', False)):
    tx = factory(unprotected=choice, **kwargs)
    state = cl.set_memory(tx.init(params), memory)
    updates, _ = tx.update(grads, state, params)
    assert bool(jnp.any(updates['b'] != 0)) == moves, (choice, updates['b'])
  with pytest.raises(ValueError, match='`unprotected`'):
    factory(unprotected='nope', **kwargs)
