"""The example's optimizers: AdamW, GaLore, or any subspace_optax preset by name.

``python -m examples.lm.train`` compares ``optax.adamw`` with
``subspace_optax.galore`` (its defaults: SVD basis on the smaller side, scale
0.25); ``--optimizer NAME`` also takes any other preset of
:mod:`subspace_optax` that projects matrices (``fira``, ``frugal``,
``apollo``, ``apollo_mini``, ``golore``, ...), built with the preset's own
defaults. Every method receives ``rank``, ``refresh``, ``seed`` and the
weight decay where the preset takes them, and projects only the transformer
block matrices (:func:`block_matrices`); the embedding, ``lm_head`` and the
norms keep full Adam, as in GaLore's reference recipes.

AdamW and GaLore have default learning rates (GaLore's recipe, 0.01 with scale
0.25 against AdamW's 0.001, is 10x AdamW's); other presets need ``--lr``.
Their tuned ratios, rank rules at equal state bytes and the variants the
benchmarks run are the benchmarks' own table, ``benchmarks/methods.py``
(``python -m benchmarks.quality --methods NAME``), which this example does not
import.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Optional

import jax
import jax.numpy as jnp
import optax

import subspace_optax as so

# AdamW's peak learning rate on the example models.
ADAMW_LEARNING_RATE = 3e-3
# Default peak rates: AdamW's, and GaLore's recipe ratio (10x) times it.
LEARNING_RATES = {'adamw': ADAMW_LEARNING_RATE,
                  'galore': 10 * ADAMW_LEARNING_RATE}


@dataclasses.dataclass(frozen=True)
class Method:
  """What the trainer needs to know about one optimizer name."""

  name: str
  learning_rate: Optional[float]  # None: no default, ``--lr`` is required
  takes_rank: bool
  takes_refresh: bool
  basis: Optional[str]  # the preset's default basis; None: takes no basis


def _preset(name: str):
  """``subspace_optax.<name>`` if it is a preset that projects matrices."""
  preset = getattr(so, name, None) if not name.startswith('_') else None
  if not callable(preset):
    return None
  try:
    parameters = inspect.signature(preset).parameters
  except (TypeError, ValueError):
    return None
  first = next(iter(parameters), None)
  return (preset if first == 'learning_rate' and 'dimension_numbers'
          in parameters else None)


def names() -> list[str]:
  """Every name :func:`get` accepts: adamw and the projecting presets."""
  return ['adamw'] + sorted(n for n in dir(so) if _preset(n) is not None)


def get(name: str) -> Method:
  """The method ``name``; a ``KeyError`` naming it and the known ones."""
  if name == 'adamw':
    return Method(name, ADAMW_LEARNING_RATE, False, False, None)
  preset = _preset(name)
  if preset is None:
    raise KeyError(f'Unknown optimizer {name!r}; known: {", ".join(names())}.')
  parameters = inspect.signature(preset).parameters
  basis = parameters['basis'].default if 'basis' in parameters else None
  return Method(name, LEARNING_RATES.get(name), 'rank' in parameters,
                'refresh' in parameters, basis)


# ----------------------------------------------------------------------------
# Which leaves are block matrices.


def key_names(path) -> list[Any]:
  """A key path as plain names (dict keys, attribute names, positions)."""
  return [getattr(k, 'key', getattr(k, 'name', getattr(k, 'idx', None)))
          for k in path]


def is_block_matrix(path, leaf) -> bool:
  """True for a linear kernel inside the transformer blocks (selected by
  name: with ``scan_layers`` the RMSNorm scales are ``(layers, dim)``)."""
  names_ = key_names(path)
  return 'blocks' in names_ and 'kernel' in names_ and jnp.ndim(leaf) >= 2


def block_matrices(params):
  """``dimension_numbers``: ``DimensionNumbers(-2, -1)`` for the block kernels
  (``(d_in, d_out)`` or, with ``scan_layers``, ``(layers, d_in, d_out)`` with
  one basis per layer), ``None`` (not projected) elsewhere."""
  return jax.tree_util.tree_map_with_path(
      lambda path, x: so.DimensionNumbers(-2, -1)
      if is_block_matrix(path, x) else None, params)


def matrices(params):
  """Weight-decay mask: every leaf of rank >= 2 (not the norms)."""
  return jax.tree.map(lambda x: jnp.ndim(x) >= 2, params)


def warmup_cosine(peak: float, steps: int) -> optax.Schedule:
  """Linear warm-up over 10 % of the steps, then cosine decay to 10 % of the
  peak (the GaLore LLaMA recipe)."""
  warmup = max(1, steps // 10)
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=peak, warmup_steps=warmup,
      decay_steps=max(steps, warmup + 1), end_value=0.1 * peak)


# Every optimizer of the example clips the gradient to this global norm.
CLIP_NORM = 1.0


def make_optimizer(name: str, *, learning_rate_schedule: optax.ScalarOrSchedule,
                   rank: Optional[int | float] = 32, refresh: int = 200,
                   weight_decay: float = 0.0, seed: int = 0,
                   basis: Optional[str] = None,
                   clip_norm: Optional[float] = CLIP_NORM,
                   ) -> optax.GradientTransformation:
  """``clip_by_global_norm(clip_norm)`` then ``name`` (``'adamw'`` or a preset).

  ``rank``, ``refresh``, ``seed`` and ``basis`` (None: the preset's default)
  go to the presets that take them; weight decay applies to matrices only.
  ``clip_norm=None`` leaves the clipping out (the per-layer step clips by
  itself: ``so.per_layer_train_step(clip_norm=...)``).
  """
  get(name)  # a KeyError for an unknown name
  mask = matrices if weight_decay else None
  if name == 'adamw':
    tx = optax.adamw(learning_rate_schedule, b1=0.9, b2=0.999, eps=1e-8,
                     weight_decay=weight_decay, mask=mask)
  else:
    preset = _preset(name)
    keywords = {'rank': rank, 'refresh': refresh, 'seed': seed,
                'basis': basis, 'weight_decay': weight_decay, 'mask': mask,
                'dimension_numbers': block_matrices}
    accepted = inspect.signature(preset).parameters
    tx = preset(learning_rate_schedule, **{
        k: v for k, v in keywords.items() if k in accepted and v is not None})
  if clip_norm is None:
    return tx
  return optax.chain(optax.clip_by_global_norm(clip_norm), tx)
