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
``optax.MaskedNode()`` in the basis state.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from subspace_optax._src import bases as bases_lib
from subspace_optax._src import batching
from subspace_optax._src import layout as layout_lib
from subspace_optax._src import moments as moments_lib
from subspace_optax._src import refresh as refresh_lib
from subspace_optax._src import sharding

ON_REFRESH = ('keep', 'reset', 'transport')


class SubspaceState(NamedTuple):
  """State of :func:`low_rank`; each field is a stage of the pipeline."""

  count: jax.Array  # int32 scalar: number of updates so far
  basis: Any  # per leaf: the basis method's state (batched), or MaskedNode()
  refresh: Any  # per leaf: the refresh policy's state, or MaskedNode()
  inner_state: optax.OptState  # inner optimizer state on the coefficients
  residual_state: optax.OptState  # residual path state (EmptyState if none)


def _is_variable(x) -> bool:
  return hasattr(x, 'get_value') and hasattr(x, 'get_metadata')


def unbox(tree):
  """Strip flax ``nnx.Variable`` boxes (duck-typed, no flax import).

  The low-rank state must not inherit a parameter's metadata (its sharding
  would be applied to a tensor of another shape).
  """
  return jax.tree.map(
      lambda x: x.get_value() if _is_variable(x) else x, tree,
      is_leaf=_is_variable,
  )


def _batched_keys(key: jax.Array, batch_shape: tuple[int, ...]) -> jax.Array:
  size = 1
  for d in batch_shape:
    size *= d
  keys = jax.random.split(key, size)
  return keys.reshape(batch_shape) if batch_shape else keys[0]


def _is_zero(scale) -> bool:
  return isinstance(scale, (int, float)) and scale == 0


def _all_finite(x: jax.Array) -> jax.Array:
  return jnp.all(jnp.isfinite(x))


def _refresh_leaf(refresh, num_batch_axes: int, align_signs: bool,
                  view: jax.Array, basis, keys: jax.Array):
  """``refresh`` of one leaf's matrix view, vmapped over its batch axes.

  A refresh of a non-finite gradient is discarded, but it may still run
  (every-step bases, vmapped ensembles); LAPACK's SVD never returns on a
  matrix mixing Inf with finite entries (Reference-LAPACK issue 1409), so it
  sees the non-finite entries as zeros.
  """
  view = jnp.where(jnp.isfinite(view), view, 0.0)
  return layout_lib.batched(
      lambda g1, b1, k1: refresh(g1, b1, k1, align_signs), num_batch_axes)(
          view, basis, keys)


def _finite_or_old(fresh, old, finite_input: jax.Array):
  """``(fresh, True)`` if the input and every float of ``fresh`` are finite,
  else ``(old, False)``: a NaN/Inf never becomes a basis."""
  checks = [finite_input] + [
      jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(fresh)
      if jnp.issubdtype(x.dtype, jnp.inexact)]
  ok = jnp.all(jnp.stack(checks))
  return jax.tree.map(lambda n, o: jnp.where(ok, n, o), fresh, old), ok


def _abstract(tree):
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x))
      if hasattr(x, 'dtype') else x, tree)


def _check_params_free(tx, role: str, updates, state, **extra_args) -> None:
  """Fail at init, clearly, if ``tx`` needs ``params`` (it gets None here).

  ``tx.update`` is traced abstractly with ``params=None``; if that fails but
  succeeds with params, the transform uses params. Any other failure (e.g. a
  missing extra argument) is left for the real update to report.
  """
  updates, state = _abstract(updates), _abstract(state)

  def fails(params) -> Optional[Exception]:
    try:
      jax.eval_shape(
          lambda u, s, p: tx.update(u, s, p, **extra_args), updates, state,
          params)
    except Exception as error:  # pylint: disable=broad-except
      return error
    return None

  error = fails(None)
  if error is None or fails(updates) is not None:
    return
  raise ValueError(
      f'low_rank: the {role} transform uses `params`, but inside low_rank it '
      'receives params=None: it works on the low-rank coefficients C = QᵀG '
      '(or the residual G - QQᵀG), which have no parameters of their shape. '
      'Transforms that use params, such as optax.add_decayed_weights, belong '
      'outside low_rank, later in the chain: optax.chain(low_rank(inner, ...), '
      'optax.add_decayed_weights(weight_decay), '
      f'optax.scale_by_learning_rate(learning_rate)). ({error})') from error


def _check_state_fits(updates, layouts, basis_leaves, basis_shapes) -> None:
  """Each gradient leaf must fit the basis the state holds for it."""
  fix = ('The state was initialised for other params, rank or '
         'dimension_numbers; call init again with params shaped like the '
         'gradients, or restore a checkpoint saved with this configuration.')
  for (path, g), lay, b in zip(
      jax.tree_util.tree_flatten_with_path(updates)[0], layouts, basis_leaves):
    has_basis = not isinstance(b, optax.MaskedNode)
    name = layout_lib.path_name(path)
    if lay is None and has_basis:
      raise ValueError(
          f'{name}: the gradient of shape {jnp.shape(g)} is not projected, but '
          f'the state holds a basis for it. {fix}')
    if lay is None:
      continue
    if not has_basis:
      raise ValueError(
          f'{name}: the gradient of shape {jnp.shape(g)} is projected, but the '
          f'state holds no basis for it. {fix}')
    expected = [lay.batch_shape + s for s in basis_shapes(
        lay.projected_dim, lay.other_dim, lay.rank)]
    actual = [jnp.shape(a) for a in jax.tree.leaves(b)]
    if expected != actual:
      raise ValueError(
          f'{name}: the gradient of shape {jnp.shape(g)} (rank {lay.rank}) '
          f'needs a basis of shape {expected}, but the state holds {actual}. '
          f'{fix}')


def low_rank(
    inner: optax.GradientTransformation,
    *,
    rank: int | float,
    refresh: int | refresh_lib.RefreshPolicy = 200,
    basis: str | bases_lib.BasisMethod = 'randomized',
    side: str = 'compact',
    on_refresh: str = 'keep',
    align_signs: bool = True,
    residual: Optional[optax.GradientTransformation] = None,
    scale: float = 1.0,
    dimension_numbers: Any = None,
    seed: int = 0,
) -> optax.GradientTransformationExtraArgs:
  """Run ``inner`` in a low-rank subspace of each matrix-shaped gradient.

  Zhao et al., `GaLore: Memory-Efficient LLM Training by Gradient Low-Rank
  Projection <https://arxiv.org/abs/2403.03507>`_, 2024, generalised: any basis
  method, refresh policy, inner optimizer and residual path.

  .. math::
    C = QᵀG,\\quad N = inner(C),\\quad U = scale \\cdot QN
    \\;+\\; residual(G - QQᵀG).

  Args:
    inner: any optax transform that does not use ``params`` (``scale_by_adam``,
      ``scale_by_lion``, ``trace``, a ``named_chain``...). Its state is built on
      coefficient-shaped placeholders, so its moments have the low-rank shape.
    rank: int (clamped to ``min(m, n)`` of each matrix) or a float in (0, 1]
      (a fraction of ``min(m, n)``). Static under ``inject_hyperparams``.
    refresh: an int ``T`` (refresh every ``T`` updates, staggered across leaves)
      or a :mod:`subspace_optax.refresh` policy.
    basis: ``'randomized'`` (default; no SVD), ``'svd'`` (exact, GaLore), or a
      :class:`~subspace_optax.bases.BasisMethod`.
    side: ``'compact'`` projects the larger dimension (smallest moments, like
      ``optax.contrib.galore``); ``'reference'`` the smaller one (GaLore's
      ``proj_type='std'``); ``'left'``/``'right'`` force rows/columns.
    on_refresh: what happens to the inner moments of a refreshed leaf:
      ``'keep'`` (GaLore), ``'reset'`` (zeroed; momentum reset), or
      ``'transport'`` (first moments ``m <- R m``, second moments
      ``v <- (R∘R) v`` with ``R = Q_newᵀ Q_old``).
    align_signs: flip the new basis columns to agree with the old ones, so kept
      moments are not negated by the SVD's arbitrary signs.
    residual: optional transform applied to the part of the gradient outside
      the subspace, ``G - QQᵀG`` (in the oriented ``(*batch, k, l)`` view; other
      leaves hold ``MaskedNode()``), e.g. ``optax.scale_by_sign()`` (FRUGAL). It
      receives the extra args ``coefficients``, ``subspace_updates`` and
      ``gradients`` (the trees of ``C``, ``N`` and the oriented ``G``).
    scale: multiplies the unprojected update (GaLore's ``α``). With ``scale=0``
      the unprojection is skipped and the update is the residual path's output
      alone (APOLLO: the subspace only sets the scale of ``G``).
    dimension_numbers: which leaves are matrices and how: None (every 2-D
      leaf), a :class:`DimensionNumbers` for every leaf of rank >= 2, a pytree of
      them (None: not projected), or a callable ``params -> pytree``.
    seed: seed of the random bases; keys are ``fold_in(key(seed), count)``, so
      no key is kept in the state.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is a
    :class:`SubspaceState`.
  """
  layout_lib.validate_rank(rank)
  policy = refresh_lib.resolve(refresh)
  method = bases_lib.resolve(basis)
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
          hasattr(seed, 'dtype') and jnp.ndim(seed) == 0
          and jnp.issubdtype(seed.dtype, jnp.integer))):
    raise TypeError(f'`seed` must be an int, got {seed!r}.')
  inner = optax.with_extra_args_support(inner)
  residual_tx = (
      None if residual is None else optax.with_extra_args_support(residual))

  def layouts_for(tree):
    return layout_lib.flat_layouts(tree, dimension_numbers, side, rank)

  @functools.lru_cache(maxsize=None)
  def basis_shapes(k: int, l: int, r: int) -> list[tuple[int, ...]]:
    return [a.shape for a in jax.tree.leaves(
        jax.eval_shape(lambda: method.init(k, l, r)))]

  def init_fn(params):
    params = unbox(params)
    leaves, treedef = jax.tree.flatten(params)
    layouts = layouts_for(params)
    projected = [i for i, lay in enumerate(layouts) if lay is not None]
    basis_leaves, refresh_leaves, placeholders, residual_leaves = [], [], [], []
    for i, (p, lay) in enumerate(zip(leaves, layouts)):
      if lay is None:
        basis_leaves.append(optax.MaskedNode())
        refresh_leaves.append(optax.MaskedNode())
        placeholders.append(p)
        residual_leaves.append(optax.MaskedNode())
        continue
      # The state is sharded by rule from the param (see sharding.py).
      where = sharding.placement(p)
      spec = where[1] if where is not None else None
      one = method.init(lay.projected_dim, lay.other_dim, lay.rank)
      basis_leaves.append(jax.tree.map(
          lambda a, lay=lay, where=where, spec=spec: sharding.place(
              jnp.broadcast_to(a, lay.batch_shape + a.shape), where,
              spec and sharding.basis_leaf_spec(
                  lay.batch_shape + a.shape, lay, spec)), one))
      refresh_leaves.append(policy.init(projected.index(i), len(projected)))
      placeholders.append(sharding.place(
          jnp.zeros(lay.coefficient_shape, jnp.float32), where,
          spec and sharding.coefficient_spec(lay, spec)))
      residual_leaves.append(None if residual_tx is None else sharding.place(
          jnp.zeros(lay.batch_shape + (lay.projected_dim, lay.other_dim),
                    jnp.float32), where, spec and sharding.view_spec(spec, lay)))
    residual_state = optax.EmptyState()
    if residual_tx is not None:
      residual_state = residual_tx.init(treedef.unflatten(residual_leaves))
    inner_state = inner.init(treedef.unflatten(placeholders))
    _check_params_free(
        inner, 'inner', treedef.unflatten(placeholders), inner_state)
    if residual_tx is not None:
      projected_only = treedef.unflatten([
          optax.MaskedNode() if lay is None else c
          for lay, c in zip(layouts, placeholders)])
      _check_params_free(
          residual_tx, 'residual', treedef.unflatten(residual_leaves),
          residual_state, coefficients=projected_only,
          subspace_updates=projected_only,
          gradients=treedef.unflatten(residual_leaves))
    return SubspaceState(
        count=jnp.zeros([], jnp.int32),
        basis=treedef.unflatten(basis_leaves),
        refresh=treedef.unflatten(refresh_leaves),
        inner_state=inner_state,
        residual_state=residual_state,
    )

  def update_fn(updates, state, params=None, **extra_args):
    del params  # The inner optimizer never sees params (shapes differ).
    leaves, treedef = jax.tree.flatten(updates)
    layouts = layouts_for(updates)
    try:
      basis_leaves = treedef.flatten_up_to(state.basis)
      refresh_leaves = treedef.flatten_up_to(state.refresh)
    except (ValueError, TypeError) as error:
      raise ValueError(
          'The updates do not have the structure of the params the state was '
          'initialised with; call init again with params shaped like the '
          f'gradients. ({error})') from error
    _check_state_fits(updates, layouts, basis_leaves, basis_shapes)
    count = state.count
    step_key = jax.random.fold_in(jax.random.key(seed), count)

    # 1. Each projected leaf's matrix view and its refresh: every step for
    # online bases; otherwise only when due. Scheduled refreshes sit inside
    # one outer cond (any leaf due?), each leaf's in its own inner cond: a
    # conditional costs a device-to-host sync of its predicate on GPU, so a
    # step with no refresh pays one sync, not one per leaf.
    views, fresh_bases, due_flags = [], [], []
    scheduled = []  # (leaf index, batch axes, (predicate, view, basis, keys))
    for i, (g, lay, b, r) in enumerate(
        zip(leaves, layouts, basis_leaves, refresh_leaves)):
      if lay is None:
        views.append(None)
        fresh_bases.append(b)
        due_flags.append(None)
        continue
      nb = len(lay.batch_shape)
      view = layout_lib.matrix_view(g, lay).astype(jnp.float32)
      keys = _batched_keys(jax.random.fold_in(step_key, i), lay.batch_shape)
      views.append(view)
      finite = _all_finite(view)
      if method.every_step:
        refresh_fn = functools.partial(_refresh_leaf, method.refresh, nb,
                                       align_signs)
        fresh = refresh_fn(view, b, keys) if method.first_refresh is None else (
            batching.cond(
                count == 0,
                functools.partial(_refresh_leaf, method.first_refresh, nb,
                                  align_signs),
                refresh_fn, view, b, keys))
        b_new, due = _finite_or_old(fresh, b, finite)
        fresh_bases.append(b_new)
        due_flags.append(due)
      else:
        # A refresh from a non-finite gradient, or one that produced a
        # non-finite basis, is dropped: the old basis stays and it stays due.
        fresh_bases.append(None)  # set after the outer cond below
        due_flags.append(None)
        scheduled.append(
            (i, nb, (policy.due(r, count) & finite, view, b, keys)))
    if scheduled:
      # batching.cond: under jax.vmap (ensembles) the refresh still runs only
      # on steps where some member is due, not on every step.
      # The predicates are operands, not closed over (vmap needs that).
      def refresh_due(operands):
        out = []
        for (_, nb, _), (predicate, view, b, keys) in zip(scheduled, operands):
          out.append(batching.cond(
              predicate,
              lambda v, b, k, nb=nb: _finite_or_old(
                  _refresh_leaf(method.refresh, nb, align_signs, v, b, k), b,
                  jnp.asarray(True)),
              lambda v, b, k: (b, jnp.asarray(False)), view, b, keys))
        return out

      def keep(operands):
        return [(b, jnp.asarray(False)) for _, _, b, _ in operands]

      operands = [leaf_operands for _, _, leaf_operands in scheduled]
      any_due = functools.reduce(
          jnp.logical_or, [jnp.any(predicate) for predicate, *_ in operands])
      results = batching.cond(any_due, refresh_due, keep, operands)
      for (i, _, _), (b_new, due) in zip(scheduled, results):
        fresh_bases[i], due_flags[i] = b_new, due

    # 2. Basis transitions (similarity, moment transport) and coefficients.
    coefficients, refreshed, transitions = [], [], []
    new_basis, new_refresh = [], []
    for g, lay, b, r, view, b_new, due in zip(
        leaves, layouts, basis_leaves, refresh_leaves, views, fresh_bases,
        due_flags):
      if lay is None:
        coefficients.append(g)
        for out, value in ((refreshed, None), (transitions, None),
                           (new_basis, b), (new_refresh, r)):
          out.append(value)
        continue
      nb = len(lay.batch_shape)
      similarity = jnp.ones([], jnp.float32)
      if policy.needs_similarity or on_refresh == 'transport':
        transition = layout_lib.batched(method.transition, nb)(b, b_new)
        similarity = jnp.mean(
            jnp.sum(transition * transition, axis=(-2, -1)) / lay.rank)
        transitions.append(transition)
      else:
        transitions.append(None)
      new_refresh.append(policy.after(r, count, due, similarity))
      new_basis.append(b_new)
      refreshed.append(due)
      coefficients.append(
          layout_lib.batched(method.project, nb)(view, b_new))

    inner_state = state.inner_state
    if on_refresh != 'keep' and any(lay is not None for lay in layouts):
      shapes = [jnp.shape(c) for c in coefficients]

      def move(second, moment_leaves):
        out = []
        for m, lay, did, transition in zip(
            moment_leaves, layouts, refreshed, transitions):
          if lay is None:
            out.append(m)
            continue
          if on_refresh == 'reset':
            moved = jnp.zeros_like(m)
          else:
            carry = transition * transition if second else transition
            moved = sharding.einsum(
                '...rs,...sl->...rl', carry.astype(m.dtype), m)
          out.append(jnp.where(did, moved, m))
        return out

      inner_state = moments_lib.map_moments(inner_state, treedef, shapes, move)

    coefficient_tree = treedef.unflatten(coefficients)
    low, inner_state = inner.update(
        coefficient_tree, inner_state, None, **extra_args)
    low_leaves = treedef.flatten_up_to(low)

    outputs, residual_leaves, projected_c, projected_n, projected_g = (
        [], [], [], [], [])
    for g, lay, n, c, b, view in zip(
        leaves, layouts, low_leaves, coefficients, new_basis, views):
      if lay is None:
        outputs.append(n.astype(g.dtype))
        for out in (residual_leaves, projected_c, projected_n, projected_g):
          out.append(optax.MaskedNode())
        continue
      nb = len(lay.batch_shape)
      unproject = layout_lib.batched(method.unproject, nb)
      outputs.append(
          jnp.zeros_like(view) if _is_zero(scale) else scale * unproject(n, b))
      if residual_tx is not None:
        residual_leaves.append(view - unproject(c, b))
        projected_c.append(c)
        projected_n.append(n)
        projected_g.append(view)

    residual_state = state.residual_state
    if residual_tx is not None:
      residual_out, residual_state = residual_tx.update(
          treedef.unflatten(residual_leaves), residual_state, None,
          coefficients=treedef.unflatten(projected_c),
          subspace_updates=treedef.unflatten(projected_n),
          gradients=treedef.unflatten(projected_g))
      residual_out = treedef.flatten_up_to(residual_out)
      outputs = [
          o if lay is None else o + extra
          for o, lay, extra in zip(outputs, layouts, residual_out)
      ]
    outputs = [
        o if lay is None else layout_lib.leaf_from_matrix(o, lay).astype(g.dtype)
        for o, lay, g in zip(outputs, layouts, leaves)
    ]
    return treedef.unflatten(outputs), SubspaceState(
        count=optax.safe_increment(count),
        basis=treedef.unflatten(new_basis),
        refresh=treedef.unflatten(new_refresh),
        inner_state=inner_state,
        residual_state=residual_state,
    )

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
