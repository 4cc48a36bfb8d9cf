"""The stages of one :func:`~subspace_optax.low_rank` update, in pipeline order.

An update runs over a :class:`Leaf` record per projected leaf:

1. :func:`refresh_bases` — a new basis where the refresh policy says so (or on
   every step for online bases); never from a non-finite gradient;
2. :func:`transitions` — ``R = Q_newᵀ Q_old`` and how far each basis moved;
3. :func:`move_moments` — the inner moments follow a refreshed basis (keep,
   reset or transport);
4. the inner optimizer on ``C = QᵀG`` (in :func:`~subspace_optax.low_rank`),
   then, per matrix and back in the leaf's shape and dtype,
   :func:`unproject_leaves`, ``α Q N``, or, with a residual path,
   :func:`residual_leaves`, ``α Q N + residual(G - QQᵀG)``;
5. :func:`leaf_updates` — the flat output tree.
"""
from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from subspace_optax._src import utils
from subspace_optax._src.bases import base as bases_lib
from subspace_optax._src.pipeline import batching
from subspace_optax._src.pipeline import layer_index
from subspace_optax._src.pipeline import layout as layout_lib
from subspace_optax._src.pipeline import per_matrix
from subspace_optax._src.pipeline import sharding
from subspace_optax._src.refresh import every as refresh_lib
from subspace_optax._src.transforms import moments as moments_lib


def batched_keys(key: jax.Array, batch_shape: tuple[int, ...]) -> jax.Array:
  where = layer_index.current()  # a one-layer update of a scanned stack
  if where is not None and tuple(batch_shape[:1]) == (1,):
    full = (where.size,) + tuple(batch_shape[1:])
    keys = jax.random.split(key, math.prod(full)).reshape(full)
    return jax.lax.dynamic_slice_in_dim(keys, where.index, 1, 0)
  keys = jax.random.split(key, math.prod(batch_shape))
  return keys.reshape(batch_shape) if batch_shape else keys[0]


def is_zero(scale) -> bool:
  return isinstance(scale, (int, float)) and scale == 0


def all_finite(x: jax.Array) -> jax.Array:
  """Whether every entry of ``x`` is finite.

  On the CPU a stack (3 or more axes) is tested one slice of its leading
  axis at a time: ``jnp.all(jnp.isfinite(x))`` compiles on XLA:CPU to a
  boolean copy of the whole leaf before its reduction (a quarter of a
  float32 stack). A reduction that propagates NaN (``max |x|``, a sum of
  ``x · 0``) would avoid the copy, but a cross-process all-reduce need not
  propagate NaN, and a sum of a bfloat16 leaf accumulates in float32. GPU
  lowerings fuse the test into its reduction.
  """

  def sliced(y):
    def body(i, carry):
      finite, y = carry
      y = jax.lax.optimization_barrier(y)  # no whole-stack test hoisted
      one = jax.lax.dynamic_index_in_dim(y, i, keepdims=False)
      return finite & jnp.all(jnp.isfinite(one)), y

    return jax.lax.fori_loop(0, y.shape[0], body, (jnp.asarray(True), y))[0]

  whole = lambda y: jnp.all(jnp.isfinite(y))
  if x.ndim < 3 or x.shape[0] < 2:
    return whole(x)
  return per_matrix.on_platform(x, cpu=sliced, gpu=whole)


def _given(field: str, leaf: Leaf):
  """The whole stacked leaf's ``field`` of the active
  :class:`~subspace_optax._src.pipeline.layer_index.LayerIndex`, or None."""
  where = layer_index.current()
  given = None if where is None else getattr(where, field)
  return None if given is None else given.get(leaf.index)


def leaf_is_finite(leaf: Leaf) -> jax.Array:
  """Whether the gradient leaf is finite: the whole stacked leaf's, given
  by :mod:`~subspace_optax._src.pipeline.layer_loop` in a one-layer update,
  else :func:`all_finite` of ``leaf.grad``."""
  given = _given('finite', leaf)
  return all_finite(leaf.grad) if given is None else given


def refresh_is_finite(leaf: Leaf) -> jax.Array:
  """True, or, in a one-layer update of the layer loop, whether this step's
  refresh gives a finite basis for every layer of the whole stacked leaf."""
  given = _given('refresh_finite', leaf)
  return jnp.asarray(True) if given is None else given


def refresh_leaf(refresh, layout: layout_lib.MatrixLayout,
                  align_signs: bool, grad: jax.Array, basis,
                  keys: jax.Array):
  """``refresh`` of each matrix of a leaf, one matrix at a time.

  ``grad`` is the raw gradient leaf with its batch axes first
  (:func:`~subspace_optax._src.pipeline.per_matrix.stacked`); each matrix is
  cast to its float32 view only inside the loop. A refresh of a non-finite
  gradient is discarded, but it may still run (every-step bases, vmapped
  ensembles): ``refresh`` comes from :func:`zeroing_non_finite`.
  """
  return per_matrix.over_matrices(
      _refresh_matrix(refresh, layout, align_signs), len(layout.batch_axes),
      grad, basis, keys)


def _refresh_matrix(refresh, layout: layout_lib.MatrixLayout,
                    align_signs: bool):
  def one(g1, b1, k1):
    return refresh(per_matrix.view(g1, layout), b1, k1, align_signs)
  return one


def zeroing_non_finite(method: bases_lib.BasisMethod, refresh):
  """``refresh`` (``method.refresh`` or ``method.first_refresh``) seeing a
  gradient's NaN/Inf entries as zeros, a full-size copy of the matrix; as it
  is for a method that ``handles_non_finite``. LAPACK's SVD never returns on
  a matrix mixing Inf with finite entries (Reference-LAPACK issue 1409)."""
  if method.handles_non_finite:
    return refresh
  return lambda g, old, key, align: refresh(
      jnp.where(jnp.isfinite(g), g, 0.0), old, key, align)


def floats_finite(tree) -> jax.Array:
  """Whether every float of ``tree`` is finite."""
  return jnp.all(jnp.stack([jnp.asarray(True)] + [
      jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
      if jnp.issubdtype(x.dtype, jnp.inexact)]))


def finite_or_old(fresh, old, finite_input: jax.Array):
  """``(fresh, True)`` if the input and every float of ``fresh`` are finite,
  else ``(old, False)``: a NaN/Inf never becomes a basis."""
  ok = finite_input & floats_finite(fresh)
  return jax.tree.map(lambda n, o: jnp.where(ok, n, o), fresh, old), ok


def refreshes_are_finite(method: bases_lib.BasisMethod,
                         policy: refresh_lib.RefreshPolicy, align_signs: bool,
                         leaves: list[Leaf], finite: list[jax.Array],
                         count: jax.Array) -> list[tuple[jax.Array, jax.Array]]:
  """Per leaf: whether this step's refresh (where one runs) gives a finite
  basis for every matrix, and (for a policy that ``needs_similarity``, else
  1) the similarity of the new bases to the old that the whole-tree update
  records, averaged over the matrices; one matrix at a time, keeping no
  basis. ``finite`` holds whether each leaf's gradient is finite
  (:func:`all_finite`); a scheduled refresh runs only then.

  For the layer loop (:mod:`~subspace_optax._src.pipeline.layer_loop`),
  which refreshes one layer at a time but, as the whole-tree update, must
  drop the refresh of every layer when one layer's new basis is not finite,
  and must record one similarity for the whole stacked leaf (a lazy policy
  stretches the leaf's period from it). The refreshes of due leaves then run
  twice on the CPU.
  """
  out = []
  for leaf, leaf_finite in zip(leaves, finite):

    def check(g, b, k, refresh, leaf=leaf):
      def one(g1, b1, k1):
        fresh = _refresh_matrix(refresh, leaf.layout, align_signs)(g1, b1, k1)
        return floats_finite(fresh), (
            similarity(method.transition(b1, fresh), leaf.layout.rank)
            if policy.needs_similarity else jnp.ones([], jnp.float32))
      ok, similarities = per_matrix.over_matrices(
          one, leaf.num_batch_axes, g, b, k)
      return jnp.all(ok), jnp.mean(similarities)

    operands = (leaf.stacked, leaf.basis, leaf.keys)
    every = functools.partial(
        check, refresh=zeroing_non_finite(method, method.refresh))
    if method.every_step and method.first_refresh is not None:
      first = functools.partial(
          check, refresh=zeroing_non_finite(method, method.first_refresh))
      out.append(batching.cond(count == 0, first, every, *operands))
    elif method.every_step:
      out.append(every(*operands))
    else:
      out.append(batching.cond(
          policy.due(leaf.refresh, count) & leaf_finite, every,
          lambda *_: (jnp.asarray(True), jnp.ones([], jnp.float32)),
          *operands))
  return out


def similarity(transition: jax.Array, rank: int) -> jax.Array:
  """``mean ‖R‖_F² / rank`` over the matrices of ``transition`` (in [0, 1]:
  the mean squared cosine of the principal angles between two bases)."""
  return jnp.mean(jnp.sum(transition * transition, axis=(-2, -1)) / rank)


def transport(carry: jax.Array, moment: jax.Array) -> jax.Array:
  """``carry @ moment`` (``...rs,...sl``) where ``0 · ∞`` counts as 0.

  A second moment overflows to Inf for gradients above ~1e19 (``g²`` in
  float32); a plain matmul with a transition holding exact zeros (a partial
  permutation: DCT, random columns) would turn that one Inf into NaN in every
  slot. Infinite entries go only where the transition carries them.
  """
  infinite = jnp.isinf(moment)
  finite_part = sharding.einsum(
      '...rs,...sl->...rl', carry, jnp.where(infinite, 0, moment))
  pull = sharding.einsum(
      '...rs,...sl->...rl', carry, jnp.where(infinite, jnp.sign(moment), 0))
  return finite_part + jnp.where(pull == 0, 0, pull * jnp.inf)


def scatter(flat: list, leaves: list, values) -> list:
  """A copy of ``flat`` with ``values`` at the positions of ``leaves``."""
  flat = list(flat)
  for leaf, value in zip(leaves, values):
    flat[leaf.index] = value
  return flat


def compress(flat: list, keep: list[bool]) -> list:
  return [x for x, k in zip(flat, keep) if k]


def unzip(pairs: list[tuple], size: int) -> tuple[list, ...]:
  """``[(a, b), ...] -> ([a, ...], [b, ...])``, also for an empty list."""
  return tuple([pair[j] for pair in pairs] for j in range(size))


def project(method: bases_lib.BasisMethod, leaf: Leaf, basis) -> jax.Array:
  """Stage 3: ``C = QᵀG`` of a leaf, one matrix at a time (each matrix cast
  to float32 only there)."""
  return per_matrix.over_matrices(
      lambda g1, b1: method.project(per_matrix.view(g1, leaf.layout), b1),
      leaf.num_batch_axes, leaf.stacked, basis)


def unproject_leaves(method: bases_lib.BasisMethod, scale, leaves: list,
                     bases: list, subspace_updates: list) -> list[jax.Array]:
  """Stage 4 without a residual path: ``α Q N`` per projected leaf,
  back in the leaf's shape and dtype; on the CPU one matrix at a time (the
  float32 ``QN`` of a single matrix is the only full-size temporary), each
  written in place of its gradient, on GPUs vectorised, to fuse with
  ``p + u``
  (:func:`~subspace_optax._src.pipeline.per_matrix.over_matrices_on_cpu`)."""
  out = []
  for leaf, basis in zip(leaves, bases):
    dtype = leaf.grad.dtype
    if is_zero(scale):
      out.append(jnp.zeros(leaf.grad.shape, dtype))
      continue
    one = lambda n1, b1, leaf=leaf, dtype=dtype: per_matrix.to_leaf(
        scale * method.unproject(n1, b1), leaf.layout).astype(dtype)
    out.append(per_matrix.unstacked(per_matrix.over_matrices_on_cpu(
        one, leaf.num_batch_axes, subspace_updates[leaf.index], basis,
        into=leaf.stacked), leaf.layout))
  return out


class Leaf(NamedTuple):
  """One projected leaf of the gradient, as the stages of an update see it."""

  index: int  # position in the flat gradient tree
  layout: layout_lib.MatrixLayout
  basis: Any  # the basis state before this step
  refresh: Any  # the refresh policy's state before this step
  keys: jax.Array  # one PRNG key per matrix, of shape batch_shape
  grad: jax.Array  # the raw gradient leaf (its shape and dtype)

  @property
  def num_batch_axes(self) -> int:
    return len(self.layout.batch_shape)

  @property
  def stacked(self) -> jax.Array:
    """The raw gradient, batch axes first (per_matrix.stacked)."""
    return per_matrix.stacked(self.grad, self.layout)


def projected_leaves(flat: list, layouts: list, basis_leaves: list,
                      refresh_leaves: list, step_key: jax.Array) -> list[Leaf]:
  """A :class:`Leaf` per projected gradient leaf; the keys of leaf ``i``
  come from ``fold_in(step_key, i)``."""
  return [
      Leaf(i, lay, b, r,
            batched_keys(jax.random.fold_in(step_key, i), lay.batch_shape),
            g)
      for i, (g, lay, b, r) in enumerate(
          zip(flat, layouts, basis_leaves, refresh_leaves))
      if lay is not None]


def refresh_every_step(method: bases_lib.BasisMethod, align_signs: bool,
                        leaf: Leaf, count: jax.Array):
  """``(basis, refreshed)`` of an online basis, which moves on every step.

  At update 0 ``method.first_refresh`` (if any) gives the initial basis,
  chosen by one conditional on the step count.
  """
  finite = leaf_is_finite(leaf)
  refresh = functools.partial(
      refresh_leaf, zeroing_non_finite(method, method.refresh), leaf.layout,
      align_signs)
  if method.first_refresh is None:
    fresh = refresh(leaf.stacked, leaf.basis, leaf.keys)
  else:
    first = functools.partial(
        refresh_leaf, zeroing_non_finite(method, method.first_refresh),
        leaf.layout, align_signs)
    fresh = batching.cond(
        count == 0, first, refresh, leaf.stacked, leaf.basis, leaf.keys)
  return finite_or_old(fresh, leaf.basis, finite & refresh_is_finite(leaf))


def reads_gradient(refresh, leaf: Leaf) -> bool:
  """Whether ``refresh`` reads its gradient, from its jaxpr on one matrix
  (random bases draw without it)."""
  one = lambda x: jax.ShapeDtypeStruct(x.shape[leaf.num_batch_axes:], x.dtype)
  view = jax.ShapeDtypeStruct(
      (leaf.layout.projected_dim, leaf.layout.other_dim), jnp.float32)
  jaxpr = jax.make_jaxpr(lambda g, b, k: refresh(g, b, k, False))(
      view, jax.tree.map(one, leaf.basis), one(leaf.keys)).jaxpr
  grad = jaxpr.invars[0]
  return (any(v is grad for eqn in jaxpr.eqns for v in eqn.invars)
          or any(v is grad for v in jaxpr.outvars))


def refresh_bases(method: bases_lib.BasisMethod,
                   policy: refresh_lib.RefreshPolicy, align_signs: bool,
                   leaves: list[Leaf], count: jax.Array) -> list[tuple]:
  """Stage 1: each leaf's basis for this step, and whether it was refreshed.

  Online bases (``method.every_step``) move on every step. The others refresh
  when their policy says so, each leaf inside its own conditional. A
  conditional's operands must all exist before it runs, so one conditional
  over every leaf would keep the whole gradient tree alive: each leaf without
  batch axes (one leaf per layer) has only its own, and XLA can update it,
  and free its gradient, as soon as the backward pass has made it. The
  leaves with batch axes (stacks of scanned layers, made together by the
  backward scan) share one outer conditional (is any of them due?) around
  theirs: a GPU conditional waits for its predicate on the host, so a step
  without a refresh pays one sync for all of them. A refresh from a
  non-finite gradient, or one that gives a non-finite basis, is dropped: the
  old basis stays and the leaf stays due.

  In a one-layer update (the CPU's layer loop,
  :func:`~subspace_optax.per_layer_train_step`), a leaf's conditional also
  returns its gradient when the refresh reads it (:func:`reads_gradient`),
  and the later stages read that output (of
  :func:`~subspace_optax._src.pipeline.batching.cond`; a bare ``lax.cond``
  drops an output that is an operand returned unchanged): the refresh and
  the projection then share one buffer of the layer's gradient, where XLA
  gave each its own copy of the slice and made the projection's before the
  refresh ran (``benchmarks.optimizer_temporaries``: GaLore's float32
  temporaries 4.8 -> 3.8 matrices). Elsewhere the gradient stays outside:
  through the conditionals of whole stacks, XLA:GPU copies it (LLaMA-7B
  whole-tree GaLore, bf16, compiled for an H100: 52.3 -> 59.5 GB), and a
  refresh that does not read the gradient (random bases) would copy what
  nothing needs.

  Returns:
    A list over ``leaves`` of ``(basis, refreshed, gradient)``, the gradient
    leaf the later stages read, in the layout of ``Leaf.grad``.
  """
  if method.every_step:
    return [(*refresh_every_step(method, align_signs, leaf, count), leaf.grad)
            for leaf in leaves]
  # The predicates are operands, not closed over (vmap needs that).
  operands = [(policy.due(leaf.refresh, count) & leaf_is_finite(leaf),
               leaf.stacked, leaf.basis, leaf.keys, refresh_is_finite(leaf))
              for leaf in leaves]
  in_layer_loop = layer_index.current() is not None
  reads = [in_layer_loop and reads_gradient(method.refresh, leaf)
           for leaf in leaves]
  refresh = zeroing_non_finite(method, method.refresh)
  returned = lambda i, grad: grad if reads[i] else None

  def refresh_due(group, operands):
    return [batching.cond(
        predicate,
        lambda g, b, k, ok, i=i: (*finite_or_old(refresh_leaf(
            refresh, leaves[i].layout, align_signs, g, b, k), b, ok),
                                  returned(i, g)),
        lambda g, b, k, ok, i=i: (b, jnp.asarray(False), returned(i, g)),
        grad, basis, keys, ok)
            for i, (predicate, grad, basis, keys, ok) in zip(group, operands)]

  def keep(group, operands):
    return [(basis, jnp.asarray(False), returned(i, grad))
            for i, (_, grad, basis, _, _) in zip(group, operands)]

  def shared(group):
    """The refreshes of ``group`` under one outer conditional."""
    group_operands = [operands[i] for i in group]
    any_due = functools.reduce(jnp.logical_or, [
        jnp.any(predicate) for predicate, *_ in group_operands])
    # batching.cond: under jax.vmap (ensembles) the refreshes still run only
    # on steps where some member is due, not on every step.
    return batching.cond(
        any_due, functools.partial(refresh_due, group),
        functools.partial(keep, group), group_operands)

  stacked = [i for i, leaf in enumerate(leaves) if leaf.num_batch_axes]
  out = dict(zip(stacked, shared(stacked) if stacked else []))
  for i, leaf in enumerate(leaves):
    if not leaf.num_batch_axes:
      out[i], = refresh_due([i], [operands[i]])
  return [(basis, refreshed, leaf.grad if grad is None
           else per_matrix.unstacked(grad, leaf.layout))
          for leaf, (basis, refreshed, grad) in zip(
              leaves, (out[i] for i in range(len(leaves))))]


def transitions(method: bases_lib.BasisMethod, leaves: list[Leaf],
                 bases: list[Any], needed: bool) -> list[tuple]:
  """Stage 2: how far each leaf's basis moved.

  ``R = transition(old, new)`` (``rank x rank``; ``C_new ~= R C_old``) and the
  similarity ``mean ‖R‖_F² / rank`` in [0, 1] that lazy refresh policies
  use. Computed only when ``needed`` (otherwise ``(None, 1)``).

  Returns:
    A list over ``leaves`` of ``(R or None, similarity)``.
  """
  out = []
  for leaf, basis in zip(leaves, bases):
    if not needed:
      out.append((None, jnp.ones([], jnp.float32)))
      continue
    transition = layout_lib.batched(method.transition, leaf.num_batch_axes)(
        leaf.basis, basis)
    # In a one-layer update of the layer loop: the whole stacked leaf's.
    given = _given('similarity', leaf)
    out.append((transition, similarity(transition, leaf.layout.rank)
                if given is None else given))
  return out


def move_moments(inner_state, on_refresh: str, treedef, inner_tree,
                  moves: list):
  """Stage 3: the inner moments of refreshed leaves, into the new basis.

  ``on_refresh='reset'`` zeroes them; ``'transport'`` maps first moments
  ``m <- R m`` and second moments ``v <- (R∘R) v``. ``moves`` holds, per leaf
  of ``treedef``, ``(refreshed, R)`` or None (not projected: unchanged);
  ``inner_tree`` is the inner optimizer's input (``MaskedNode()`` at
  zero-size leaves, which have no moments).
  """
  if on_refresh == 'keep' or all(move is None for move in moves):
    return inner_state
  inputs = treedef.flatten_up_to(inner_tree)
  kept = [not utils.is_masked(x) for x in inputs]
  moves = compress(moves, kept)

  def move(second, moment_leaves):
    out = []
    for m, how in zip(moment_leaves, moves):
      if how is None:
        out.append(m)
        continue
      refreshed, transition = how
      if on_refresh == 'reset':
        moved = jnp.zeros_like(m)
      else:
        carry = transition * transition if second else transition
        moved = transport(carry, m.astype(jnp.float32)).astype(m.dtype)
      out.append(jnp.where(refreshed, moved, m))
    return out

  return moments_lib.map_moments(
      inner_state, jax.tree.structure(inner_tree),
      [utils.shape_of(x) for x in compress(inputs, kept)], move)


def leaf_updates(flat: list, subspace_updates: list, leaves: list,
                 outputs: list) -> list:
  """The flat output: ``outputs`` (already in their leaf's shape and dtype)
  at the projected ``leaves``, the inner optimizer's output in the leaf's
  dtype for the leaves not projected, and zero-size leaves as they came."""
  return scatter(
      [g if utils.passes_through(g) else n.astype(g.dtype)
       for g, n in zip(flat, subspace_updates)], leaves, outputs)


def residual_leaves(residual_tx, scale, method: bases_lib.BasisMethod,
                    leaves: list, bases: list, coefficients: list,
                    subspace_updates: list, residual_states: list):
  """Stages 4-5 with a residual path: ``α Q N + residual(G - QQᵀG)``.

  Per matrix, in its oriented float32 view; the residual transform sees that
  one ``(k, l)`` matrix, its own state, and the extra args ``coefficients``
  (``C``), ``subspace_updates`` (``N``) and ``gradients`` (``G``) of the same
  matrix. The output is cast to the leaf's dtype per matrix. On the CPU the
  matrices of a stack run one at a time, so every full-size float32
  temporary is one matrix's; on GPUs vectorised, to fuse with ``p + u``
  (:func:`~subspace_optax._src.pipeline.per_matrix.over_matrices_on_cpu`).

  Returns:
    The update of each leaf of ``leaves`` (its shape and dtype) and each
    leaf's new residual state (stacked over its batch axes).
  """
  updates, states = [], []
  for leaf, basis, c, n, s in zip(leaves, bases, coefficients,
                                  subspace_updates, residual_states):

    def one(g1, b1, c1, n1, s1, leaf=leaf):
      view = per_matrix.view(g1, leaf.layout)
      outside = view - method.unproject(c1, b1)
      out, s1 = residual_tx.update(
          outside, s1, None, coefficients=c1, subspace_updates=n1,
          gradients=view)
      if not is_zero(scale):
        out = out + scale * method.unproject(n1, b1)
      return per_matrix.to_leaf(out, leaf.layout).astype(leaf.grad.dtype), s1

    update, state = per_matrix.over_matrices_on_cpu(
        one, leaf.num_batch_axes, leaf.stacked, basis, c, n, s)
    updates.append(per_matrix.unstacked(update, leaf.layout))
    states.append(state)
  return updates, states
