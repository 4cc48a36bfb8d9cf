"""Leaves that a low-rank transform leaves at full size, reported at init.

A user picks a low-rank optimizer for its memory; a leaf that silently keeps
full-size Adam moments costs exactly what they came to save. Two cases are
reported, once, when the state is built:

* a leaf of rank >= 3 under the default ``dimension_numbers`` (only 2-D leaves
  are matrices then): stacked ``(L, m, n)`` layers from ``nnx.scan`` want
  ``dimension_numbers=subspace_optax.last_two_axes`` (one basis per layer), and
  ``(H, W, I, O)`` convolution kernels want
  ``dimension_numbers=subspace_optax.conv_kernels`` (one ``(H·W·I, O)`` basis);
* a projected leaf whose low-rank state is not smaller than Adam's: a basis of
  ``k·r`` and moments of ``2·r·l`` floats against ``2·k·l``, i.e.
  ``r ≥ 2kl / (k + 2l)``; a ``rank`` at or above ``min(m, n)`` (clamped to it)
  is always such a case.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import jax
import numpy as np

from subspace_optax._src import utils
from subspace_optax._src.pipeline import layout as layout_lib


class FullSizeWarning(UserWarning):
  """A leaf keeps full-size optimizer state under a low-rank transform."""


def _saves_memory(layout: layout_lib.MatrixLayout) -> bool:
  k, l, r = layout.projected_dim, layout.other_dim, layout.rank
  return r * (k + 2 * l) < 2 * k * l


def full_size_leaves(
    params: Any,
    layouts: Sequence[Optional[layout_lib.MatrixLayout]],
    dimension_numbers: Any,
    rank: int | float,
) -> list[str]:
  """One line per leaf that keeps full-size state, saying why and the fix."""
  lines = []
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  for (path, leaf), layout in zip(flat, layouts):
    name = layout_lib.path_name(path)
    shape = tuple(np.shape(leaf))
    if layout is None:
      if dimension_numbers is None and len(shape) >= 3 and math.prod(shape):
        lines.append(
            f'{name} {shape}: not projected (only 2-D leaves are matrices under '
            'the default dimension_numbers); stacked layers (L, m, n): '
            'dimension_numbers=subspace_optax.last_two_axes; convolution '
            'kernels (H, W, I, O): dimension_numbers=subspace_optax.conv_kernels')
      continue
    if not _saves_memory(layout):
      smaller = min(layout.rows, layout.columns)
      clamped = (f'rank={rank!r} clamped to min(m, n)={smaller}; '
                 if isinstance(rank, int) and rank > smaller else '')
      lines.append(
          f'{name} {shape}: {clamped}rank {layout.rank} keeps a state of '
          f'{layout.rank * (layout.projected_dim + 2 * layout.other_dim)} floats '
          f'per matrix, not less than full Adam\'s '
          f'{2 * layout.projected_dim * layout.other_dim}; use a smaller rank '
          '(or a fraction, e.g. rank=0.25), or exclude the leaf (None in '
          'dimension_numbers) to give it plain Adam')
  return lines


def warn_full_size(params: Any,
                   layouts: Sequence[Optional[layout_lib.MatrixLayout]],
                   dimension_numbers: Any, rank: int | float) -> None:
  """Warn (:class:`FullSizeWarning`) naming every leaf kept at full size."""
  lines = full_size_leaves(params, layouts, dimension_numbers, rank)
  if lines:
    utils.warn_at_caller(
        'low_rank: these leaves keep full-size optimizer state:\n  '
        + '\n  '.join(lines), FullSizeWarning)
