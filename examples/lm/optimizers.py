"""Optimizers for the LM example, by name.

``make_optimizer(name, ...)`` returns
``optax.chain(clip_by_global_norm(1.0), <the method>)``; the method receives a
learning-rate schedule (see :func:`warmup_cosine`).

Low-rank methods project only the transformer block matrices (attention and
MLP kernels); the embedding, the ``lm_head`` and the norms keep full Adam, as
in GaLore's reference recipes. :func:`block_matrices` is the
``dimension_numbers`` callable that says so: it marks every linear kernel
under ``blocks`` as a matrix over its last two axes. With ``scan_layers=True``
the kernels are ``(layers, d_in, d_out)`` and the leading axis is a batch axis
(one basis per layer).

Adding a method
---------------
Write a builder that takes keyword arguments and returns an optax transform,
and register it; unused keywords land in ``**_``::

  @register('my_method', learning_rate=1e-3, low_rank=True,
            description='what it is, with the paper link')
  def _my_method(*, learning_rate, rank, refresh_every, weight_decay, seed,
                 **_):
    import subspace_optax as so   # import lazily, inside the builder
    return so.my_method(learning_rate, rank=rank, ...,
                        dimension_numbers=block_matrices)

It is then available as ``python -m examples.lm.train --optimizer my_method``.
The keywords every builder receives are listed in :func:`make_optimizer`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax


@dataclasses.dataclass(frozen=True)
class Entry:
  """One registered optimizer."""

  build: Callable[..., optax.GradientTransformation]
  learning_rate: float  # default peak learning rate on the example models
  low_rank: bool  # True: uses rank / refresh_every
  description: str


REGISTRY: dict[str, Entry] = {}


def register(name: str, *, learning_rate: float, low_rank: bool,
             description: str = ''):
  """Decorator adding a builder to :data:`REGISTRY` under ``name``."""

  def add(build):
    if name in REGISTRY:
      raise ValueError(f'Optimizer {name!r} is already registered.')
    REGISTRY[name] = Entry(build, learning_rate, low_rank, description)
    return build

  return add


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
  import subspace_optax as so  # pylint: disable=import-outside-toplevel

  return jax.tree_util.tree_map_with_path(
      lambda path, x: so.DimensionNumbers(-2, -1)
      if is_block_matrix(path, x) else None, params)


def matrices(params):
  """Weight-decay mask: every leaf of rank >= 2 (not norms)."""
  return jax.tree.map(lambda x: jnp.ndim(x) >= 2, params)


def warmup_cosine(peak: float, steps: int, warmup_fraction: float = 0.1,
                  final_fraction: float = 0.1) -> optax.Schedule:
  """Linear warm-up over ``warmup_fraction`` of the steps, then cosine decay
  to ``final_fraction * peak`` (the GaLore LLaMA recipe)."""
  warmup = max(1, int(warmup_fraction * steps))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=peak, warmup_steps=warmup,
      decay_steps=max(steps, warmup + 1), end_value=final_fraction * peak)


# ----------------------------------------------------------------------------
# The registry.


@register('adamw', learning_rate=3e-3, low_rank=False,
          description='optax.adamw (Loshchilov & Hutter, arXiv 1711.05101)')
def _adamw(*, learning_rate, weight_decay, **_):
  return optax.adamw(learning_rate, b1=0.9, b2=0.999, eps=1e-8,
                     weight_decay=weight_decay, mask=matrices)


@register('galore', learning_rate=1e-2, low_rank=True,
          description='subspace_optax.galore, scale 0.25 (arXiv 2403.03507)')
def _galore(*, learning_rate, rank, refresh_every, weight_decay, seed,
            basis='svd', **_):
  import subspace_optax as so  # pylint: disable=import-outside-toplevel

  return so.galore(
      learning_rate, rank=rank, refresh_every=refresh_every, scale=0.25,
      weight_decay=weight_decay, weight_decay_mask=matrices, basis=basis,
      dimension_numbers=block_matrices, seed=seed)


@register('optax_galore', learning_rate=1e-2, low_rank=True,
          description='optax.contrib.galore, scale 0.25, for comparison')
def _optax_galore(*, learning_rate, rank, refresh_every, weight_decay, **_):
  """``optax.contrib.galore`` on the 2-D block matrices, Adam elsewhere.

  ``optax.partition`` hands contrib galore only the matrices it projects, so
  its state holds no ``(0, 0)`` placeholder projectors (orbax cannot save
  zero-size arrays). contrib galore names every axis and cannot treat the
  layer axis of stacked ``(layers, m, n)`` kernels as a batch axis, so it
  refuses models built with ``scan_layers`` (it would silently fall back to
  full Adam there).
  """
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
      learning_rate, rank=rank, update_proj_gap=refresh_every, scale=0.25,
      weight_decay=weight_decay,
      weight_dimension_numbers=optax.contrib.GaLoreDimensionNumbers(0, 1))
  adam_tx = optax.adamw(learning_rate, b1=0.9, b2=0.999, eps=1e-8,
                        weight_decay=weight_decay, mask=matrices)
  return optax.partition({'low_rank': galore_tx, 'full': adam_tx}, labels)


@register('online_subspace_descent', learning_rate=1e-2, low_rank=True,
          description='subspace_optax.online_subspace_descent, Adam inner, '
          'online-PCA basis, scale 0.25 (arXiv 2408.12857)')
def _online_subspace_descent(*, learning_rate, rank, weight_decay, seed, **_):
  import subspace_optax as so  # pylint: disable=import-outside-toplevel

  return so.online_subspace_descent(
      learning_rate, rank=rank, inner='adam', weight_decay=weight_decay,
      weight_decay_mask=matrices, dimension_numbers=block_matrices, seed=seed)

@register('online_subspace_descent_lion', learning_rate=1e-3, low_rank=True,
          description='subspace_optax.online_subspace_descent, Lion inner '
          '(sign in the subspace) (arXiv 2408.12857)')
def _online_subspace_descent_lion(*, learning_rate, rank, weight_decay, seed,
                                  **_):
  import subspace_optax as so  # pylint: disable=import-outside-toplevel

  return so.online_subspace_descent(
      learning_rate, rank=rank, inner='lion', weight_decay=weight_decay,
      weight_decay_mask=matrices, dimension_numbers=block_matrices, seed=seed)

@register('golore', learning_rate=1e-2, low_rank=True,
          description='subspace_optax.golore, random orthonormal basis, scale '
          '0.25 (arXiv 2410.11289)')
def _golore(*, learning_rate, rank, refresh_every, weight_decay, seed, **_):
  import subspace_optax as so  # pylint: disable=import-outside-toplevel

  return so.golore(
      learning_rate, rank=rank, refresh_every=refresh_every,
      weight_decay=weight_decay, weight_decay_mask=matrices,
      dimension_numbers=block_matrices, seed=seed)

@register('dct_adamw', learning_rate=3e-3, low_rank=True,
          description='subspace_optax.dct_adamw, DCT columns chosen by l1 '
          'alignment, scale 1 (arXiv 2505.17967)')
def _dct_adamw(*, learning_rate, rank, refresh_every, weight_decay, seed, **_):
  import subspace_optax as so  # pylint: disable=import-outside-toplevel

  return so.dct_adamw(
      learning_rate, rank=rank, refresh_every=refresh_every,
      weight_decay=weight_decay, weight_decay_mask=matrices,
      dimension_numbers=block_matrices, seed=seed)

@register('i3s', learning_rate=1e-2, low_rank=True,
          description='subspace_optax.i3s, singular vectors sampled by sigma, '
          'scale 0.25 (arXiv 2502.05790)')
def _i3s(*, learning_rate, rank, refresh_every, weight_decay, seed, **_):
  import subspace_optax as so  # pylint: disable=import-outside-toplevel

  return so.i3s(
      learning_rate, rank=rank, refresh_every=refresh_every,
      weight_decay=weight_decay, weight_decay_mask=matrices,
      dimension_numbers=block_matrices, seed=seed)

@register('frugal', learning_rate=3e-3, low_rank=True,
          description='subspace_optax.frugal, Adam in an SVD subspace + '
          'signSGD on the rest, reset on refresh (arXiv 2411.07837)')
def _frugal(*, learning_rate, rank, refresh_every, weight_decay, seed,
            basis='svd', **_):
  import subspace_optax as so  # pylint: disable=import-outside-toplevel

  return so.frugal(
      learning_rate, rank=rank, refresh_every=refresh_every, basis=basis,
      weight_decay=weight_decay, weight_decay_mask=matrices,
      dimension_numbers=block_matrices, seed=seed)

@register('fira', learning_rate=1e-2, low_rank=True,
          description='subspace_optax.fira, GaLore + norm-scaled residual and '
          'growth limiter, scale 0.25 (arXiv 2410.01623)')
def _fira(*, learning_rate, rank, refresh_every, weight_decay, seed, **_):
  import subspace_optax as so  # pylint: disable=import-outside-toplevel

  return so.fira(
      learning_rate, rank=rank, refresh_every=refresh_every, scale=0.25,
      weight_decay=weight_decay, weight_decay_mask=matrices,
      dimension_numbers=block_matrices, seed=seed)

@register('apollo', learning_rate=1e-2, low_rank=True,
          description='subspace_optax.apollo, channel-wise scaled gradient '
          'from a seeded Gaussian sketch (arXiv 2412.05270)')
def _apollo(*, learning_rate, rank, refresh_every, weight_decay, seed, **_):
  import subspace_optax as so  # pylint: disable=import-outside-toplevel

  return so.apollo(
      learning_rate, rank=rank, refresh_every=refresh_every,
      weight_decay=weight_decay, weight_decay_mask=matrices,
      dimension_numbers=block_matrices, seed=seed)

@register('apollo_mini', learning_rate=1e-2, low_rank=True,
          description='subspace_optax.apollo_mini, rank 1, tensor-wise scale '
          'x sqrt(128) (arXiv 2412.05270)')
def _apollo_mini(*, learning_rate, refresh_every, weight_decay, seed, **_):
  import subspace_optax as so  # pylint: disable=import-outside-toplevel

  return so.apollo_mini(
      learning_rate, refresh_every=refresh_every, weight_decay=weight_decay,
      weight_decay_mask=matrices, dimension_numbers=block_matrices, seed=seed)

@register('q_galore', learning_rate=1e-2, low_rank=True,
          description='subspace_optax.q_galore, INT4 basis, lazy per-layer '
          'refresh, scale 0.25 (arXiv 2407.08296)')
def _q_galore(*, learning_rate, rank, refresh_every, weight_decay, seed, **_):
  import subspace_optax as so  # pylint: disable=import-outside-toplevel

  return so.q_galore(
      learning_rate, rank=rank, refresh_every=refresh_every, scale=0.25,
      weight_decay=weight_decay, weight_decay_mask=matrices,
      dimension_numbers=block_matrices, seed=seed)

def make_optimizer(
    name: str,
    *,
    learning_rate_schedule: optax.ScalarOrSchedule,
    rank: int | float = 32,
    refresh_every: int = 200,
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
      ``min(m, n)`` where the method accepts it).
    refresh_every: steps between basis refreshes.
    weight_decay: decoupled weight decay on matrices.
    seed: seed of random bases.
    **options: method-specific keywords (e.g. ``basis='randomized'``).
  """
  if name not in REGISTRY:
    raise ValueError(
        f'Unknown optimizer {name!r}; registered: {", ".join(sorted(REGISTRY))}.')
  method = REGISTRY[name].build(
      learning_rate=learning_rate_schedule, rank=rank,
      refresh_every=refresh_every, weight_decay=weight_decay, seed=seed,
      **options)
  return optax.chain(optax.clip_by_global_norm(1.0), method)


def state_bytes(opt_state) -> int:
  """Bytes of every array leaf (``subspace_optax.state_bytes`` if present)."""
  try:
    import subspace_optax as so  # pylint: disable=import-outside-toplevel

    return int(so.state_bytes(opt_state))
  except (ImportError, AttributeError):
    return int(sum(getattr(x, 'nbytes', 0) for x in jax.tree.leaves(opt_state)))
