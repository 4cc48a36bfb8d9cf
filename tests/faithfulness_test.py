"""subspace_optax.galore against galore-torch's GaLoreAdamW (the reference).

A small version of ``benchmarks/faithfulness_galore.py``; skipped unless the
``reference`` extra (torch, galore-torch) is installed.
"""

import importlib.util

import jax
import numpy as np
import pytest

# Looked up, not imported: torch and galore-torch (which imports transformers)
# take seconds to import, which every test process would pay at collection.
# The tests import them when they run.
for _package in ('torch', 'galore_torch'):
  if importlib.util.find_spec(_package) is None:
    pytest.skip(f'needs {_package} (the reference extra)',
                allow_module_level=True)

# pylint: disable=g-import-not-at-top,wrong-import-position
import subspace_optax as so
from benchmarks import faithfulness_galore as bench
# pylint: enable=g-import-not-at-top,wrong-import-position

pytestmark = pytest.mark.slow

CONFIG = bench.SMALL  # (16, 12) and (8, 20), rank 4, refresh every 3, 8 steps
BOUND = bench.BOUND  # 1e-5


@pytest.fixture(scope='module')
def runs():
  gradients = bench.gradient_stream(CONFIG)
  reference = lambda **kw: bench.run_reference(gradients, CONFIG, **kw)
  ours = lambda **kw: bench.run_subspace_optax(gradients, CONFIG, **kw)
  return {
      'reference': reference(),
      'reference_svd_flip': reference(convention='svd_flip'),
      'reference_sign_aligned': reference(convention='lapack', align_signs=True),
      'ours': ours(),  # side='reference', basis='svd', align_signs=True
      'ours_svd_flip': ours(convention='svd_flip'),
      'ours_svd_flip_unaligned': ours(convention='svd_flip', align_signs=False),
  }


def _updates(run):
  return run['updates']


T = CONFIG.refresh
FIRST_PERIOD = range(T)
AFTER_REFRESH = range(T, CONFIG.steps)
ALL_STEPS = range(CONFIG.steps)


def test_config_has_both_sides_and_several_refreshes():
  assert any(m >= n for m, n in CONFIG.shapes)  # 'right' projector
  assert any(m < n for m, n in CONFIG.shapes)  # 'left' projector
  assert CONFIG.steps > 2 * T


def test_first_period_updates_match_reference(runs):
  diff = bench.max_relative_difference(
      _updates(runs['ours']), _updates(runs['reference']), FIRST_PERIOD)
  assert diff <= BOUND


def test_refresh_subspaces_match_reference(runs):
  for step in range(0, CONFIG.steps, T):
    for ours, ref in zip(runs['ours']['bases'][step],
                         runs['reference']['bases'][step]):
      assert ours.shape == ref.shape  # same side as proj_type='std'
      assert bench.subspace_distance(ours, ref) <= BOUND


def test_reference_depends_on_the_svd_sign_convention(runs):
  diff = bench.max_relative_difference(
      _updates(runs['reference_svd_flip']), _updates(runs['reference']),
      AFTER_REFRESH)
  assert diff > 1e-2


def test_aligned_updates_do_not_depend_on_the_sign_convention(runs):
  diff = bench.max_relative_difference(
      _updates(runs['ours_svd_flip']), _updates(runs['ours']), AFTER_REFRESH)
  assert diff <= BOUND


def test_aligned_updates_match_sign_aligned_reference(runs):
  diff = bench.max_relative_difference(
      _updates(runs['ours']), _updates(runs['reference_sign_aligned']),
      ALL_STEPS)
  assert diff <= BOUND


def test_unaligned_updates_match_reference_under_same_convention(runs):
  diff = bench.max_relative_difference(
      _updates(runs['ours_svd_flip_unaligned']),
      _updates(runs['reference_svd_flip']), ALL_STEPS)
  assert diff <= BOUND


def test_compact_side_state_is_smaller_than_reference_side():
  params = [jax.ShapeDtypeStruct(s, np.float32) for s in CONFIG.shapes]
  sizes = {}
  for side in ('reference', 'compact'):
    tx = so.galore(1e-3, rank=CONFIG.rank, side=side, stagger=False)
    sizes[side] = so.state_bytes(jax.eval_shape(tx.init, params))
  # Per m x n matrix, reference: 2 r max + r min floats; compact: 2 r min + r max.
  r = CONFIG.rank
  moments_and_basis = lambda big, small: 4 * sum(
      r * (2 * big(m, n) + small(m, n)) for m, n in CONFIG.shapes)
  assert (sizes['reference'] - sizes['compact']
          == moments_and_basis(max, min) - moments_and_basis(min, max))
  assert sizes['compact'] < sizes['reference']

