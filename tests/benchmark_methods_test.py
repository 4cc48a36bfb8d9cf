"""Tests of the benchmarks' method tables (benchmarks/methods.py: the
registry, its analytic state sizes and learning-rate ratios;
benchmarks/continual_methods.py: the continual methods, built as the examples
build them), and that the benchmarks import no method table from the
examples."""

import ast
import pathlib
import re

import jax
import jax.numpy as jnp
import optax
import pytest
from flax import nnx

from benchmarks import continual_methods
from benchmarks import methods
from examples import continual_common
from examples.lm import model as model_lib

pytestmark = pytest.mark.slow

TINY = model_lib.Config(dim=32, layers=2, heads=2, ffn_dim=64, max_seq_len=32)
ROOT = pathlib.Path(__file__).resolve().parents[1]


def _params(scan_layers):
  config = model_lib.Config(**{**TINY.__dict__, 'scan_layers': scan_layers})
  abstract = nnx.eval_shape(lambda: model_lib.Llama(config, rngs=nnx.Rngs(0)))
  return nnx.to_pure_dict(nnx.state(abstract, nnx.Param))


def test_registry_errors():
  with pytest.raises(KeyError, match="'nope'"):
    methods.make_optimizer('nope', learning_rate_schedule=1e-3)
  with pytest.raises(TypeError, match="'adamw' takes no option"):
    methods.make_optimizer('adamw', learning_rate_schedule=1e-3, basis='svd')
  with pytest.raises(ValueError, match='already registered'):
    methods.register('adamw', methods.get('adamw'))


@pytest.mark.parametrize('scan_layers', [False, True])
def test_optax_galore_row(scan_layers):
  params = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                        _params(scan_layers))
  full = methods.state_bytes(
      methods.make_optimizer('adamw', learning_rate_schedule=1e-3)
      .init(params))
  contrib = methods.make_optimizer('optax_galore',
                                   learning_rate_schedule=1e-3, rank=4)
  if scan_layers:  # contrib galore cannot project (layers, m, n) kernels.
    with pytest.raises(ValueError, match='no-scan-layers'):
      contrib.init(params)
  else:
    assert methods.state_bytes(contrib.init(params)) < 0.75 * full


def test_analytic_state_bytes_match_the_measured_state():
  """Every row's formula (``Method.state_bytes``) is its transform's state
  size on the example model, unstacked and stacked: a formula that counted a
  moment twice, missed the basis or assumed the other side would fail here."""
  for scan_layers in (False, True):
    params = _params(scan_layers)
    for name, method in methods.REGISTRY.items():
      if method.state_bytes is None or (scan_layers and name == 'optax_galore'):
        continue
      rank = method.fixed_rank or (0.25 if isinstance(method.rank, float)
                                   else 4)
      tx = method.build(learning_rate=1e-3, rank=rank, refresh=5,
                        weight_decay=0.0, seed=0)
      measured = methods.state_bytes(jax.eval_shape(tx.init, params))
      assert method.state_bytes(params, rank) == measured, (name, scan_layers)


def test_default_learning_rates_are_the_ratios_to_adamw():
  for method in methods.REGISTRY.values():
    assert method.learning_rate == pytest.approx(
        methods.ADAMW_LEARNING_RATE * method.lr_ratio)
  assert methods.get('galore').learning_rate == pytest.approx(3e-2)


# What a method table is called in an example: the continual examples' names
# (examples/continual_common.py), as imported or read off a module.
TABLE_NAMES = {'METHODS', 'BASELINES', 'RECOMMENDED', 'PROTECTING',
               'make_method'}


def _table_uses(source: str) -> list[str]:
  """The method-table imports and reads of one benchmark's source.

  * any import of an examples module named ``methods`` or ``optimizers``
    (``examples/lm/methods.py``);
  * ``from examples... import <TABLE_NAMES>``;
  * ``<name>.<TABLE_NAMES>`` where ``<name>`` is not a module imported from
    ``benchmarks`` (an example module, imported or loaded by
    ``importlib``);
  * an example's ``run_method(...)`` or ``run(...)`` without
    ``make_method=`` (it would build the methods from the example's table).
  """
  tree = ast.parse(source)
  own, examples, found = set(), set(), []
  table_module = re.compile(r'^examples(\.\w+)*\.(methods|optimizers)$')
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      for alias in node.names:
        if table_module.match(alias.name):
          found.append(f'import {alias.name}')
        if alias.name.startswith('examples.') and alias.asname:
          examples.add(alias.asname)
        if alias.name.startswith('benchmarks.') and alias.asname:
          own.add(alias.asname)
    elif isinstance(node, ast.ImportFrom) and node.module:
      for alias in node.names:
        full = f'{node.module}.{alias.name}'
        if node.module.split('.')[0] == 'examples' and (
            alias.name in TABLE_NAMES or table_module.match(full)
            or table_module.match(node.module)):
          found.append(f'from {node.module} import {alias.name}')
        if node.module.split('.')[0] == 'benchmarks':
          own.add(alias.asname or alias.name)
        if node.module.split('.')[0] == 'examples':
          examples.add(alias.asname or alias.name)
    elif (isinstance(node, ast.Assign) and isinstance(node.value, ast.Call)
          and getattr(node.value.func, 'id', getattr(
              node.value.func, 'attr', None)) in ('_example', 'import_module')):
      examples.update(t.id for t in node.targets if isinstance(t, ast.Name))
  for node in ast.walk(tree):
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
        and node.func.attr in ('run', 'run_method')
        and isinstance(node.func.value, ast.Name)
        and node.func.value.id in examples
        and 'make_method' not in {k.arg for k in node.keywords}):
      found.append(f'{node.func.value.id}.{node.func.attr}() without '
                   f'make_method= (line {node.lineno})')
    if (isinstance(node, ast.Attribute) and node.attr in TABLE_NAMES
        and isinstance(node.value, ast.Name) and node.value.id not in own):
      found.append(f'{node.value.id}.{node.attr} (line {node.lineno})')
  return found


def test_benchmarks_import_no_method_table_from_the_examples():
  """The benchmarks may import the examples' models, data, tasks and training
  loops, never their method tables: the LM example's optimizers
  (``examples/lm/methods.py``; the benchmarks' own: ``benchmarks/methods.py``)
  or the continual examples' methods (``examples/continual_common.py``; the
  benchmarks' own: ``benchmarks/continual_methods.py``)."""
  offenders = {str(p.relative_to(ROOT)): uses
               for p in sorted((ROOT / 'benchmarks').rglob('*.py'))
               if (uses := _table_uses(p.read_text()))}
  assert not offenders


@pytest.mark.parametrize('source', [
    'from examples.lm import methods',
    'import examples.lm.methods as m',
    'from examples.lm.methods import get',
    'from examples.continual_common import METHODS',
    'from examples import continual_common as c\nc.make_method',
    'example = importlib.import_module("examples.continual")\n'
    'example.METHODS',
    'from examples import continual_lm\ncontinual_lm.run_method(1, 2, 3, 4)',
    'example = _example("split")\nexample.run(config, methods)',
])
def test_the_import_check_sees_each_way_in(source):
  assert _table_uses(source)


def test_the_import_check_allows_the_benchmarks_own_tables():
  assert not _table_uses(
      'from benchmarks import continual_methods\n'
      'from benchmarks import peak_memory\n'
      'from benchmarks.continual_methods import METHODS\n'
      'from examples import continual_lm\n'
      'continual_methods.make_method, peak_memory.METHODS\n'
      'continual_lm.run_method(1, 2, 3, 4, make_method=m)\n'
      'subprocess.run(["true"])')


class _Model:
  """A one-matrix model, enough for every method's boundary."""

  fisher_batch_size = 4
  dimension_numbers = None

  @staticmethod
  def loss_one(params, example):
    return jnp.sum((example[0] @ params['w']) ** 2)

  @staticmethod
  def importance(params, samples):
    del params, samples
    return {'w': jnp.float32(0.5)}

  @staticmethod
  def layer_inputs(params, samples):
    del params
    return {'w': samples[0]}


HYPER = {'learning_rate': 1e-2, 'strength': 10.0, 'threshold': 0.9,
         'min_fraction': 0.1, 'max_fraction': 0.5, 'weight_decay': 0.1}


@pytest.mark.parametrize('name, extra', [
    *((m, {}) for m in continual_methods.METHODS),
    ('gpm', {'optimizer': 'sgd', 'unprotected': 'freeze'}),
])
def test_the_continual_example_builds_the_benchmark_methods(name, extra):
  """The examples keep their own copy of the builder (so they run without the
  benchmarks), and their ``DEFAULTS`` were tuned with the benchmarks' table:
  the two build the same transform and boundary for every method."""
  assert continual_common.METHODS == continual_methods.METHODS
  keys = jax.random.split(jax.random.key(0), 3)
  params = {'w': jax.random.normal(keys[0], (6, 5))}
  grads = {'w': jax.random.normal(keys[1], (6, 5))}
  samples = (jax.random.normal(keys[2], (8, 6)),)
  updates = []
  for make_method in (continual_methods.make_method,
                      continual_common.make_method):
    method = make_method(name, {**HYPER, **extra}, _Model())
    state = method.tx.init(params)
    first, state = method.tx.update(grads, state, params)
    state = method.boundary(params, state, samples)
    # Away from the anchor, so that L2's and EWC's penalties count too.
    moved = optax.apply_updates(params, first)
    second, _ = method.tx.update(grads, state, moved)
    updates.append((first, second))
  same = jax.tree.map(
      lambda a, b: bool(jnp.allclose(a, b, rtol=1e-6, atol=1e-7)),
      updates[0], updates[1])
  assert all(jax.tree.leaves(same)), name
