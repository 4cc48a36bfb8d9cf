"""benchmarks/quality_bf16.py: the variants and the summary (the run itself
is benchmarks work; its result is benchmarks/results/
quality_cpu_bf16_stochastic_3seeds.json)."""

import jax.numpy as jnp
import optax
import pytest

from benchmarks import quality_bf16


def test_variants_differ_only_in_how_the_update_is_applied():
  params = {'w': jnp.ones(2048, jnp.bfloat16)}
  grads = {'w': jnp.full(2048, 1e-3)}
  moved = {}
  for variant in quality_bf16.VARIANTS:
    last = quality_bf16.last_transform(variant, seed=0)
    tx = optax.sgd(1.0) if last is None else optax.chain(optax.sgd(1.0), last)
    updates, _ = tx.update(grads, tx.init(params), params)
    moved[variant] = float(jnp.mean(
        optax.apply_updates(params, updates)['w'].astype(jnp.float32) != 1))
  assert moved['nearest'] == 0  # 1e-3 is below half of bfloat16's step
  assert moved['master'] == 0  # the master copy moved; the params not yet
  # Below 1 bfloat16's step is 2^-8: about 1e-3 / 2^-8 = 0.256 of them move.
  assert 0.2 < moved['stochastic'] < 0.31


def test_unknown_variant_and_summary():
  with pytest.raises(ValueError, match='Unknown variant'):
    quality_bf16.last_transform('fp8', 0)
  out = quality_bf16.summarise([{'val_loss': 2.0}, {'val_loss': 1.0},
                                {'val_loss': 1.5}])
  assert out == {'median_val_loss': 1.5, 'min_val_loss': 1.0,
                 'max_val_loss': 2.0, 'spread': 1.0}
  args = quality_bf16.parse_args(['--quick', '--seeds', '0'])
  assert args.quick and args.seeds == '0'
