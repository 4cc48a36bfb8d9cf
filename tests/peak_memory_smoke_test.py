"""Smoke tests of the ahead-of-time memory benchmarks (tiny shapes).

The peak formula and the split are checked against tree sizes computed
independently, so a wrong term (alias not subtracted, state counted twice,
gradients missing) fails here; the GPU script runs end to end on CPU.
"""

import dataclasses

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from benchmarks import gpu_check
from benchmarks import peak_memory
from benchmarks import roofline
from examples.lm import model as model_lib

pytestmark = pytest.mark.slow

SHAPE = peak_memory.SMOKE_SHAPES['smoke']


@pytest.fixture(scope='module')
def meter():
  return peak_memory.Meter({'smoke': SHAPE}, vocab_size=256)


def test_peak_is_arguments_plus_temporaries_minus_donated(meter):
  row = meter.row('adamw', 'smoke', 'float32')
  memory, sizes = row['memory_analysis'], row['sizes']
  assert row['checks'] == {'argument_is_params_state_tokens': True,
                           'alias_is_params_state': True}
  # Donated params and state are written in place: almost no output is new.
  assert memory['output'] - memory['alias'] < 1e-3 * memory['output']
  assert row['peak_bytes'] == (sizes['params'] + sizes['optimizer_state']
                               + sizes['tokens'] + memory['temp']
                               + memory['output'] - memory['alias'])
  # The step's temporaries hold at least the gradients.
  assert memory['temp'] >= sizes['gradients']


def test_state_split_matches_adam_and_the_low_rank_state(meter):
  adamw = meter.row('adamw', 'smoke', 'float32')
  galore = meter.row('galore_randomized', 'smoke', 'bfloat16')
  params = adamw['sizes']['params']
  assert adamw['sizes']['optimizer_state'] == 2 * params + 4  # mu, nu, count
  assert galore['sizes']['params'] == params // 2  # bfloat16
  assert galore['sizes']['gradients'] == galore['sizes']['params']
  _, abstract = peak_memory.abstract_params(
      peak_memory.model_config(SHAPE, True, 256), 'bfloat16')
  tx = peak_memory.METHODS['galore_randomized'].build(SHAPE.rank, 0)
  assert galore['sizes']['optimizer_state'] == peak_memory.tree_bytes(
      jax.eval_shape(tx.init, abstract))


def test_ratios_and_fit_search(meter):
  rows = [meter.row(n, 'smoke', 'float32')
          for n in ('adamw', 'galore_randomized')]
  peak_memory.add_ratios(rows)
  assert rows[0]['peak_vs_adamw'] == 1.0
  assert rows[1]['state_vs_adamw'] < 1.0
  peak = rows[0]['peak_bytes']
  assert peak_memory.largest_fitting(meter, 'adamw', 'float32', ['smoke'],
                                     peak) == 'smoke'
  assert peak_memory.largest_fitting(meter, 'adamw', 'float32', ['smoke'],
                                     peak - 1) is None


def test_roofline_counts_match_xla_on_the_written_out_step():
  case = roofline.SMOKE_CASES['smoke']
  result = roofline.analyse(case)
  checks = result['checks']
  # XLA counts the two projections' flops like the formula (within the
  # element-wise estimate).
  assert 0.9 < checks['galore_steady_matmul_flops_xla_over_analytic'] < 1.1
  assert result['galore_bytes_vs_adamw'] < 1.0
  hardware = roofline.HARDWARE['H100_SXM_80GB']
  counts = {'bytes': 3.35e12, 'matmul_flops': 66.9e12 * 2}
  bound = roofline.limit(counts, hardware, 'highest_f32')
  assert bound['bound'] == 'compute' and bound['limit_ms'] == pytest.approx(
      2000.0)


def test_gpu_check_runs_on_cpu(tmp_path):
  out = tmp_path / 'gpu.json'
  result = gpu_check.main(['--smoke', '--out', str(out)])
  assert out.exists()
  assert all('error' not in row for row in result['rows'])
  # optax.contrib.galore runs only where layers are unstacked.
  ran = {(row['case'], row['method']) for row in result['rows']}
  assert ('smoke_unstacked', 'optax_galore') in ran
  assert ('smoke', 'optax_galore') not in ran
  goal = result['goals']['smoke/galore_randomized']
  assert set(goal['ratios']) == set(gpu_check.BOUNDS)
  for row in result['rows']:
    assert row['aot_memory']['peak'] > 0


@pytest.mark.parametrize('scan_layers', [True, False])
def test_remat_recomputes_the_same_loss_and_gradients(scan_layers):
  def loss_and_grads(remat):
    config = model_lib.Config(dim=16, layers=2, heads=2, ffn_dim=32,
                              max_seq_len=8, scan_layers=scan_layers,
                              remat=remat)
    graphdef, state = nnx.split(model_lib.Llama(config, rngs=nnx.Rngs(0)))
    tokens = jnp.arange(16, dtype=jnp.int32).reshape(2, 8) % 256
    loss_fn = peak_memory.loss_function(graphdef)
    return jax.value_and_grad(loss_fn)(nnx.as_pure(state), tokens, tokens)

  (loss, grads), (loss_remat, grads_remat) = map(loss_and_grads, (False, True))
  assert loss == pytest.approx(float(loss_remat), rel=1e-6)
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_remat)):
    assert jnp.allclose(a, b, rtol=1e-5, atol=1e-7)


def test_remat_lowers_the_compiled_activation_memory():
  shape = peak_memory.Shape(64, 4, 2, 160, 8, 128)

  def activation_temp(remat):
    config = dataclasses.replace(
        peak_memory.model_config(shape, True, 256), remat=remat)
    graphdef, params = peak_memory.abstract_params(config, 'float32')
    tokens = peak_memory.tokens(shape)
    compiled, _ = peak_memory.compile_program(
        jax.grad(peak_memory.loss_function(graphdef)), params, tokens, tokens)
    return peak_memory.memory_of(compiled)['temp']

  assert activation_temp(True) < 0.7 * activation_temp(False)
