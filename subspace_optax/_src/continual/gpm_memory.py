"""Gradient projection memories: the span of inputs or gradients, grown per task.

* :func:`gpm_memory` — the span of each layer's input activations up to an
  energy threshold, grown incrementally (GPM, arXiv 2103.09762).
* :func:`gradient_memory` — the span of each matrix's gradients up to an energy
  threshold (a per-matrix, low-memory variant of OGD, arXiv 1910.07104).
"""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax

from subspace_optax._src import utils
from subspace_optax._src.continual import memory_inputs
from subspace_optax._src.continual import memory_updates
from subspace_optax._src.continual import protected as protected_lib
from subspace_optax._src.pipeline import layout as layout_lib

_HIGHEST = jax.lax.Precision.HIGHEST


# ----------------------------------------------------------------------------
# Sculpting Subspaces.


# ----------------------------------------------------------------------------
# Energy-threshold memories (GPM, gradients).


def _energy_directions(rows, basis, threshold):
  """New directions for the span of ``rows`` (N, k) beyond ``basis`` (k, c).

  GPM's criterion: with ``R = rowsᵀ`` and ``R̂ = R - MMᵀR``, add the fewest
  top left singular vectors of ``R̂`` such that
  ``(‖R‖² - ‖R̂‖² + Σ_{i<=j} σ̂_i²) / ‖R‖² >= threshold``; none when the memory
  already captures that energy. Returns ``(candidates (k, r), count)``.
  """
  matrix, _ = memory_inputs.zero_non_finite(rows.astype(jnp.float32).T)  # (k, N)
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
      memory, is_leaf=memory_inputs.is_memory_node)
  thresholds = memory_inputs.prefix_leaves(threshold, treedef, 'threshold')
  paths = memory_inputs.paths(memory, memory_inputs.is_memory_node)
  new, finite = [], []
  for path, mem, rows_by_side, thr in zip(
      paths, memory_leaves, rows_per_leaf, thresholds):
    finite.append({side: jnp.all(jnp.isfinite(rows))
                   for side, rows in (rows_by_side or {}).items()})
    empty = protected_lib.ProtectedSubspace(*([optax.MaskedNode()] * 4))
    if not isinstance(mem, protected_lib.ProtectedSubspace) or rows_by_side is None:
      new.append(empty if isinstance(mem, protected_lib.ProtectedSubspace) else mem)
      continue
    if thr is None or not 0.0 < float(thr) <= 1.0:
      raise ValueError(f'{path}: `threshold` must lie in (0, 1], got {thr}.')
    fields = dict(empty._asdict())
    for side, rows in rows_by_side.items():
      basis = getattr(mem, side)
      if utils.is_masked(basis):
        continue
      candidates, count = _energy_batched(
          rows, basis.astype(jnp.float32), jnp.float32(thr), basis.ndim - 2)
      fields[side], fields[side + '_count'] = candidates, count
    new.append(protected_lib.ProtectedSubspace(**fields))
  grown = treedef.flatten_up_to(memory_updates.add_directions(
      memory, treedef.unflatten(new), tolerance=tolerance,
      on_overflow=on_overflow))
  # Under jit a non-finite input cannot raise: its memory becomes NaN.
  return treedef.unflatten([
      mem._replace(**{side: memory_inputs.poison(getattr(mem, side), flag)
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

  Examples:
    >>> import jax.numpy as jnp
    >>> from subspace_optax import continual as cl
    >>> params = {'w': jnp.ones((4, 3))}
    >>> inputs = {'w': jnp.eye(4)[:2] * jnp.array([[3.0], [1.0]])}  # 2 samples
    >>> memory = cl.gpm_memory(inputs, 0.8, params=params)
    >>> int(memory['w'].left_count)  # 9 / 10 of the energy in one direction
    1
  """
  memory = _fresh_memory(memory, params, 'left', capacity, dimension_numbers)
  memory_leaves, treedef = jax.tree.flatten(
      memory, is_leaf=memory_inputs.is_memory_node)
  paths = memory_inputs.paths(memory, memory_inputs.is_memory_node)
  rows_per_leaf = []
  for path, mem, x in zip(paths, memory_leaves,
                          memory_inputs.prefix_leaves(activations, treedef, 'activations')):
    if x is None or not isinstance(mem, protected_lib.ProtectedSubspace):
      rows_per_leaf.append(None)
      continue
    if utils.is_masked(mem.left):
      raise ValueError(f'{path}: GPM needs a memory with a left (input) side.')
    x = jnp.asarray(x, jnp.float32)
    batch, rows = mem.left.shape[:-2], mem.left.shape[-2]
    if x.ndim != len(batch) + 2 or x.shape[:len(batch)] != batch or (
        x.shape[-1] != rows):
      raise ValueError(
          f'{path}: activations of shape {x.shape} do not fit; expected '
          f'{batch} + (samples, {rows}) (the layer inputs).')
    memory_inputs.check_finite(x, path, 'activations', 'Drop the samples whose '
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

  Examples:
    >>> import jax.numpy as jnp
    >>> from subspace_optax import continual as cl
    >>> grads = {'w': jnp.diag(jnp.array([3.0, 1.0, 0.0]))[None]}  # s = 1
    >>> memory = cl.gradient_memory(grads, 0.8, mode='left')
    >>> int(memory['w'].left_count)  # 9 / 10 of the energy in one direction
    1
  """
  gradients = utils.unbox(gradients)
  shapes = jax.tree.map(
      lambda g: jax.ShapeDtypeStruct(jnp.shape(g)[1:], jnp.float32), gradients)
  memory = _fresh_memory(memory, shapes, mode, capacity, dimension_numbers)
  leaves, treedef = jax.tree.flatten(gradients)
  layouts = protected_lib.matrix_layouts(shapes, dimension_numbers)
  memory_leaves = protected_lib.check_memory(memory, shapes, dimension_numbers)
  rows_per_leaf = []
  for path, g, lay, mem in zip(
      memory_inputs.paths(gradients), leaves, layouts, memory_leaves):
    if lay is None:
      rows_per_leaf.append(None)
      continue
    memory_inputs.check_finite(g, path, 'gradients', 'Drop the gradients that are '
                  'not finite.')
    views = jax.vmap(lambda x, lay=lay: layout_lib.matrix_view(x, lay))(
        jnp.asarray(g, jnp.float32))
    batch = lay.batch_shape
    views = jnp.moveaxis(views, 0, len(batch))  # (*batch, s, m, n)
    s, m, n = views.shape[-3:]
    rows = {}
    if not utils.is_masked(mem.left):
      rows['left'] = jnp.swapaxes(views, -1, -2).reshape(batch + (s * n, m))
    if not utils.is_masked(mem.right):
      rows['right'] = views.reshape(batch + (s * m, n))
    rows_per_leaf.append(rows)
  del treedef
  return _grow_from_rows(memory, rows_per_leaf, threshold, tolerance,
                         on_overflow)
