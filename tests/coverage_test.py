"""Leaves kept at full size are reported at init (FullSizeWarning)."""

import warnings

import jax.numpy as jnp
import optax
import pytest

import subspace_optax as so


def _init_warnings(tx, params) -> list[str]:
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter('always')
    tx.init(params)
  return [str(w.message) for w in caught
          if issubclass(w.category, so.FullSizeWarning)]


def _adam_low_rank(rank, **kwargs):
  return so.low_rank(optax.scale_by_adam(), rank=rank, **{'side': 'compact', **kwargs})


def test_stacked_and_conv_leaves_under_default_dimension_numbers_warn():
  params = {'conv': jnp.ones((3, 3, 8, 16)), 'stack': jnp.ones((4, 256, 64)),
            'w': jnp.ones((64, 32)), 'b': jnp.ones((8,))}
  messages = _init_warnings(_adam_low_rank(8), params)
  assert len(messages) == 1  # one warning naming every leaf
  message = messages[0]
  assert "['conv'] (3, 3, 8, 16)" in message
  assert "['stack'] (4, 256, 64)" in message
  assert 'subspace_optax.last_two_axes' in message
  assert 'subspace_optax.conv_kernels' in message
  assert "['w']" not in message and "['b']" not in message


def test_the_documented_recipes_silence_the_warning():
  stack = {'stack': jnp.ones((4, 256, 64))}
  conv = {'conv': jnp.ones((3, 3, 8, 16))}
  assert not _init_warnings(
      _adam_low_rank(8, dimension_numbers=so.last_two_axes), stack)
  assert not _init_warnings(
      _adam_low_rank(8, dimension_numbers=so.conv_kernels), conv)


def test_a_clamped_rank_is_named_with_both_sizes():
  """rank=64 on 64x64 keeps 64·(64 + 128) floats against Adam's 2·64·64."""
  messages = _init_warnings(_adam_low_rank(64), {'w': jnp.ones((64, 64))})
  assert len(messages) == 1
  assert '12288 floats' in messages[0] and '8192' in messages[0]
  messages = _init_warnings(_adam_low_rank(100), {'w': jnp.ones((64, 32))})
  assert 'rank=100 clamped to min(m, n)=32' in messages[0]


@pytest.mark.parametrize('rank, warns', [
    # (k, l) = (64, 32): the state r (k + 2l) = 128 r is below Adam's
    # 2kl = 4096 exactly while r < 32.
    (31, False), (32, True)])
def test_the_threshold_is_where_low_rank_stops_saving(rank, warns):
  messages = _init_warnings(_adam_low_rank(rank), {'w': jnp.ones((64, 32))})
  assert bool(messages) == warns


def test_small_ranks_and_vectors_do_not_warn():
  params = {'w': jnp.ones((64, 32)), 'b': jnp.ones((32,)),
            'empty': jnp.ones((0, 3, 4))}
  assert not _init_warnings(so.galore(1e-3, rank=0.25, side='compact'), params)


def test_conv_kernels_reads_hwio_as_one_im2col_matrix():
  params = {'conv': jnp.ones((3, 3, 8, 16)), 'dense': jnp.ones((8, 4)),
            'b': jnp.ones((4,))}
  numbers = so.conv_kernels(params)
  assert numbers['conv'] == so.DimensionNumbers((0, 1, 2), -1)
  assert numbers['dense'] == so.DimensionNumbers((0,), -1)
  assert numbers['b'] is None
  state = so.galore(1e-3, rank=2, dimension_numbers=so.conv_kernels, side='compact').init(
      params)
  # One (H·W·I, O) = (72, 16) matrix; compact side: the basis spans 72 rows.
  assert state[0].basis['conv'].shape == (72, 2)
