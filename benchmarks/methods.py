"""The benchmarks' table of optimizers: every method they run, tuned.

Every method the quality benchmark (``benchmarks/quality.py``), the speed
benchmarks (``benchmarks/speed_memory.py``, ``benchmarks/peak_memory.py``, ...)
and the quality-drift check (``benchmarks/quality_drift.py``) run is one
:class:`Method` in :data:`REGISTRY`: how to build it, its description, its
peak learning rate relative to AdamW's, its rank rule and its analytic state
size. The benchmarks select rows by name (``QUALITY_METHODS``,
``SPEED_METHODS`` in their modules); a missing name is a ``KeyError`` naming
it, never a skipped row. The benchmarks measure the LM example's model and data
(``examples/lm/model.py``, ``data.py``) but import no optimizer from the
example; the example trainer has its own small table
(``examples/lm/methods.py``: AdamW, GaLore, any preset by name).

``make_optimizer(name, ...)`` returns
``optax.chain(clip_by_global_norm(1.0), <the method>)``; the method receives a
learning rate or schedule (see :func:`warmup_cosine`).

Low-rank methods project only the transformer block matrices (attention and
MLP kernels); the embedding, the ``lm_head`` and the norms keep full Adam, as
in GaLore's reference recipes. :func:`block_matrices` is the
``dimension_numbers`` callable that says so: it marks every linear kernel
under ``blocks`` as a matrix over its last two axes. With ``scan_layers=True``
the kernels are ``(layers, d_in, d_out)`` and the leading axis is a batch axis
(one basis per layer).

Adding a method
---------------
Write a builder that takes the keywords ``learning_rate, rank, refresh,
weight_decay, seed`` (``del`` the ones it does not use) and returns an optax
transform, and register it::

  def _my_method(*, learning_rate, rank, refresh, weight_decay, seed):
    return so.my_method(learning_rate, rank=rank, refresh=refresh,
                        seed=seed, dimension_numbers=block_matrices,
                        **decay(weight_decay))

  register('my_method', Method(
      _my_method, 'what it is, with the paper link', lr_ratio=10.0,
      rank='quarter'))

It is then available as ``python -m benchmarks.quality --methods my_method``
(and in the quality-drift check, ``python -m benchmarks.quality_drift``).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Optional, Union

import jax
import jax.numpy as jnp
import optax

import subspace_optax as so

# AdamW's peak learning rate on the example models; every method's default
# rate is ``lr_ratio`` times it (the quality benchmark's protocol).
ADAMW_LEARNING_RATE = 3e-3

# A rank rule: None (full rank, no rank), 'quarter' (dim // 4),
# 'match_budget' (the largest rank whose state fits in GaLore's at dim // 4;
# see benchmarks/quality.py), or a fixed int (or fraction) rank.
RankRule = Union[None, str, int, float]


@dataclasses.dataclass(frozen=True)
class Method:
  """One registered optimizer.

  Attributes:
    build: ``build(*, learning_rate, rank, refresh, weight_decay, seed,
      **options)`` -> the method's transform (without the gradient clipping
      :func:`make_optimizer` adds).
    description: what it is, with the paper.
    lr_ratio: its peak learning rate over AdamW's (each paper's recipe
      relative to AdamW's; see benchmarks/README.md, "Quality").
    rank: its :data:`RankRule`; None for a full-rank method.
    state_bytes: ``(params, rank) -> bytes``, the analytic size of its state
      (``subspace_optax.<method>_bytes``), or None where there is no formula.
    options: the extra keywords ``build`` takes (e.g. ``('basis',)``).
  """

  build: Callable[..., optax.GradientTransformation]
  description: str
  lr_ratio: float
  rank: RankRule = None
  state_bytes: Optional[Callable[[Any, Any], int]] = None
  options: tuple[str, ...] = ()

  @property
  def low_rank(self) -> bool:
    """True: the method takes a rank (and a refresh period)."""
    return self.rank is not None

  @property
  def learning_rate(self) -> float:
    """Default peak learning rate on the example models."""
    return ADAMW_LEARNING_RATE * self.lr_ratio

  @property
  def fixed_rank(self) -> Optional[int]:
    """The rank the method is defined with (APOLLO-Mini: 1), else None."""
    return self.rank if isinstance(self.rank, int) else None


REGISTRY: dict[str, Method] = {}


def register(name: str, method: Method) -> Method:
  """Add ``method`` to :data:`REGISTRY` under ``name``."""
  if name in REGISTRY:
    raise ValueError(f'Optimizer {name!r} is already registered.')
  REGISTRY[name] = method
  return method


def get(name: str) -> Method:
  """The method ``name``; a ``KeyError`` naming it and the known ones."""
  if name not in REGISTRY:
    raise KeyError(f'Unknown optimizer {name!r}; registered: '
                   f'{", ".join(REGISTRY)}.')
  return REGISTRY[name]


# ----------------------------------------------------------------------------
# Which leaves are block matrices.


def key_names(path) -> list[Any]:
  """A key path as plain names (dict keys, attribute names, positions)."""
  return [getattr(k, 'key', getattr(k, 'name', getattr(k, 'idx', None)))
          for k in path]


def is_block_matrix(path, leaf) -> bool:
  """True for a linear kernel inside the transformer blocks.

  Selected by name, not by rank: with ``scan_layers`` the RMSNorm scales are
  ``(layers, dim)`` and must not be mistaken for matrices.
  """
  names = key_names(path)
  return 'blocks' in names and 'kernel' in names and jnp.ndim(leaf) >= 2


def block_matrices(params):
  """``dimension_numbers`` callable for :mod:`subspace_optax`.

  ``DimensionNumbers(-2, -1)`` for the block kernels (``(d_in, d_out)`` or
  ``(layers, d_in, d_out)``), ``None`` (not projected) elsewhere.
  """
  return jax.tree_util.tree_map_with_path(
      lambda path, x: so.DimensionNumbers(-2, -1)
      if is_block_matrix(path, x) else None, params)


def block_matrix_mask(params):
  """True at the block kernels (AuON's ``matrix_mask``)."""
  return jax.tree_util.tree_map_with_path(is_block_matrix, params)


def matrices(params):
  """Weight-decay mask: every leaf of rank >= 2 (not norms)."""
  return jax.tree.map(lambda x: jnp.ndim(x) >= 2, params)


def decay(weight_decay: float) -> dict[str, Any]:
  """The presets' weight-decay keywords: decay on :func:`matrices` only.

  Without decay no mask is passed, so the transform is the preset's own
  (the quality benchmark's rows were built that way).
  """
  return {'weight_decay': weight_decay,
          'mask': matrices if weight_decay else None}


def warmup_cosine(peak: float, steps: int, warmup_fraction: float = 0.1,
                  final_fraction: float = 0.1) -> optax.Schedule:
  """Linear warm-up over ``warmup_fraction`` of the steps, then cosine decay
  to ``final_fraction * peak`` (the GaLore LLaMA recipe)."""
  warmup = max(1, int(warmup_fraction * steps))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=peak, warmup_steps=warmup,
      decay_steps=max(steps, warmup + 1), end_value=final_fraction * peak)


BLOCKS = {'dimension_numbers': block_matrices}


def _formula(formula: Callable[..., int], **options) -> Callable[..., int]:
  """``(params, rank) -> formula(params, rank, **options)`` on the blocks."""
  return lambda params, rank: int(formula(params, rank, **options, **BLOCKS))


# ----------------------------------------------------------------------------
# Builders.


def _adamw(*, learning_rate, rank, refresh, weight_decay, seed):
  del rank, refresh, seed
  return optax.adamw(learning_rate, b1=0.9, b2=0.999, eps=1e-8,
                     weight_decay=weight_decay,
                     mask=matrices if weight_decay else None)


def _adamw_bytes(params, rank) -> int:
  del rank  # count (4 bytes) and two moments per parameter
  return 4 + 8 * sum(math.prod(jnp.shape(p)) for p in jax.tree.leaves(params))


def _galore(*, learning_rate, rank, refresh, weight_decay, seed,
            basis='svd', stagger=True, on_refresh=None, side='compact',
            mu_dtype=None, basis_dtype=None):
  extra = {} if on_refresh is None else {'on_refresh': on_refresh}
  return so.galore(
      learning_rate, rank=rank, refresh=refresh, scale=0.25,
      basis=basis, stagger=stagger, side=side, seed=seed, mu_dtype=mu_dtype,
      basis_dtype=basis_dtype, **extra, **BLOCKS, **decay(weight_decay))


def _galore_8bit_moments(*, learning_rate, rank, refresh, weight_decay,
                         seed):
  """GaLore's pipeline with its Adam moments stored in 8 bits."""
  inner = so.quantize_moments(so.transforms.scale_by_torch_adam())
  return optax.chain(
      so.low_rank(inner, rank=rank, refresh=refresh, basis='svd',
                  scale=0.25, seed=seed, **BLOCKS),
      optax.add_decayed_weights(weight_decay, matrices),
      optax.scale_by_learning_rate(learning_rate))


def _optax_galore(*, learning_rate, rank, refresh, weight_decay, seed):
  """``optax.contrib.galore`` on the 2-D block matrices, Adam elsewhere.

  ``optax.partition`` hands contrib galore only the matrices it projects, so
  its state holds no ``(0, 0)`` placeholder projectors (orbax cannot save
  zero-size arrays). contrib galore names every axis and cannot treat the
  layer axis of stacked ``(layers, m, n)`` kernels as a batch axis, so it
  refuses models built with ``scan_layers`` (it would silently fall back to
  full Adam there).
  """
  del seed
  if not isinstance(rank, int):
    raise TypeError(f'optax_galore needs an int rank, got {rank!r}.')

  def labels(params):
    def label(path, x):
      if is_block_matrix(path, x) and jnp.ndim(x) != 2:
        raise ValueError(
            f'optax_galore: {jax.tree_util.keystr(path)} has shape '
            f'{jnp.shape(x)}; optax.contrib.galore cannot treat the layer axis '
            'of stacked kernels as a batch axis (it would not project them). '
            'Use --no-scan-layers, or --optimizer galore which projects '
            '(layers, m, n) kernels per layer.')
      return 'low_rank' if is_block_matrix(path, x) else 'full'
    return jax.tree_util.tree_map_with_path(label, params)

  galore_tx = optax.contrib.galore(
      learning_rate, rank=rank, update_proj_gap=refresh, scale=0.25,
      weight_decay=weight_decay,
      weight_dimension_numbers=optax.contrib.GaLoreDimensionNumbers(0, 1))
  adam_tx = optax.adamw(learning_rate, b1=0.9, b2=0.999, eps=1e-8,
                        weight_decay=weight_decay, mask=matrices)
  return optax.partition({'low_rank': galore_tx, 'full': adam_tx}, labels)


def _frugal(*, learning_rate, rank, refresh, weight_decay, seed,
            basis='svd'):
  return so.frugal(learning_rate, rank=rank, refresh=refresh,
                   basis=basis, seed=seed, **BLOCKS, **decay(weight_decay))


def _online_subspace_descent(*, learning_rate, rank, refresh,
                             weight_decay, seed, inner):
  del refresh  # the basis moves every step
  return so.online_subspace_descent(
      learning_rate, rank=rank, inner=inner, side='compact', seed=seed,
      **BLOCKS, **decay(weight_decay))


def _preset(preset: Callable[..., optax.GradientTransformation],
            **fixed) -> Callable[..., optax.GradientTransformation]:
  """A builder for a ``subspace_optax`` preset taking ``rank`` and
  ``refresh``, with ``fixed`` keywords (e.g. ``scale=0.25``)."""

  def build(*, learning_rate, rank, refresh, weight_decay, seed):
    return preset(learning_rate, rank=rank, refresh=refresh,
                  seed=seed, **fixed, **BLOCKS, **decay(weight_decay))

  return build


def _apollo_mini(*, learning_rate, rank, refresh, weight_decay, seed,
                 **fixed):
  del rank  # rank 1 by definition
  return so.apollo_mini(learning_rate, refresh=refresh, seed=seed, **fixed,
                        **BLOCKS, **decay(weight_decay))


def _adamp(*, learning_rate, rank, refresh, weight_decay, seed):
  del rank, refresh, seed
  return so.adamp(learning_rate, weight_decay=weight_decay)


def _sgdp(*, learning_rate, rank, refresh, weight_decay, seed):
  del rank, refresh, seed
  return so.sgdp(learning_rate, momentum=0.9, nesterov=True,
                 weight_decay=weight_decay)


# AuON's runs use lr 0.02 (arXiv 2509.24320), against AdamW's 3e-3 here.
AUON_LR_RATIO = 0.02 / ADAMW_LEARNING_RATE


def _auon(*, learning_rate, rank, refresh, weight_decay, seed,
          newton_schulz_steps):
  """AuON on the block matrices at its own rate; AdamW at AdamW's elsewhere."""
  del rank, refresh, seed
  if callable(learning_rate):
    adam_rate = lambda step: learning_rate(step) / AUON_LR_RATIO
  else:
    adam_rate = learning_rate / AUON_LR_RATIO
  return so.auon(learning_rate, newton_schulz_steps=newton_schulz_steps,
                 matrix_mask=block_matrix_mask, adam_learning_rate=adam_rate,
                 **decay(weight_decay))


# ----------------------------------------------------------------------------
# The table. Learning-rate ratios follow each paper's recipe relative to
# AdamW's: the GaLore family (0.01 with scale 0.25 against AdamW's 0.001) is
# 10x; FRUGAL and DCT-AdamW, whose subspace step has scale 1, are 1x.
# Rows of presets whose default side became 'reference' in 0.2.0 pin the
# compact side they were benchmarked with (benchmarks/results); the
# 'galore_reference' row measures the other side.

_GALORE = ('subspace_optax.galore, {} basis, stagger {}, compact side, '
           'scale 0.25')

for _name, _method in {
    'adamw': Method(
        _adamw, 'optax.adamw, b=(0.9, 0.999), eps 1e-8 (arXiv 1711.05101)',
        1.0, state_bytes=_adamw_bytes),
    'galore': Method(
        _galore, 'subspace_optax.galore, SVD basis, compact side, scale 0.25 '
        '(arXiv 2403.03507)', 10.0, 'quarter', _formula(so.state_sizes.galore_bytes, side='compact'),
        options=('basis',)),
    'galore_reference': Method(
        functools.partial(_galore, side='reference'), 'subspace_optax.galore, '
        'SVD basis, reference side (basis on the smaller dimension, as '
        'galore-torch), scale 0.25, at the compact row\'s state bytes', 10.0,
        'match_budget', _formula(so.state_sizes.galore_bytes, side='reference')),
    'optax_galore': Method(
        _optax_galore, 'optax.contrib.galore, scale 0.25, same rank as galore; '
        'Adam on the other leaves (optax.partition)', 10.0, 'quarter'),
    'frugal': Method(
        _frugal, 'subspace_optax.frugal: Adam on an SVD subspace (reference '
        'side, moments reset at refresh) + signSGD on the residual, scale 1 '
        '(arXiv 2411.07837)', 1.0, 'match_budget', _formula(so.state_sizes.frugal_bytes),
        options=('basis',)),
    'fira': Method(
        _preset(so.fira, scale=0.25), 'subspace_optax.fira: GaLore + '
        'norm-scaled residual + limiter 1.01, reference side, scale 0.25 '
        '(arXiv 2410.01623)', 10.0, 'match_budget', _formula(so.state_sizes.fira_bytes)),
    'online_subspace_descent': Method(
        functools.partial(_online_subspace_descent, inner='adam'),
        'subspace_optax.online_subspace_descent: Adam inner, basis moved '
        'every step by Adam on the online-PCA loss (lr 0.005), scale 0.25 '
        '(arXiv 2408.12857)', 10.0, 'match_budget',
        _formula(so.state_sizes.online_subspace_descent_bytes, side='compact')),
    'apollo': Method(
        _preset(so.apollo), 'subspace_optax.apollo: channel-wise scaled raw '
        'gradient, seeded Gaussian sketch, limiter 1.01 (arXiv 2412.05270)',
        10.0, 'match_budget', _formula(so.state_sizes.apollo_bytes)),
    'apollo_mini': Method(
        _apollo_mini, 'subspace_optax.apollo_mini: rank 1, tensor-wise scale, '
        'scale 128 (arXiv 2412.05270)', 10.0, 1),
    # The two sides of APOLLO and APOLLO-Mini, pinned (the rows above take
    # the preset's default side): the measurement that chose the defaults.
    'apollo_reference': Method(
        _preset(so.apollo, side='reference'), 'subspace_optax.apollo, '
        'reference side (sketch on the smaller dimension, as apollo-torch\'s '
        "proj_type='std')", 10.0, 'match_budget',
        _formula(so.state_sizes.apollo_bytes, side='reference')),
    'apollo_compact': Method(
        _preset(so.apollo, side='compact'), 'subspace_optax.apollo, compact '
        'side (sketch on the larger dimension)', 10.0, 'match_budget',
        _formula(so.state_sizes.apollo_bytes, side='compact')),
    'apollo_mini_reference': Method(
        functools.partial(_apollo_mini, side='reference'),
        'subspace_optax.apollo_mini, reference side (apollo-torch\'s '
        "proj_type='std')", 10.0, 1),
    'apollo_mini_compact': Method(
        functools.partial(_apollo_mini, side='compact'),
        'subspace_optax.apollo_mini, compact side', 10.0, 1),
    'q_galore': Method(
        _preset(so.q_galore, scale=0.25, side='compact',
                eight_bit_moments=False),
        'subspace_optax.q_galore: INT4 basis, lazy per-layer refresh, float32 '
        'moments, scale 0.25 (arXiv 2407.08296)', 15.0, 'match_budget',
        _formula(so.state_sizes.q_galore_bytes, side='compact',
                 eight_bit_moments=False)),
    'q_galore_8bit_moments': Method(
        _preset(so.q_galore, scale=0.25, side='compact'), 'subspace_optax.q_galore with its '
        'defaults: INT4 basis, lazy per-layer refresh, 8-bit moments, scale '
        '0.25 (arXiv 2407.08296)', 15.0, 'match_budget',
        _formula(so.state_sizes.q_galore_bytes, side='compact')),
    'golore': Method(
        _preset(so.golore, scale=0.25, side='compact'), 'subspace_optax.golore: random '
        'orthonormal basis, scale 0.25 (arXiv 2410.11289)', 10.0,
        'match_budget'),
    'i3s': Method(
        _preset(so.i3s, scale=0.25, side='compact'), 'subspace_optax.i3s: singular vectors '
        'sampled by sigma, scale 0.25 (arXiv 2502.05790)', 10.0,
        'match_budget'),
    'galore_8bit_moments': Method(
        _galore_8bit_moments, 'galore (same pipeline) with its Adam moments '
        'in 8 bits (subspace_optax.quantize_moments, arXiv 2110.02861)', 10.0,
        'quarter'),
    'galore_bf16_state': Method(
        functools.partial(_galore, mu_dtype=jnp.bfloat16,
                          basis_dtype=jnp.bfloat16),
        'subspace_optax.galore with its first moment (mu_dtype) and its bases '
        '(basis_dtype) stored in bfloat16, computed in float32', 10.0,
        'quarter', _formula(so.state_sizes.galore_bytes, side='compact', mu_bytes=2,
                          basis_bytes=2)),
    'galore_momentum_reset': Method(
        functools.partial(_galore, on_refresh='reset'),
        'subspace_optax.galore with the moments zeroed at every refresh '
        '(momentum reset, arXiv 2505.22922)', 10.0, 'quarter',
        _formula(so.state_sizes.galore_bytes, side='compact')),
    'frugal_random': Method(
        functools.partial(_frugal, basis='random'), 'subspace_optax.frugal, '
        'random orthonormal subspace (arXiv 2411.07837)', 1.0, 'match_budget',
        _formula(so.state_sizes.frugal_bytes, basis='random')),
    'frugal_columns': Method(
        functools.partial(_frugal, basis='columns'), 'subspace_optax.frugal, '
        'random columns (indices only, no Q) (arXiv 2411.07837)', 1.0,
        'match_budget', _formula(so.state_sizes.frugal_bytes, basis='columns')),
    'frugal_blocks': Method(
        functools.partial(_frugal, basis='blocks'), 'subspace_optax.frugal, '
        'blockwise (BAdam-like): a quarter of the matrices active per period '
        '(density 0.25, the paper\'s default); moments stay full size (static '
        'shapes) (arXiv 2411.07837)', 1.0, 0.25,
        _formula(so.state_sizes.frugal_bytes, basis='blocks')),
    'online_subspace_descent_lion': Method(
        functools.partial(_online_subspace_descent, inner='lion'),
        'subspace_optax.online_subspace_descent, Lion inner; lr 3x below the '
        'Adam-inner row (Lion paper, arXiv 2302.06675: 3-10x below AdamW)',
        10.0 / 3, 'match_budget',
        _formula(so.state_sizes.online_subspace_descent_bytes, side='compact',
                 inner='lion')),
    'adamp': Method(
        _adamp, 'subspace_optax.adamp: radial component removed on '
        'scale-invariant weights (arXiv 2006.08217), full rank', 1.0,
        state_bytes=lambda params, rank: int(so.state_sizes.adamp_bytes(params))),
    'sgdp': Method(
        _sgdp, 'subspace_optax.sgdp, Nesterov momentum 0.9; lr 100x AdamW\'s '
        '(SGD\'s 0.1 against Adam\'s 1e-3, the usual ImageNet pair; arXiv '
        '2006.08217), full rank', 100.0),
    'auon': Method(
        functools.partial(_auon, newton_schulz_steps=0),
        'subspace_optax.auon on the block matrices (lr 0.02 as in its runs), '
        'AdamW elsewhere (arXiv 2509.24320)', AUON_LR_RATIO),
    'auon_hybrid': Method(
        functools.partial(_auon, newton_schulz_steps=1),
        'subspace_optax.auon with one Newton-Schulz step first (the hybrid)',
        AUON_LR_RATIO),
    'dct_adamw': Method(
        _preset(so.dct_adamw, side='compact'), 'subspace_optax.dct_adamw: DCT columns chosen '
        'by l1 alignment, moments transported, scale 1 (arXiv 2505.17967)',
        1.0, 'match_budget', _formula(so.state_sizes.dct_adamw_bytes, side='compact')),
    # Variants timed by benchmarks/speed_memory.py.
    'galore_no_stagger': Method(
        functools.partial(_galore, stagger=False), _GALORE.format('svd', 'off'),
        10.0, 'quarter', _formula(so.state_sizes.galore_bytes, side='compact')),
    'galore_randomized': Method(
        functools.partial(_galore, basis='randomized'),
        _GALORE.format('randomized', 'on'), 10.0, 'quarter',
        _formula(so.state_sizes.galore_bytes, side='compact')),
    'galore_randomized_no_stagger': Method(
        functools.partial(_galore, basis='randomized', stagger=False),
        _GALORE.format('randomized', 'off'), 10.0, 'quarter',
        _formula(so.state_sizes.galore_bytes, side='compact')),
}.items():
  register(_name, _method)


def make_optimizer(
    name: str,
    *,
    learning_rate_schedule: optax.ScalarOrSchedule,
    rank: Optional[Union[int, float]] = 32,
    refresh: int = 200,
    weight_decay: float = 0.0,
    seed: int = 0,
    **options,
) -> optax.GradientTransformation:
  """``clip_by_global_norm(1.0)`` followed by the registered method ``name``.

  Args:
    name: a key of :data:`REGISTRY`.
    learning_rate_schedule: a float or an optax schedule (e.g.
      :func:`warmup_cosine`).
    rank: subspace rank of low-rank methods (int, or a fraction of
      ``min(m, n)`` where the method accepts it); ignored by full-rank ones.
    refresh: steps between basis refreshes.
    weight_decay: decoupled weight decay on matrices.
    seed: seed of random bases.
    **options: method-specific keywords, among ``REGISTRY[name].options``
      (e.g. ``basis='randomized'``).

  Raises:
    KeyError: ``name`` is not registered.
    TypeError: an option the method does not take.
  """
  method = get(name)
  unknown = sorted(set(options) - set(method.options))
  if unknown:
    raise TypeError(f'Optimizer {name!r} takes no option(s) {unknown}; its '
                    f'options: {list(method.options)}.')
  return optax.chain(
      optax.clip_by_global_norm(1.0),
      method.build(learning_rate=learning_rate_schedule, rank=rank,
                   refresh=refresh, weight_decay=weight_decay,
                   seed=seed, **options))


def state_bytes(opt_state) -> int:
  """Bytes of every array leaf (``subspace_optax.state_bytes``)."""
  return int(so.state_bytes(opt_state))
