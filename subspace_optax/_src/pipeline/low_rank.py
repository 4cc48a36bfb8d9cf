"""The subspace pipeline: project -> inner optimizer -> unproject (+ residual).

One combinator owns the basis of every projected leaf, so the inner optimizer's
state has the low-rank shape. A separate ``project`` stage in an ``optax.chain``
would not do: the next stage's state is initialised from the full-size params
(Adam's moments would be ``m x n``), and a later ``unproject`` stage cannot see
the basis the first stage holds. Per matrix ``G`` with basis ``Q``:

.. math::
  C = QᵀG, \\qquad N = inner(C), \\qquad U = α\\, Q N
  \\;[+\\; residual(G - QQᵀG)].

Leaves that are not projected get the inner optimizer at full size (biases,
norms, embeddings keep Adam, as in GaLore's second parameter group) and hold
``optax.MaskedNode()`` in the basis state. Zero-size leaves skip the pipeline:
their update is returned as it came and all their state is ``MaskedNode()``.

The stages of an update, in pipeline order, are in
:mod:`subspace_optax._src.pipeline.stages`; the checks of its input in
:mod:`subspace_optax._src.pipeline.checks`.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from subspace_optax._src import arguments
from subspace_optax._src import utils
from subspace_optax._src.bases import base as bases_lib
from subspace_optax._src.bases import registry
from subspace_optax._src.pipeline import accumulation
from subspace_optax._src.pipeline import checks
from subspace_optax._src.pipeline import coverage
from subspace_optax._src.pipeline import layer_loop
from subspace_optax._src.pipeline import layout as layout_lib
from subspace_optax._src.pipeline import per_matrix
from subspace_optax._src.pipeline import precision as precision_lib
from subspace_optax._src.pipeline import sharding
from subspace_optax._src.pipeline import stages
from subspace_optax._src.refresh import every as refresh_lib

ON_REFRESH = ('keep', 'reset', 'transport')


class SubspaceState(NamedTuple):
  """State of :func:`low_rank`; each field is a stage of the pipeline."""

  count: jax.Array  # int32 scalar: number of updates so far
  basis: Any  # per leaf: the basis method's state (batched), or MaskedNode()
  refresh: Any  # per leaf: the refresh policy's state, or MaskedNode()
  inner_state: optax.OptState  # inner optimizer state on the coefficients
  # Per leaf: the residual path's state of each matrix (stacked over the
  # batch axes), MaskedNode() at leaves not projected; EmptyState if none.
  residual_state: optax.OptState


@arguments.declare_static_args(
    'rank', 'refresh', 'dimension_numbers', 'basis_dtype', 'precision',
    'accumulate_steps')
def low_rank(
    inner: optax.GradientTransformation,
    *,
    rank: int | float,
    refresh: int | refresh_lib.RefreshPolicy = 200,
    basis: str | bases_lib.BasisMethod = 'randomized',
    side: str = 'reference',
    on_refresh: str = 'keep',
    align_signs: bool = True,
    residual: Optional[optax.GradientTransformation] = None,
    scale: float = 1.0,
    dimension_numbers: Any = None,
    seed: int = 0,
    basis_dtype: Any = None,
    precision: Any = None,
    accumulate_steps: int = 1,
) -> optax.GradientTransformationExtraArgs:
  """Run ``inner`` in a low-rank subspace of each matrix-shaped gradient.

  Zhao et al., `GaLore: Memory-Efficient LLM Training by Gradient Low-Rank
  Projection <https://arxiv.org/abs/2403.03507>`_, 2024, generalised: any basis
  method, refresh policy, inner optimizer and residual path.

  .. math::
    C = QᵀG,\\quad N = inner(C),\\quad U = scale \\cdot QN
    \\;+\\; residual(G - QQᵀG).

  Memory: full-size work runs one matrix at a time. Lowered for the CPU (or
  a TPU), a stack of scanned layers (the leaves whose first batch axis is
  axis 0, as deep as the largest of them) is updated one layer at a time,
  its state written in place, so no temporary of the update grows with the
  number of layers; lowered for a GPU, the stages run over the whole stack
  (the unprojection then fuses with ``p + u``). Same result on every
  platform: the CPU first checks a due refresh's new bases one matrix at a
  time, so that a refresh failing on one layer is dropped for every layer
  (refreshes run twice on its refresh steps). An ``inner`` that needs every
  layer first (``optax.clip_by_global_norm`` of the coefficients, a lazy
  ``refresh`` policy) keeps the stages over the whole stack everywhere.
  Each leaf without batch axes (one leaf per layer) refreshes inside its own
  conditional, so XLA can update it, and free its gradient, before the
  backward pass has made the other leaves'; stacked leaves share one (on a
  GPU each conditional waits on the host for its predicate).

  Args:
    inner: any optax transform that does not use ``params`` (``scale_by_adam``,
      ``scale_by_lion``, ``trace``, a ``named_chain``...). Its state is built on
      coefficient-shaped placeholders, so its moments have the low-rank shape.
    rank: int (clamped to ``min(m, n)`` of each matrix) or a float in (0, 1]
      (a fraction of ``min(m, n)``). Static under ``inject_hyperparams``.
    refresh: an int ``T`` (refresh every ``T`` updates, staggered across leaves)
      or a :mod:`subspace_optax.refresh` policy.
    basis: ``'randomized'`` (default; no SVD), ``'svd'`` (exact, GaLore), any
      other name of a built-in basis (``'random_orthonormal'`` or its alias
      ``'random'``, ``'random_columns'`` or ``'columns'``, ``'gaussian'``,
      ``'seeded_gaussian'``, ``'dct'``, ``'online_pca'``,
      ``'importance_sampled'``, ``'blocks'``; default arguments), or a
      :class:`~subspace_optax.bases.BasisMethod`. An unknown name raises a
      ``ValueError`` listing the valid ones.
    side: ``'reference'`` (default) puts the basis on the smaller dimension,
      and on a square matrix on the input side (galore-torch's
      ``proj_type='std'`` on the PyTorch ``(out, in)`` weight); ``'compact'``
      on the larger one (smallest state at a given rank, like
      ``optax.contrib.galore``); ``'left'``/``'right'`` force rows/columns.
      The default is measured, per byte of state: on the quality benchmark
      (byte-level LLaMA, dim 128, ffn 344, 300 steps, seeds 0-2) GaLore at
      the same state bytes (2.19 MB, 0.32x AdamW's) reached a median
      validation loss of 1.858 with ``'reference'`` (rank 26) against 1.887
      with ``'compact'`` (rank 32), lower on every seed (AdamW: 1.852).
    on_refresh: what happens to the inner moments of a refreshed leaf:
      ``'keep'`` (GaLore), ``'reset'`` (zeroed; momentum reset), or
      ``'transport'`` (first moments ``m <- R m``, second moments
      ``v <- (R∘R) v`` with ``R = Q_newᵀ Q_old``).
    align_signs: flip the new basis columns to agree with the old ones, so kept
      moments are not negated by the SVD's arbitrary signs.
    residual: optional transform applied to the part of the gradient outside
      the subspace, ``G - QQᵀG``, e.g. ``optax.scale_by_sign()`` (FRUGAL),
      on each matrix on its own: its ``update`` gets one oriented ``(k, l)``
      matrix and the extra args ``coefficients``, ``subspace_updates`` and
      ``gradients`` (that matrix's ``C``, ``N`` and ``G``); its ``init`` one
      ``(k, l)`` matrix, and each matrix keeps its own state (stacked over a
      leaf's batch axes, like the basis). On the CPU the matrices of a stack
      run one at a time (float32 temporaries of one matrix). Transforms that
      need the whole tree (``optax.clip_by_global_norm``,
      ``apply_if_finite``, ``MultiSteps``) raise a ``ValueError`` at
      ``init``; put them around ``low_rank`` instead.
    scale: multiplies the unprojected update (GaLore's ``α``). With ``scale=0``
      the unprojection is skipped and the update is the residual path's output
      alone (APOLLO: the subspace only sets the scale of ``G``).
    dimension_numbers: which leaves are matrices and how: None (every 2-D
      leaf), a :class:`DimensionNumbers` for every leaf of rank >= 2, a pytree of
      them (None: not projected), or a callable ``params -> pytree``.
    seed: seed of the random bases; keys are ``fold_in(key(seed), count)``, so
      no key is kept in the state.
    basis_dtype: floating dtype in which the float arrays of the basis state
      (the dense ``k x r`` ``Q``) are stored, e.g. ``jnp.bfloat16`` (half the
      basis memory); None: float32. ``C = QᵀG`` and ``QN`` then take operands
      of that dtype and accumulate in float32; refreshes compute in float32
      and round the new basis on store (bfloat16: columns orthonormal to
      ~4e-3, so ``G - QQᵀG`` keeps that fraction of the subspace part).
      Integer basis states (seeds, indices, codes) are untouched. The inner
      optimizer's dtypes are its own (e.g.
      ``optax.scale_by_adam(mu_dtype=jnp.bfloat16)``).
    precision: matmul precision of ``C = QᵀG`` and ``QN``: a
      ``jax.lax.Precision`` or ``'default'``, ``'high'``, ``'highest'``;
      None (default) keeps JAX's default, under which XLA may compute
      float32 matmuls with TensorFloat-32 on Ampere and Hopper GPUs
      (bfloat16 passes on TPU); ``'highest'`` is true float32, several times
      slower on tensor cores. ``C`` only feeds the inner optimizer, whose
      normalised step absorbs that ~1e-3 relative error (far below mini-batch
      gradient noise), so the fast default is chosen. Refresh and transition
      matmuls (Gram matrices, orthonormalisation, eigen-solves,
      ``Q_newᵀQ_old``) keep ``HIGHEST``: their errors would compound into the
      basis.
    accumulate_steps: ``k`` > 1 accumulates gradients over ``k`` calls (micro
      batches) in the subspace: the coefficients ``QᵀG_j`` are summed (an
      ``r x n`` buffer per matrix, where ``optax.MultiSteps`` keeps a copy of
      every gradient) and the inner optimizer runs on their mean at the
      ``k``-th call; the calls before emit zero updates. Bases refresh only
      at a cycle's first call, from its gradient, and ``refresh`` periods
      count cycles. Stages chained after ``low_rank`` must act once per
      cycle too (the presets' ``accumulate_steps`` gate them;
      :mod:`~subspace_optax._src.pipeline.accumulation`). Not with a
      ``residual`` (it is full-size) nor a basis that moves every step.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is a
    :class:`SubspaceState`.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import subspace_optax as so
    >>> params = {'w': jnp.ones((8, 6)), 'b': jnp.zeros(6)}
    >>> tx = so.low_rank(optax.scale_by_adam(), rank=2, basis='svd')
    >>> state = tx.init(params)
    >>> updates, state = tx.update(params, state)
    >>> state.inner_state.mu['w'].shape  # low-rank moments: r x l
    (2, 8)
  """
  layout_lib.validate_rank(rank)
  policy = refresh_lib.resolve(refresh)
  method = precision_lib.with_precision(
      registry.resolve(basis), basis_dtype, precision)
  if side not in layout_lib.SIDES:
    raise ValueError(f'`side` must be one of {layout_lib.SIDES}, got {side!r}.')
  if on_refresh not in ON_REFRESH:
    raise ValueError(
        f'`on_refresh` must be one of {ON_REFRESH}, got {on_refresh!r}.')
  if on_refresh == 'transport' and method.transition is None:
    raise ValueError(
        f"on_refresh='transport' needs a basis with a transition; "
        f'{method.name!r} has none. Use on_refresh="keep" or "reset".')
  if on_refresh == 'reset' and method.every_step:
    raise ValueError(
        f"on_refresh='reset' with the {method.name!r} basis, which moves on every "
        'step, would zero the moments on every step. Use on_refresh="keep" '
        '(or "transport").')
  if isinstance(seed, bool) or not (
      isinstance(seed, (int, np.integer)) or (
          hasattr(seed, 'dtype') and seed.ndim == 0
          and jnp.issubdtype(seed.dtype, jnp.integer))):
    raise TypeError(f'`seed` must be an int, got {seed!r}.')
  accumulate_steps = accumulation.check_accumulate_steps(accumulate_steps)
  if accumulate_steps > 1:
    if residual is not None:
      raise ValueError(
          f'accumulate_steps={accumulate_steps} with a residual path: the '
          'residual G - QQᵀG is full-size, so accumulating it saves nothing. '
          'Use optax.MultiSteps around the whole optimizer instead.')
    if method.every_step:
      raise ValueError(
          f'accumulate_steps={accumulate_steps} with the {method.name!r} '
          'basis, which moves on every call: the accumulated coefficients '
          'would be in different bases. Use a basis that changes only at '
          'refreshes, or optax.MultiSteps.')
    inner = accumulation.accumulate_coefficients(inner, accumulate_steps)
    policy = accumulation.at_cycle_start(policy, accumulate_steps)
  inner = optax.with_extra_args_support(inner)
  residual_tx = (
      None if residual is None else optax.with_extra_args_support(residual))

  def layouts_for(tree):
    return layout_lib.flat_layouts(tree, dimension_numbers, side, rank)

  @functools.lru_cache(maxsize=None)
  def basis_shapes(k: int, l: int, r: int) -> list[tuple[int, ...]]:
    return [a.shape for a in jax.tree.leaves(
        jax.eval_shape(lambda: method.init(k, l, r)))]

  def expected_inner_state(flat, treedef, layouts):
    """The inner state's shapes for gradients ``flat`` (abstract), or None."""
    placeholders = [
        optax.MaskedNode() if utils.passes_through(g) else jax.ShapeDtypeStruct(
            utils.shape_of(g) if lay is None else lay.coefficient_shape, jnp.float32)
        for g, lay in zip(flat, layouts)]
    try:
      return jax.eval_shape(inner.init, treedef.unflatten(placeholders))
    except Exception:  # pylint: disable=broad-except
      return None  # Left for the inner optimizer's own update to report.

  def init_fn(params):
    params = utils.unbox(params)
    leaves, treedef = jax.tree.flatten(params)
    layouts = layouts_for(params)
    checks.check_real(leaves, layouts)
    coverage.warn_full_size(params, layouts, dimension_numbers, rank)
    projected = [i for i, lay in enumerate(layouts) if lay is not None]
    basis_leaves, refresh_leaves, placeholders, residual_leaves = [], [], [], []
    for i, (p, lay) in enumerate(zip(leaves, layouts)):
      if lay is None:
        basis_leaves.append(optax.MaskedNode())
        refresh_leaves.append(optax.MaskedNode())
        placeholders.append(optax.MaskedNode() if utils.passes_through(p) else p)
        residual_leaves.append(optax.MaskedNode())
        continue
      # The state is sharded by rule from the param (see sharding.py).
      where = sharding.placement(p)
      spec = where[1] if where is not None else None
      # With the batch axes; from the weight itself for init_from_weights.
      batched_state = bases_lib.initial_state(method, p, lay)
      basis_leaves.append(jax.tree.map(
          lambda a, lay=lay, where=where, spec=spec: sharding.place(
              a, where, spec and sharding.basis_leaf_spec(a.shape, lay, spec)),
          batched_state))
      refresh_leaves.append(policy.init(projected.index(i), len(projected)))
      placeholders.append(sharding.place(
          jnp.zeros(lay.coefficient_shape, jnp.float32), where,
          spec and sharding.coefficient_spec(lay, spec)))
      if residual_tx is not None:
        # One state per matrix, stacked over the batch axes like the basis.
        views = sharding.place(
            jnp.zeros(lay.batch_shape + (lay.projected_dim, lay.other_dim),
                      jnp.float32), where, spec and sharding.view_spec(spec, lay))
        residual_leaves.append(
            layout_lib.batched(residual_tx.init, len(lay.batch_shape))(views))
    inner_state = inner.init(treedef.unflatten(placeholders))
    checks.check_params_free(
        inner, 'inner', treedef.unflatten(placeholders), inner_state)
    residual_state = optax.EmptyState()
    if residual_tx is not None:
      residual_state = treedef.unflatten(residual_leaves)
      checks.check_residual(residual_tx, layouts)
    return SubspaceState(
        count=jnp.zeros([], jnp.int32),
        basis=treedef.unflatten(basis_leaves),
        refresh=treedef.unflatten(refresh_leaves),
        inner_state=inner_state,
        residual_state=residual_state,
    )

  def projected_leaves(updates, state):
    """The flat gradients, their treedef, the basis and refresh leaves of
    ``state`` (checked against the gradients: named errors for a state of
    other params) and a :class:`stages.Leaf` per projected leaf."""
    flat, treedef = jax.tree.flatten(updates)
    layouts = layouts_for(updates)
    basis_leaves, refresh_leaves = checks.state_leaves(treedef, state)
    checks.check_state_fits(updates, layouts, basis_leaves, basis_shapes,
                      state.inner_state,
                      expected_inner_state(flat, treedef, layouts))
    # Random bases draw from the optimizer step (the cycle, when
    # accumulating), as they would under optax.MultiSteps.
    leaves = stages.projected_leaves(
        flat, layouts, basis_leaves, refresh_leaves,
        jax.random.fold_in(jax.random.key(seed),
                           state.count // accumulate_steps))
    return flat, treedef, basis_leaves, refresh_leaves, leaves

  def staged_update(updates, state, params=None, **extra_args):
    del params  # The inner optimizer never sees params (shapes differ).
    flat, treedef, basis_leaves, refresh_leaves, leaves = projected_leaves(
        updates, state)
    count = state.count

    # 1-2. New bases, how far they moved, and the refresh policies' states.
    # The later stages read each gradient as its refresh returned it.
    bases, refreshed, grads = stages.unzip(
        stages.refresh_bases(method, policy, align_signs, leaves, count), 3)
    leaves = [leaf._replace(grad=g) for leaf, g in zip(leaves, grads)]
    transitions, similarities = stages.unzip(stages.transitions(
        method, leaves, bases,
        policy.needs_similarity or on_refresh == 'transport'), 2)
    refresh_states = [
        policy.after(leaf.refresh, count, did, similarity)
        for leaf, did, similarity in zip(leaves, refreshed, similarities)]

    # 3. Coefficients C = QᵀG (the full gradient of leaves not projected,
    # nothing for zero-size ones); the moments follow refreshed bases.
    # Full-size work runs one matrix at a time (stages.project,
    # stages.unproject_leaves; see per_matrix.py).
    coefficients = [
        stages.project(method, leaf, b) for leaf, b in zip(leaves, bases)]
    inner_tree = treedef.unflatten(stages.scatter(
        [optax.MaskedNode() if utils.passes_through(g) else g for g in flat],
        leaves, coefficients))
    inner_state = stages.move_moments(
        state.inner_state, on_refresh, treedef, inner_tree,
        stages.scatter([None] * len(flat), leaves, zip(refreshed, transitions)))

    # 4-5. The inner optimizer N = inner(C), then U = α Q N (+ the residual).
    subspace, inner_state = inner.update(
        inner_tree, inner_state, None, **extra_args)
    subspace = treedef.flatten_up_to(subspace)
    residual_state = state.residual_state
    if residual_tx is None:
      outputs = stages.unproject_leaves(method, scale, leaves, bases, subspace)
    else:
      # The residual path runs on each matrix on its own, with its state.
      residual_flat = treedef.flatten_up_to(residual_state)
      outputs, residual_leaves = stages.residual_leaves(
          residual_tx, scale, method, leaves, bases, coefficients,
          [subspace[leaf.index] for leaf in leaves],
          [residual_flat[leaf.index] for leaf in leaves])
      residual_state = treedef.unflatten(
          stages.scatter(residual_flat, leaves, residual_leaves))
    out = stages.leaf_updates(flat, subspace, leaves, outputs)
    return treedef.unflatten(out), (
        SubspaceState(
            count=optax.safe_increment(count),
            basis=treedef.unflatten(stages.scatter(basis_leaves, leaves, bases)),
            refresh=treedef.unflatten(
                stages.scatter(refresh_leaves, leaves, refresh_states)),
            inner_state=inner_state,
            residual_state=residual_state,
        ))

  plans = layer_loop.Plans(
      optax.GradientTransformationExtraArgs(init_fn, staged_update))

  def update_fn(updates, state, params=None, **extra_args):
    # On the CPU a stack of layers is updated one layer at a time, so no
    # temporary is stack-sized (layer_loop.py). GPUs keep the staged update
    # over the whole stack: its work is vectorised and its unprojection
    # fuses with ``p + u``.
    split = layer_loop.stack_of(updates, layouts_for(updates))
    plan = None if split is None else plans.get(updates, split)
    if plan is None:
      return staged_update(updates, state, None, **extra_args)

    def looped(updates, state):
      # What each layer's update must know of its whole stacked leaf: is
      # it finite, does this step's refresh give a finite basis for every
      # layer (else no layer takes its new basis), and how far the new
      # bases moved on average (a lazy policy records it for the leaf).
      *_, leaves = projected_leaves(updates, state)
      leaves = [leaf for leaf in leaves if split.is_stack[leaf.index]]
      indices = [leaf.index for leaf in leaves]
      finite = [stages.all_finite(leaf.grad) for leaf in leaves]
      refresh_finite, similarity = stages.unzip(stages.refreshes_are_finite(
          method, policy, align_signs, leaves, finite, state.count), 2)
      return layer_loop.update(
          staged_update, split, plan, updates, state, extra_args,
          *(dict(zip(indices, x)) for x in (finite, refresh_finite,
                                             similarity)))

    staged = lambda u, s: staged_update(u, s, None, **extra_args)
    return per_matrix.on_platform(updates, state, cpu=looped, gpu=staged)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
