"""Optimizer temporaries: one matrix's worth, not the stack's or the tree's.

XLA's buffer assignment of an ahead-of-time compile of ``tx.update`` alone
(``memory_analysis().temp_size_in_bytes``; the state donated) on a small tree
with a plain matrix (64 x 96), a stacked ``(L, 64, 128)`` leaf, norms and an
embedding. The issue's bound is 2x the float32 bytes of the largest single
matrix: one layer of the stack, not the stack. Only ratios to the leaf size
are asserted (no timing, no absolute figure). The tree and the measurement
are ``benchmarks/optimizer_temporaries.py``'s, which records every row's ratio
(this CPU's compile and an H100's).

What is compiled and why:

* ``tx.update`` alone, the updates being its outputs: with
  ``optax.apply_updates`` in the same program the update tree is a
  temporary of the size of the params by the optax API (a stack's update is
  ``L`` matrices; XLA:CPU fuses ``p + u`` into the producer only for
  elementwise producers, not for ``QN``), so it would be counted whatever the
  pipeline does.
* each registry row's method (``benchmarks.methods``'s ``build``), without
  the ``clip_by_global_norm(1.0)`` that ``make_optimizer`` puts first: the
  clipped gradient tree is a whole-tree temporary of that transform (its
  norm needs every leaf before any is scaled).
"""

import pytest

from benchmarks import methods as registry
from benchmarks.optimizer_temporaries import BOUND
from benchmarks.optimizer_temporaries import LAYERS
from benchmarks.optimizer_temporaries import temp_ratio

# Rows that cannot meet the bound, and why (strict xfail: a row that starts
# to meet it must be moved out of here).
SVD = ('an exact SVD refresh of one matrix holds LAPACK\'s copy of it and U '
       'of its size (gesdd), plus the float32 view: about 2.5-3x one matrix '
       'whatever the schedule')
RESIDUAL = ('the residual loop holds one matrix\'s float32 view and '
            'G - QQᵀG (2x), and the stacked C and N live beside it (half a '
            'matrix each at this shape: rank 8 of 64 over 4 layers)')
BLOCKS = ('the blocks basis projects onto the whole matrix: C and N of a '
          'stack are stack-size, 4 matrices each')
RANDOMIZED = ('the randomized range finder holds a sketch, its QR and the '
              'power iterations\' products (k x (r + oversampling)) besides '
              'the float32 view; at this small shape they are a quarter of a '
              'matrix each')
BF16_VIEW = ('bfloat16 params: the float32 view of a matrix (1x) plus the '
             'float32 QN (1x) and the stacked state buffers')
EXPECTED_OVER = {
    # Exact SVD refreshes (measured 2.8-4.1x after the per-matrix schedule).
    **{name: SVD for name in (
        'galore', 'galore_reference', 'galore_no_stagger', 'galore_bf16_state',
        'galore_momentum_reset', 'q_galore', 'q_galore_8bit_moments', 'i3s',
        'galore_8bit_moments')},
    # An SVD refresh and a residual path.
    'frugal': SVD, 'fira': SVD,
    # A residual path.
    'frugal_random': RESIDUAL, 'frugal_columns': RESIDUAL,
    'frugal_blocks': BLOCKS,
    ('apollo', 'bfloat16'): RESIDUAL,
    ('apollo_reference', 'bfloat16'): RESIDUAL,
    'apollo_compact': RESIDUAL,
    'galore_randomized': RANDOMIZED,
    'galore_randomized_no_stagger': RANDOMIZED,
    ('golore', 'bfloat16'): BF16_VIEW,
    'online_subspace_descent': (
        'the online-PCA basis step differentiates ‖G - QQᵀG‖² every step: '
        'full-size residual and its gradient per matrix'),
    'online_subspace_descent_lion': (
        'the online-PCA basis step differentiates ‖G - QQᵀG‖² every step: '
        'full-size residual and its gradient per matrix'),
    'dct_adamw': ('the DCT basis scores columns by the l1 norm of the '
                  'transformed full-size gradient (a full-size product per '
                  'matrix) besides the float32 view'),
    # Not built on low_rank: whole-tree optax chains of full-size tree maps.
    'adamp': 'not a low_rank method: its radial projection tests hold '
             'full-size float32 copies of every leaf at once',
    'sgdp': 'not a low_rank method: its radial projection tests hold '
            'full-size float32 copies of every leaf at once',
    'auon': 'not a low_rank method: its normalisation of every matrix '
            'leaf is a whole-tree chain of full-size float32 maps',
    'auon_hybrid': 'not a low_rank method: Newton-Schulz and the '
                   'normalisation hold several full-size float32 products',
}

SKIPPED = {
    'optax_galore': 'optax.contrib.galore refuses stacked (L, m, n) kernels '
                    '(the row raises on them by design)',
}


def _cases():
  fast = {('galore', 'float32'), ('galore_randomized', 'bfloat16'),
          ('adamw', 'bfloat16')}
  for name in registry.REGISTRY:
    for dtype in ('float32', 'bfloat16'):
      marks = [] if (name, dtype) in fast else [pytest.mark.slow]
      if name in SKIPPED:
        marks.append(pytest.mark.skip(reason=SKIPPED[name]))
      elif (name, dtype) in EXPECTED_OVER or name in EXPECTED_OVER:
        reason = EXPECTED_OVER.get((name, dtype), EXPECTED_OVER.get(name))
        marks.append(pytest.mark.xfail(reason=reason, strict=True))
      yield pytest.param(name, dtype, marks=marks, id=f'{name}-{dtype}')


@pytest.mark.parametrize('name, dtype', list(_cases()))
def test_temporaries_within_two_matrices(name, dtype):
  ratio = temp_ratio(name, dtype)
  assert ratio <= BOUND, (
      f'{name} ({dtype}): temporaries {ratio:.2f}x the float32 bytes of the '
      f'largest matrix (bound {BOUND}x)')


@pytest.mark.parametrize('name, dtype', [
    ('galore', 'bfloat16'),
    pytest.param('galore_randomized', 'float32', marks=pytest.mark.slow),
    pytest.param('q_galore', 'bfloat16', marks=pytest.mark.slow),
    pytest.param('apollo', 'bfloat16', marks=pytest.mark.slow),
    pytest.param('frugal', 'bfloat16', marks=pytest.mark.slow),
])
def test_temporaries_do_not_grow_with_the_stack(name, dtype):
  # LAYERS more layers: a float32 temporary of the whole stack would add
  # LAYERS matrices (a bfloat16 one LAYERS / 2); per-layer work adds only
  # the stacked basis buffers (128 x 8: an eighth of a matrix per layer,
  # about 2 copies).
  growth = temp_ratio(name, dtype, 2 * LAYERS) - temp_ratio(name, dtype)
  assert growth < 0.375 * LAYERS, (
      f'{name} ({dtype}): {LAYERS} more layers add {growth:.2f} matrices of '
      'temporaries')


def test_the_benchmark_records_each_dtype_against_the_bound(tmp_path):
  from benchmarks import optimizer_temporaries  # pylint: disable=import-outside-toplevel
  out = tmp_path / 'rows.json'
  result = optimizer_temporaries.main(['--methods', 'adamw', '--out', str(out)])
  (row,) = result['rows']
  assert out.exists() and result['compiled_for'] == 'cpu'
  assert row['within_bound'] == (max(row['float32'], row['bfloat16']) <= BOUND)
  assert row['float32'] == temp_ratio('adamw', 'float32')
