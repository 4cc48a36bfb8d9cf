"""Sculpting Subspaces' memory: the weights' own top singular directions.

Nayak et al., arXiv 2504.07097, 2025: an adaptive rank per layer from its
input/output importance (the paper's rule) or the released code's schedule.
The result has the structure of the params, with a
:class:`~subspace_optax.continual.ProtectedSubspace` at each matrix leaf; put
it into an optimizer state with :func:`~subspace_optax.continual.set_memory`.
All decompositions run in float32.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Optional

import jax
import jax.numpy as jnp
import optax

from subspace_optax._src import utils
from subspace_optax._src.continual import memory_inputs
from subspace_optax._src.continual import protected as protected_lib
from subspace_optax._src.pipeline import layout as layout_lib

_HIGHEST = jax.lax.Precision.HIGHEST


# ----------------------------------------------------------------------------
# Sculpting Subspaces.


def activation_importance(inputs: jax.Array, outputs: jax.Array) -> jax.Array:
  """Layer importance ``I = mean_i cos(x_i, y_i)`` (Sculpting Subspaces, AdaSVD).

  ``inputs`` and ``outputs`` are a layer's input and output activations on
  calibration data of the previous task, shaped ``(..., features)`` with the
  same feature size (a square layer or a residual block). Returns the mean
  cosine similarity over every leading index.

  Args:
    inputs: the layer's inputs ``x_i``, ``(..., samples, features)``.
    outputs: its outputs ``y_i`` (same leading shape; same feature count).

  Returns:
    The importance, a float32 scalar (an array of the batch shape for
    stacked layers).

  Examples:
    >>> import jax.numpy as jnp
    >>> import subspace_optax as so
    >>> x = jnp.array([[1.0, 0.0], [0.0, 1.0]])
    >>> float(so.continual.activation_importance(x, 2 * x))  # aligned: 1
    1.0
  """
  inputs = jnp.asarray(inputs, jnp.float32)
  outputs = jnp.asarray(outputs, jnp.float32)
  if inputs.shape != outputs.shape:
    raise ValueError(
        f'activation_importance needs inputs and outputs of the same shape '
        f'(cosine between x_i and y_i); got {inputs.shape} and {outputs.shape}. '
        'For non-square layers use the importance of the enclosing block.')
  dot = jnp.sum(inputs * outputs, axis=-1)
  norms = jnp.linalg.norm(inputs, axis=-1) * jnp.linalg.norm(outputs, axis=-1)
  return jnp.mean(dot / jnp.maximum(norms, 1e-12))


NORMALIZATIONS = ('max', 'minmax')


def retained_fractions(importance, treedef, layouts, min_fraction, max_fraction,
                       normalization='max'):
  """Per matrix leaf ``k/d = mrr + I_n (trr - mrr)``.

  ``I_n`` is the importance normalised across every matrix (and stacked layer)
  to ``[0, 1]``: ``'max'`` divides the (non-negative part of the) scores by
  their maximum, ``'minmax'`` maps the least important layer to 0 and the most
  important to 1. ``importance=None``, a leaf whose importance is None, or all
  scores equal give ``I_n = 1`` (``max_fraction``).
  """
  if normalization not in NORMALIZATIONS:
    raise ValueError(f'`normalization` must be one of {NORMALIZATIONS}, got '
                     f'{normalization!r}.')
  scores = memory_inputs.prefix_leaves(importance, treedef, 'importance')
  given = [jnp.asarray(s, jnp.float32) for s, lay in zip(scores, layouts)
           if lay is not None and s is not None]
  if given:
    every = jnp.concatenate([jnp.ravel(s) for s in given])
    if normalization == 'max':
      every = jnp.maximum(every, 0.0)
      low, high = jnp.zeros([], jnp.float32), jnp.max(every)
    else:
      low, high = jnp.min(every), jnp.max(every)
    spread = high - low
  fractions = []
  for s, lay in zip(scores, layouts):
    if lay is None:
      fractions.append(None)
      continue
    if s is None or not given:
      normalised = jnp.ones(lay.batch_shape, jnp.float32)
    else:
      s = jnp.broadcast_to(jnp.asarray(s, jnp.float32), lay.batch_shape)
      if normalization == 'max':
        s = jnp.maximum(s, 0.0)
      normalised = jnp.where(spread > 0, (s - low) / jnp.where(
          spread > 0, spread, 1.0), 1.0)
    fractions.append(min_fraction + normalised * (max_fraction - min_fraction))
  return fractions


@functools.partial(jax.jit, static_argnums=(2, 3))
def _top_singular(leaf, fraction, lay, capacity):
  """Top ``k = floor(fraction d)`` singular vectors, zero-padded to capacity."""
  d = min(lay.rows, lay.columns)
  view = layout_lib.matrix_view(leaf, lay).astype(jnp.float32)
  view, finite = memory_inputs.zero_non_finite(view)
  u, _, vh = jnp.linalg.svd(view, full_matrices=False)
  keep = jnp.clip(jnp.floor(fraction * d + 1e-6), 0, capacity).astype(jnp.int32)
  mask = jnp.arange(capacity) < keep[..., None]  # (*batch, capacity)
  left = u[..., :capacity] * mask[..., None, :]
  right = jnp.swapaxes(vh[..., :capacity, :], -1, -2) * mask[..., None, :]
  return memory_inputs.poison(left, finite), memory_inputs.poison(right, finite), keep


RULES = ('importance', 'released')


def released_rank(rows: int, columns: int, task: int,
                  fraction_step: float = 0.07) -> int:
  """The released Sculpting Subspaces rank ``floor(max(m, n) · s_t)``.

  ``s_t = fraction_step · t`` after ``t`` finished tasks (the released code
  grows the fraction by 0.07 per task; starting at one step after the first
  task is this library's reading). Not clamped: may exceed ``min(m, n)``.

  Args:
    rows: ``m``.
    columns: ``n``.
    task: finished tasks ``t``.
    fraction_step: growth of ``s_t`` per task.

  Returns:
    The rank, an int.

  Examples:
    >>> import subspace_optax as so
    >>> so.continual.released_rank(100, 40, task=2)  # floor(100 * 0.14)
    14
  """
  return math.floor(max(rows, columns) * fraction_step * task + 1e-6)


def sculpt_memory(
    params,
    importance: Any = None,
    *,
    rule: str = 'importance',
    task: Optional[int] = None,
    fraction_step: float = 0.07,
    min_fraction: float = 0.1,
    max_fraction: float = 0.8,
    normalization: str = 'max',
    mode: str = 'two_sided',
    dimension_numbers: Any = None,
):
  """Each weight's important singular directions (Sculpting Subspaces).

  Nayak et al., `Sculpting Subspaces: Constrained Full Fine-Tuning in LLMs for
  Continual Learning <https://arxiv.org/abs/2504.07097>`_, 2025. Per matrix
  ``W = UΣVᵀ`` (float32 SVD, ``d = min(m, n)``), keep the top ``k`` singular
  directions with

  .. math::
    k = \\lfloor d\\,(mrr + I_n\\,(trr - mrr)) \\rfloor,

  ``mrr = min_fraction``, ``trr = max_fraction`` and ``I_n`` the layer
  importance normalised across every matrix (and stacked layer) to ``[0, 1]``
  (``normalization``: ``'max'`` divides by the largest score, ``'minmax'``
  stretches the scores to ``[0, 1]``; the paper's text does not pin this
  down). The paper's importance is :func:`activation_importance` of the
  layer on the previous task's data; ``None`` keeps ``max_fraction``
  everywhere (the released code uses a fixed fraction too). Call it before each
  new task on the current weights: the paper re-decomposes the updated weights
  and **replaces** the memory (:func:`set_memory`).

  Two rank rules:

  * ``rule='importance'`` (default): the paper's adaptive rank above.
  * ``rule='released'``: the rule of the authors' released code, where the
    adaptive rank is commented out: ``k = floor(max(m, n) · s_t)`` with
    ``s_t = fraction_step · task`` (0.07 per finished task), the same for
    every matrix, clamped to ``min(m, n)`` and to the memory's capacity
    ``floor(max_fraction · min(m, n))`` with a :class:`~subspace_optax.continual.RankClampedWarning`
    (use ``max_fraction=1.0`` here and in :func:`sculpt`).

  Args:
    params: current parameters (arrays or nnx Variables).
    importance: None, or a pytree with the params' structure holding a scalar
      (or an array of the batch shape, for stacked layers) per matrix leaf
      (``rule='importance'`` only).
    rule: ``'importance'`` or ``'released'``, see above.
    task: ``rule='released'``: how many tasks are finished (1 after the first).
    fraction_step: ``rule='released'``: the growth of ``s_t`` per task.
    min_fraction: ``mrr`` (0.1 in the paper's blog).
    max_fraction: ``trr`` (0.8 in the blog).
    normalization: ``'max'`` (default) or ``'minmax'``, see above.
    mode: which sides to return: ``'two_sided'``/``'block'`` (U and V),
      ``'left'`` (U) or ``'right'`` (V).
    dimension_numbers: as in :func:`subspace_optax.low_rank`.

  Returns:
    A memory whose capacity per leaf is ``floor(max_fraction * d)`` (static,
    whatever the importance), filled with ``k`` columns per matrix.

  Examples:
    >>> import jax.numpy as jnp
    >>> import subspace_optax as so
    >>> params = {'w': jnp.diag(jnp.array([4.0, 3.0, 2.0, 1.0]))}
    >>> memory = so.continual.sculpt_memory(params, max_fraction=0.5)
    >>> int(memory['w'].left_count)  # floor(0.5 * 4) top directions
    2
  """
  if not 0.0 <= min_fraction <= max_fraction <= 1.0:
    raise ValueError(
        '`min_fraction` and `max_fraction` must satisfy 0 <= min <= max <= 1, '
        f'got {min_fraction}, {max_fraction}.')
  if rule not in RULES:
    raise ValueError(f'`rule` must be one of {RULES}, got {rule!r}.')
  use_left, use_right = protected_lib.mode_sides(mode)
  params = utils.unbox(params)
  leaves, treedef = jax.tree.flatten(params)
  layouts = protected_lib.matrix_layouts(params, dimension_numbers)
  if rule == 'released':
    fractions = _released_fractions(importance, task, fraction_step, layouts,
                                    max_fraction)
  else:
    fractions = retained_fractions(
        importance, treedef, layouts, min_fraction, max_fraction,
        normalization)
  out = []
  for path, p, lay, fraction in zip(
      memory_inputs.paths(params), leaves, layouts, fractions):
    if lay is None:
      out.append(optax.MaskedNode())
      continue
    memory_inputs.check_finite(p, path, 'weights', 'Restore finite weights (e.g. the '
                  'last finite checkpoint) before building the memory.')
    capacity = max(1, math.floor(
        max_fraction * min(lay.rows, lay.columns) + 1e-6))
    left, right, keep = _top_singular(jnp.asarray(p), fraction, lay, capacity)
    out.append(protected_lib.ProtectedSubspace(
        left=left if use_left else optax.MaskedNode(),
        right=right if use_right else optax.MaskedNode(),
        left_count=keep if use_left else optax.MaskedNode(),
        right_count=keep if use_right else optax.MaskedNode()))
  return treedef.unflatten(out)


def _released_fractions(importance, task, fraction_step, layouts,
                        max_fraction):
  """Per matrix leaf ``k / min(m, n)`` of the released rule, clamped (warned)."""
  if importance is not None:
    raise ValueError("rule='released' uses no importance (the rank is the "
                     "same fraction of every matrix); pass importance=None.")
  if isinstance(task, bool) or not isinstance(task, int) or task < 1:
    raise ValueError(f"rule='released' needs `task`, the number of finished "
                     f'tasks (an int >= 1), got {task!r}.')
  if not fraction_step > 0:
    raise ValueError(f'`fraction_step` must be > 0, got {fraction_step}.')
  fractions, clamped = [], []
  for lay in layouts:
    if lay is None:
      fractions.append(None)
      continue
    smaller = min(lay.rows, lay.columns)
    capacity = max(1, math.floor(max_fraction * smaller + 1e-6))
    wanted = released_rank(lay.rows, lay.columns, task, fraction_step)
    if wanted > capacity:
      clamped.append(f'{lay.path} ({lay.rows}x{lay.columns}): {wanted} -> '
                     f'{capacity}')
    fractions.append(min(wanted, capacity) / smaller)
  if clamped:
    utils.warn_at_caller(
        f"sculpt_memory(rule='released', task={task}): the rank "
        'floor(max(m, n) * s_t) exceeds min(m, n) or the capacity '
        'floor(max_fraction * min(m, n)) and was clamped for '
        f'{len(clamped)} matrices: {"; ".join(clamped)}. Those matrices keep '
        'no free direction on the clamped side when the rank reaches min(m, '
        'n).', utils.RankClampedWarning)
  return fractions


# ----------------------------------------------------------------------------
# Energy-threshold memories (GPM, gradients).


