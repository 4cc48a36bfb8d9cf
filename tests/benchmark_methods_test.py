"""Tests of the benchmarks' method table (benchmarks/methods.py): the registry,
its analytic state sizes and learning-rate ratios, and that the benchmarks
import no method table from the examples."""

import pathlib
import re

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from benchmarks import methods
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


def test_benchmarks_import_no_method_table_from_the_examples():
  """The benchmarks may import the example's model and data, never its
  optimizers (the method table is the benchmarks' own)."""
  pattern = re.compile(r'^\s*(from|import)\s+examples\.lm(\.|\s+import\s+)'
                       r'(optimizers|methods)\b', re.M)
  offenders = [str(p.relative_to(ROOT))
               for p in sorted((ROOT / 'benchmarks').rglob('*.py'))
               if pattern.search(p.read_text())]
  assert not offenders
