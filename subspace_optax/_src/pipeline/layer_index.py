"""Which layer of a scanned stack an update is for (trace-time context).

:func:`~subspace_optax.per_layer_train_step` updates layer ``l`` of a stack of
``L`` layers by calling the optimizer on a one-layer tree (leading axis of
size 1). The random keys of a stacked leaf are ``L`` keys split from one leaf
key (:func:`subspace_optax._src.pipeline.stages.batched_keys`); while a
:func:`layer` context is active, a leading batch axis of size 1 takes key
``l`` of those ``L``, so the one-layer update draws the same random bases as
the whole-tree update. The context only exists while the update is traced.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Iterator, Mapping, NamedTuple, Optional

import jax


class LayerIndex(NamedTuple):
  """Layer ``index`` (a traced int32 scalar) of a stack of ``size`` layers.

  Where the caller knows them (:mod:`layer_loop`), ``finite`` and
  ``refresh_finite`` map a leaf's position in the flat gradient tree to
  whether the whole stacked leaf (every layer) is finite, and whether this
  step's refresh gives a finite basis for every layer of it: a refresh is
  then kept or dropped for the whole leaf, as in the whole-tree update.
  Leaves not in them are judged by their one layer. ``similarity`` maps a
  leaf to the similarity of this step's new bases to the old, averaged over
  every layer (what a lazy refresh policy records for the whole leaf).
  """

  index: jax.Array
  size: int
  finite: Optional[Mapping[int, jax.Array]] = None
  refresh_finite: Optional[Mapping[int, jax.Array]] = None
  similarity: Optional[Mapping[int, jax.Array]] = None


_STATE = threading.local()


def current() -> Optional[LayerIndex]:
  """The active :func:`layer` context, or None."""
  return getattr(_STATE, 'layer', None)


@contextlib.contextmanager
def layer(index: jax.Array, size: int,
          finite: Optional[Mapping[int, jax.Array]] = None,
          refresh_finite: Optional[Mapping[int, jax.Array]] = None,
          similarity: Optional[Mapping[int, jax.Array]] = None
          ) -> Iterator[LayerIndex]:
  """Within this context, one-layer updates are those of layer ``index``.

  Examples:
    >>> import jax.numpy as jnp
    >>> with layer(jnp.int32(2), 4) as where:
    ...   where.size
    4
    >>> current() is None
    True
  """
  previous = current()
  _STATE.layer = LayerIndex(index, size, finite, refresh_finite, similarity)
  try:
    yield _STATE.layer
  finally:
    _STATE.layer = previous
