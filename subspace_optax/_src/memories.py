"""Builders of protected-subspace memories, called at task boundaries.

Each returns a pytree with the structure of the params whose matrix leaves are
:class:`~subspace_optax.continual.ProtectedSubspace` (``MaskedNode()``
elsewhere). Put one into an optimizer state with
:func:`~subspace_optax.continual.set_memory` (replace) or grow the state's
memory with :func:`~subspace_optax.continual.add_directions`.

* :func:`sculpt_memory` — the weights' own top singular directions with an
  adaptive rank per layer (Sculpting Subspaces, arXiv 2504.07097).
* :func:`gpm_memory` — the span of each layer's input activations up to an
  energy threshold, grown incrementally (GPM, arXiv 2103.09762).
* :func:`gradient_memory` — the span of each matrix's gradients up to an energy
  threshold (a per-matrix, low-memory variant of OGD, arXiv 1910.07104).

All decompositions run in float32. Non-finite input (a NaN or Inf weight,
activation or gradient) is refused with a ``ValueError`` naming the leaf,
before any decomposition runs (LAPACK's SVD can hang on a matrix mixing Inf with
finite entries). Under ``jax.jit``, where a builder cannot raise, the
non-finite entries are replaced by zeros before the decomposition (so it never
hangs) and that leaf's memory comes out filled with NaN, which
:func:`set_memory` and :func:`orthogonal_to` refuse as soon as they see
concrete values, instead of a memory that silently protects nothing.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Optional
import warnings

import jax
import jax.numpy as jnp
import optax

from subspace_optax._src import layout as layout_lib
from subspace_optax._src import low_rank as low_rank_lib
from subspace_optax._src import memory_updates
from subspace_optax._src import protected as protected_lib

ProtectedSubspace = protected_lib.ProtectedSubspace
_HIGHEST = jax.lax.Precision.HIGHEST


def _prefix_leaves(tree, treedef, what):
  """Leaves of ``tree`` (structure of params, or a scalar for all leaves)."""
  if tree is None or isinstance(tree, (int, float)):
    return [tree] * treedef.num_leaves
  try:
    return treedef.flatten_up_to(tree)
  except (ValueError, TypeError) as error:
    raise ValueError(
        f'`{what}` must be a scalar or a pytree with the structure of the '
        f'params (None at leaves without one). ({error})') from error


def _check_finite(x, path: str, what: str, fix: str) -> None:
  """Raise when a concrete ``x`` has NaN or Inf entries (no-op when traced)."""
  try:
    nan, inf = int(jnp.sum(jnp.isnan(x))), int(jnp.sum(jnp.isinf(x)))
  except protected_lib.TRACED_ERRORS:
    return  # under jit: the memory of this leaf comes out NaN (see above)
  if nan or inf:
    raise ValueError(
        f'{path}: the {what} hold {nan} NaN and {inf} Inf entries (of '
        f'{jnp.size(x)}); a memory built from them would protect nothing (or '
        f'make every later update NaN). {fix}')


def _zero_non_finite(x):
  """``(x with NaN/Inf replaced by 0, whether x was finite)``.

  The decompositions only ever see the zeroed matrix, so they cannot hang.
  """
  finite = jnp.isfinite(x)
  return jnp.where(finite, x, 0.0), jnp.all(finite)


def _poison(basis, finite):
  """``basis``, or NaN everywhere when its input was not finite."""
  return jnp.where(finite, basis, jnp.nan)


def _is_memory_node(x) -> bool:
  """A memory's leaf; a None params leaf is an empty subtree, as in params."""
  return isinstance(x, (ProtectedSubspace, optax.MaskedNode))


def _paths(tree, is_leaf=None) -> list:
  return [layout_lib.path_name(p) for p, _ in
          jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)[0]]


# ----------------------------------------------------------------------------
# Sculpting Subspaces.


def activation_importance(inputs: jax.Array, outputs: jax.Array) -> jax.Array:
  """Layer importance ``I = mean_i cos(x_i, y_i)`` (Sculpting Subspaces, AdaSVD).

  ``inputs`` and ``outputs`` are a layer's input and output activations on
  calibration data of the previous task, shaped ``(..., features)`` with the
  same feature size (a square layer or a residual block). Returns the mean
  cosine similarity over every leading index.
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
  scores = _prefix_leaves(importance, treedef, 'importance')
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
  view, finite = _zero_non_finite(view)
  u, _, vh = jnp.linalg.svd(view, full_matrices=False)
  keep = jnp.clip(jnp.floor(fraction * d + 1e-6), 0, capacity).astype(jnp.int32)
  mask = jnp.arange(capacity) < keep[..., None]  # (*batch, capacity)
  left = u[..., :capacity] * mask[..., None, :]
  right = jnp.swapaxes(vh[..., :capacity, :], -1, -2) * mask[..., None, :]
  return _poison(left, finite), _poison(right, finite), keep


RULES = ('importance', 'released')


class RankClampedWarning(UserWarning):
  """A rank asked of a memory builder exceeded what the matrix or the memory
  holds and was clamped (the message names each leaf)."""


def released_rank(rows: int, columns: int, task: int,
                  fraction_step: float = 0.07) -> int:
  """The released Sculpting Subspaces rank ``floor(max(m, n) · s_t)``.

  ``s_t = fraction_step · t`` after ``t`` finished tasks (the released code
  grows the fraction by 0.07 per task; starting at one step after the first
  task is this library's reading). Not clamped: may exceed ``min(m, n)``.
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
    ``floor(max_fraction · min(m, n))`` with a :class:`RankClampedWarning`
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
  """
  if not 0.0 <= min_fraction <= max_fraction <= 1.0:
    raise ValueError(
        '`min_fraction` and `max_fraction` must satisfy 0 <= min <= max <= 1, '
        f'got {min_fraction}, {max_fraction}.')
  if rule not in RULES:
    raise ValueError(f'`rule` must be one of {RULES}, got {rule!r}.')
  use_left, use_right = protected_lib.mode_sides(mode)
  params = low_rank_lib.unbox(params)
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
      _paths(params), leaves, layouts, fractions):
    if lay is None:
      out.append(optax.MaskedNode())
      continue
    _check_finite(p, path, 'weights', 'Restore finite weights (e.g. the '
                  'last finite checkpoint) before building the memory.')
    capacity = max(1, math.floor(
        max_fraction * min(lay.rows, lay.columns) + 1e-6))
    left, right, keep = _top_singular(jnp.asarray(p), fraction, lay, capacity)
    out.append(ProtectedSubspace(
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
    warnings.warn(
        f"sculpt_memory(rule='released', task={task}): the rank "
        'floor(max(m, n) * s_t) exceeds min(m, n) or the capacity '
        'floor(max_fraction * min(m, n)) and was clamped for '
        f'{len(clamped)} matrices: {"; ".join(clamped)}. Those matrices keep '
        'no free direction on the clamped side when the rank reaches min(m, '
        'n).', RankClampedWarning, stacklevel=3)
  return fractions


# ----------------------------------------------------------------------------
# Energy-threshold memories (GPM, gradients).


def _energy_directions(rows, basis, threshold):
  """New directions for the span of ``rows`` (N, k) beyond ``basis`` (k, c).

  GPM's criterion: with ``R = rowsᵀ`` and ``R̂ = R - MMᵀR``, add the fewest
  top left singular vectors of ``R̂`` such that
  ``(‖R‖² - ‖R̂‖² + Σ_{i<=j} σ̂_i²) / ‖R‖² >= threshold``; none when the memory
  already captures that energy. Returns ``(candidates (k, r), count)``.
  """
  matrix, _ = _zero_non_finite(rows.astype(jnp.float32).T)  # (k, N)
  total = jnp.sum(matrix * matrix)
  if basis is not None:
    matrix = matrix - jnp.matmul(
        basis, jnp.matmul(basis.T, matrix, precision=_HIGHEST),
        precision=_HIGHEST)
  remaining = jnp.sum(matrix * matrix)
  u, s, _ = jnp.linalg.svd(matrix, full_matrices=False)
  captured = total - remaining
  cumulative = captured + jnp.cumsum(s * s)
  safe_total = jnp.where(total > 0, total, 1.0)
  short = jnp.sum(cumulative / safe_total < threshold)
  nonzero = jnp.sum(s > s[0] * 1e-6) if s.shape[0] else 0
  done = (captured / safe_total >= threshold) | (total <= 0)
  count = jnp.where(done, 0, jnp.minimum(short + 1, nonzero)).astype(jnp.int32)
  mask = jnp.arange(s.shape[0]) < count
  return u * mask, count


@functools.partial(jax.jit, static_argnums=(3,))
def _energy_batched(rows, basis, threshold, num_batch_axes):
  return layout_lib.batched(
      lambda r, b: _energy_directions(r, b, threshold), num_batch_axes)(
          rows, basis)


def _grow_from_rows(memory, rows_per_leaf, threshold, tolerance, on_overflow):
  """Add to ``memory`` the energy-threshold directions of each leaf's rows.

  ``rows_per_leaf`` is a flat list (memory leaf order) of None or a dict
  ``{'left': (*batch, N, m), 'right': (*batch, N, n)}``.
  """
  memory_leaves, treedef = jax.tree.flatten(
      memory, is_leaf=_is_memory_node)
  thresholds = _prefix_leaves(threshold, treedef, 'threshold')
  paths = _paths(memory, _is_memory_node)
  new, finite = [], []
  for path, mem, rows_by_side, thr in zip(
      paths, memory_leaves, rows_per_leaf, thresholds):
    finite.append({side: jnp.all(jnp.isfinite(rows))
                   for side, rows in (rows_by_side or {}).items()})
    empty = ProtectedSubspace(*([optax.MaskedNode()] * 4))
    if not isinstance(mem, ProtectedSubspace) or rows_by_side is None:
      new.append(empty if isinstance(mem, ProtectedSubspace) else mem)
      continue
    if thr is None or not 0.0 < float(thr) <= 1.0:
      raise ValueError(f'{path}: `threshold` must lie in (0, 1], got {thr}.')
    fields = dict(empty._asdict())
    for side, rows in rows_by_side.items():
      basis = getattr(mem, side)
      if protected_lib.is_masked(basis):
        continue
      candidates, count = _energy_batched(
          rows, basis.astype(jnp.float32), jnp.float32(thr), basis.ndim - 2)
      fields[side], fields[side + '_count'] = candidates, count
    new.append(ProtectedSubspace(**fields))
  grown = treedef.flatten_up_to(memory_updates.add_directions(
      memory, treedef.unflatten(new), tolerance=tolerance,
      on_overflow=on_overflow))
  # Under jit a non-finite input cannot raise: its memory becomes NaN.
  return treedef.unflatten([
      mem._replace(**{side: _poison(getattr(mem, side), flag)
                      for side, flag in flags.items()}) if flags else mem
      for mem, flags in zip(grown, finite)])


def _fresh_memory(memory, params, mode, capacity, dimension_numbers):
  if memory is not None:
    return memory
  if params is None:
    raise ValueError(
        'Give `memory` (to grow) or `params` (to size a fresh memory).')
  return protected_lib.empty_memory(
      params, mode=mode, capacity=capacity, dimension_numbers=dimension_numbers)


def gpm_memory(
    activations,
    threshold: Any = 0.97,
    memory: Any = None,
    *,
    params: Any = None,
    capacity: Any = 1.0,
    dimension_numbers: Any = None,
    tolerance: float = 1e-4,
    on_overflow: str = 'raise',
):
  """Input-activation memory with an energy threshold (GPM), grown per task.

  Saha, Garg, Roy, `Gradient Projection Memory for Continual Learning
  <https://arxiv.org/abs/2103.09762>`_, ICLR 2021. For a layer ``y = x W``
  (``W`` is ``m x n``, ``x`` has ``m`` features) whose inputs on the finished
  task form ``R`` (``m x N``, one column per sample) and memory ``M``:
  ``R̂ = R - MMᵀR``; add the fewest top left singular vectors of ``R̂`` with

  .. math::
    \\frac{‖R‖² - ‖R̂‖² + \\sum_{i \\le j} σ̂_i²}{‖R‖²} \\ge ε_{th},

  none when ``M`` already captures ``ε_th`` of the energy. (The reference code
  counts ``cumsum < ε_th``, which can stop one direction short; this takes the
  smallest ``j`` that reaches the threshold.) Protect the result with
  ``orthogonal_to(mode='left')``: ``Δ ← (I - MMᵀ)Δ``, so ``x Δ = 0`` for
  every protected input ``x``.

  Args:
    activations: pytree with the structure of the params: at each matrix leaf
      the layer's inputs ``(*batch, N, m)`` (samples by features; for convs,
      im2col patches), None at leaves to leave unchanged.
    threshold: ``ε_th`` in (0, 1], a float or a pytree of floats per leaf
      (GPM: 0.97 + 0.003·task on CIFAR-100, [0.95, 0.99, 0.99] on PMNIST).
    memory: the memory to grow (e.g. ``get_memory(opt_state)``); None for the
      first task (a fresh left-side memory of ``capacity``, needs ``params``).
    params: params (or shapes) to size a fresh memory; only without ``memory``.
    capacity: capacity of a fresh memory (see :func:`empty_memory`).
    dimension_numbers: of a fresh memory, as in :func:`subspace_optax.low_rank`.
    tolerance, on_overflow: as in :func:`add_directions`.

  Returns:
    The grown memory (same shapes as ``memory``).
  """
  memory = _fresh_memory(memory, params, 'left', capacity, dimension_numbers)
  memory_leaves, treedef = jax.tree.flatten(
      memory, is_leaf=_is_memory_node)
  paths = _paths(memory, _is_memory_node)
  rows_per_leaf = []
  for path, mem, x in zip(paths, memory_leaves,
                          _prefix_leaves(activations, treedef, 'activations')):
    if x is None or not isinstance(mem, ProtectedSubspace):
      rows_per_leaf.append(None)
      continue
    if protected_lib.is_masked(mem.left):
      raise ValueError(f'{path}: GPM needs a memory with a left (input) side.')
    x = jnp.asarray(x, jnp.float32)
    batch, rows = mem.left.shape[:-2], mem.left.shape[-2]
    if x.ndim != len(batch) + 2 or x.shape[:len(batch)] != batch or (
        x.shape[-1] != rows):
      raise ValueError(
          f'{path}: activations of shape {x.shape} do not fit; expected '
          f'{batch} + (samples, {rows}) (the layer inputs).')
    _check_finite(x, path, 'activations', 'Drop the samples whose '
                  'activations are not finite.')
    rows_per_leaf.append({'left': x})
  return _grow_from_rows(memory, rows_per_leaf, threshold, tolerance,
                         on_overflow)


def gradient_memory(
    gradients,
    threshold: Any = 0.97,
    memory: Any = None,
    *,
    mode: str = 'two_sided',
    capacity: Any = 1.0,
    dimension_numbers: Any = None,
    tolerance: float = 1e-4,
    on_overflow: str = 'raise',
):
  """Memory of each matrix's gradient span with an energy threshold.

  A per-matrix variant of orthogonal gradient descent (Farajtabar et al.,
  `OGD <https://arxiv.org/abs/1910.07104>`_, AISTATS 2020) that stores
  ``(m + n) c`` floats per matrix instead of whole-model gradients: the left
  side spans the column spaces of the stacked gradients ``[G_1 … G_s]``
  (``m x sn``), the right side the row spaces of ``[G_1; …; G_s]``
  (``sm x n``), each grown with GPM's energy criterion (:func:`gpm_memory`).
  Note that for a linear layer ``G = Σ xᵀδ``, so the left side of a gradient
  memory lies in the span of the layer inputs, like GPM's.

  Args:
    gradients: pytree with the structure of the params, every leaf holding
      ``s`` gradients stacked on a new leading axis, ``(s, *leaf_shape)``
      (e.g. per-batch gradients of the finished task).
    threshold: energy threshold in (0, 1] (float or pytree per leaf).
    memory: memory to grow; None for a fresh one of ``capacity`` holding the
      sides of ``mode`` (``'two_sided'``, ``'left'``, ``'right'``).
    capacity, dimension_numbers, tolerance, on_overflow: as in
      :func:`gpm_memory`.

  Returns:
    The grown memory.
  """
  gradients = low_rank_lib.unbox(gradients)
  shapes = jax.tree.map(
      lambda g: jax.ShapeDtypeStruct(jnp.shape(g)[1:], jnp.float32), gradients)
  memory = _fresh_memory(memory, shapes, mode, capacity, dimension_numbers)
  leaves, treedef = jax.tree.flatten(gradients)
  layouts = protected_lib.matrix_layouts(shapes, dimension_numbers)
  memory_leaves = protected_lib.check_memory(memory, shapes, dimension_numbers)
  rows_per_leaf = []
  for path, g, lay, mem in zip(
      _paths(gradients), leaves, layouts, memory_leaves):
    if lay is None:
      rows_per_leaf.append(None)
      continue
    _check_finite(g, path, 'gradients', 'Drop the gradients that are '
                  'not finite.')
    views = jax.vmap(lambda x, lay=lay: layout_lib.matrix_view(x, lay))(
        jnp.asarray(g, jnp.float32))
    batch = lay.batch_shape
    views = jnp.moveaxis(views, 0, len(batch))  # (*batch, s, m, n)
    s, m, n = views.shape[-3:]
    rows = {}
    if not protected_lib.is_masked(mem.left):
      rows['left'] = jnp.swapaxes(views, -1, -2).reshape(batch + (s * n, m))
    if not protected_lib.is_masked(mem.right):
      rows['right'] = views.reshape(batch + (s * m, n))
    rows_per_leaf.append(rows)
  del treedef
  return _grow_from_rows(memory, rows_per_leaf, threshold, tolerance,
                         on_overflow)
