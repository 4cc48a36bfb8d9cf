"""Updates orthogonal to the protected subspaces of earlier tasks.

:func:`orthogonal_to` is a shape-preserving chain stage meant to run **last**
(after the inner optimizer, weight decay and the learning rate). It removes from
the update applied to each weight matrix ``Δ`` (``m x n``, rows = the reduction
or input axes, columns = the output axes) every component in a protected
subspace: ``U`` (``m x c``, left, input side) and/or ``V`` (``n x c``, right,
output side), both with orthonormal columns.

==============  =================================  ==============================
mode            update applied                     used by
==============  =================================  ==============================
``'two_sided'``  ``(I - UUᵀ) Δ (I - VVᵀ)``          Sculpting Subspaces, reference
                                                    code (arXiv 2504.07097)
``'left'``       ``(I - UUᵀ) Δ``                    GPM (input activations,
                                                    arXiv 2103.09762)
``'right'``      ``Δ (I - VVᵀ)``                    output-side memories
``'block'``      ``Δ - UUᵀ Δ VVᵀ``                  Sculpting Subspaces, blog
                                                    formula (removes only the
                                                    protected block)
==============  =================================  ==============================

Why last: Adam's elementwise scaling, weight decay and schedules do not commute
with a projection, so a gradient masked before Adam leaks several percent of the
update back into the protected subspace; masking the final update leaks nothing
but rounding (weight decay included, which would otherwise pull the weights
along the protected directions).

The memory of a leaf is a :class:`ProtectedSubspace` of static shape (capacity
columns per side plus a fill count; unused columns are zero), so a jitted step
never retraces when the memory changes between tasks, and orbax saves it with
the rest of the optimizer state. Memories are built at task boundaries by
:mod:`subspace_optax.continual` builders (``sculpt_memory``, ``gpm_memory``,
``gradient_memory``), grown with :func:`add_directions` and written into a state
with :func:`set_memory`.
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
import optax

from subspace_optax._src import arguments
from subspace_optax._src import utils
from subspace_optax._src.continual import memory_updates
from subspace_optax._src.continual import protected as protected_lib
from subspace_optax._src.continual.protected import Capacity
from subspace_optax._src.continual.protected import OrthogonalState
from subspace_optax._src.continual.protected import ProtectedSubspace
from subspace_optax._src.pipeline import layout as layout_lib
from subspace_optax._src.pipeline import sharding

_HIGHEST = jax.lax.Precision.HIGHEST


def _remove_left(view, basis):
  coefficients = sharding.einsum('...mc,...mn->...cn', basis, view,
                                 precision=_HIGHEST)
  return view - sharding.einsum('...mc,...cn->...mn', basis, coefficients,
                                precision=_HIGHEST)


def _remove_right(view, basis):
  coefficients = sharding.einsum('...mn,...nc->...mc', view, basis,
                                 precision=_HIGHEST)
  return view - sharding.einsum('...mc,...nc->...mn', coefficients, basis,
                                precision=_HIGHEST)


def project_out(view: jax.Array, memory: ProtectedSubspace, mode: str):
  """Remove the protected components from an oriented ``(*batch, m, n)`` view.

  Args:
    view: the update in the oriented ``(*batch, m, n)`` matrix view.
    memory: the leaf's :class:`ProtectedSubspace`.
    mode: ``'two_sided'``, ``'left'``, ``'right'`` or ``'block'``.

  Returns:
    ``view`` without its protected components (float32).

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> from subspace_optax import continual as cl
    >>> memory = cl.ProtectedSubspace(jnp.eye(3)[:, :1], optax.MaskedNode(),
    ...                               jnp.array(1), optax.MaskedNode())
    >>> cl.project_out(jnp.ones((3, 2)), memory, 'left')
    Array([[0., 0.],
           [1., 1.],
           [1., 1.]], dtype=float32)
  """
  def side(basis):
    return None if utils.is_masked(basis) else basis.astype(jnp.float32)
  left, right = side(memory.left), side(memory.right)
  if mode == 'block':
    if left is None or right is None:
      raise ValueError("mode='block' needs both left and right bases.")
    block = sharding.einsum('...mc,...mn,...nd->...cd', left, view, right,
                            precision=_HIGHEST)
    return view - sharding.einsum('...mc,...cd,...nd->...mn', left, block, right,
                                  precision=_HIGHEST)
  if mode in ('two_sided', 'left') and left is not None:
    view = _remove_left(view, left)
  if mode in ('two_sided', 'right') and right is not None:
    view = _remove_right(view, right)
  return view


# Stands for the memory in the state template that optax.tree.map_params builds.
_NOT_PARAMS = object()


UNPROTECTED = ('train', 'freeze')


def _memory_in_use(memory_leaves) -> jax.Array:
  """Whether any leaf's memory holds a direction (traceable)."""
  counts = [jnp.sum(getattr(mem, side)) for mem in memory_leaves
            if isinstance(mem, ProtectedSubspace)
            for side in ('left_count', 'right_count')
            if not utils.is_masked(getattr(mem, side))]
  return sum(counts, jnp.zeros([], jnp.int32)) > 0


@arguments.declare_static_args('capacity', 'dimension_numbers', 'unprotected',
                             'inner')
def orthogonal_to(
    memory: Any = None,
    *,
    mode: str = 'two_sided',
    capacity: Optional[Capacity] = None,
    dimension_numbers: Any = None,
    unprotected: str = 'train',
    inner: Optional[optax.GradientTransformation] = None,
) -> optax.GradientTransformation:
  """Remove from each update its components in protected subspaces.

  Continual learning without forgetting through orthogonal updates: GPM (Saha,
  Garg, Roy, `Gradient Projection Memory for Continual Learning
  <https://arxiv.org/abs/2103.09762>`_, ICLR 2021) and Sculpting Subspaces
  (Nayak et al., `Constrained Full Fine-Tuning in LLMs for Continual Learning
  <https://arxiv.org/abs/2504.07097>`_, 2025). Per matrix update ``Δ``
  (``m x n``, rows = reduction axes) with protected bases ``U`` (``m x c``) and
  ``V`` (``n x c``):

  .. math::
    two\\_sided:\\ (I - UUᵀ)Δ(I - VVᵀ) \\qquad left:\\ (I - UUᵀ)Δ \\qquad
    right:\\ Δ(I - VVᵀ) \\qquad block:\\ Δ - UUᵀΔVVᵀ.

  Put it **last** in the chain (after the inner optimizer, weight decay and the
  learning rate): the invariant ``UᵀΔ = 0`` / ``ΔV = 0`` then holds on what is
  applied to the params, whatever comes before, up to float32 rounding (the
  projection runs in float32 at HIGHEST matmul precision).
  Leaves that are not matrices (biases, norm scales, leaves left out by
  ``dimension_numbers``) have no memory: with ``unprotected='train'`` they
  pass through unchanged, with ``'freeze'`` their update is zero as soon as
  the memory holds any direction (after the first task boundary), as GPM's
  reference freezes biases: a bias update shifts the layer's output on every
  old input, so it forgets whatever the memory protects.

  **bfloat16 params.** The update is orthogonal in float32, but adding it to
  bfloat16 weights rounds the result, and the rounding error lies in every
  direction: on a 32 x 16 matrix at learning rate 1e-2, about 20 % of the
  weight change after 100 steps is in the protected subspace (float32 params:
  2e-6). Chain :func:`subspace_optax.master_weights` after this stage to keep
  float32 master weights whose change stays orthogonal (the bfloat16 params
  are their rounding): ``optax.chain(sculpt(...), master_weights())``.

  The memory must hold orthonormal columns: a memory stored as given (here
  without ``capacity``, or by :func:`set_memory` with the state's shapes) is
  checked for NaN/Inf and for ``|QᵀQ - I| <= 1e-4`` (float32) on its filled
  columns, unused columns zero, and refused with a ``ValueError`` naming the
  leaf otherwise (a column scaled by 2, or one duplicated, left 45-80 % of a
  12 x 8 update in the protected subspace).
  ``add_directions(clear(memory), memory)`` re-orthonormalises one. The checks
  need concrete values: under ``jax.jit`` they are skipped.

  Args:
    memory: initial memory (a pytree of :class:`ProtectedSubspace`, e.g. from
      :func:`empty_memory` or a builder), or None for an empty one. Replace it
      between tasks with :func:`set_memory` (or ``optax.tree.set(state,
      memory=...)`` when the shapes are identical).
    mode: ``'two_sided'`` (default; Sculpting reference code), ``'left'`` (input
      side, GPM), ``'right'`` (output side) or ``'block'`` (the blog formula).
    capacity: columns per side of the state's memory (an int, a float fraction
      of the side's dimension, a pair ``(left, right)`` or a callable
      ``(m, n) ->`` those; see :func:`empty_memory`). None: the shapes of
      ``memory`` when given, else 1.0 (every direction can be protected; costs
      ``m² + n²`` floats per matrix). When both are given, ``memory`` is written
      into the capacity at init (re-orthonormalised).
    dimension_numbers: which leaves are matrices and how (as in
      :func:`subspace_optax.low_rank`); default every 2-D leaf.
    unprotected: what happens to the leaves without a memory once something
      is protected: ``'train'`` (default: updated freely) or ``'freeze'``
      (zero update).
    inner: an optimizer to wrap (learning rate included), whose input
      gradient is projected as well as its output; None (default): the stage
      projects the updates it receives.

  Returns:
    An ``optax.GradientTransformation`` whose state is an
    :class:`OrthogonalState`.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> from subspace_optax import continual as cl
    >>> params = {'w': jnp.ones((3, 2))}
    >>> tx = optax.chain(optax.sgd(1.0), cl.orthogonal_to(mode='left'))
    >>> memory = {'w': cl.ProtectedSubspace(
    ...     jnp.eye(3)[:, :1], optax.MaskedNode(), jnp.array(1),
    ...     optax.MaskedNode())}
    >>> state = cl.set_memory(tx.init(params), memory)
    >>> updates, state = tx.update(params, state, params)
    >>> updates['w'][0]  # the protected row does not move
    Array([0., 0.], dtype=float32)
  """
  protected_lib.mode_sides(mode)
  if unprotected not in UNPROTECTED:
    raise ValueError(f'`unprotected` must be one of {UNPROTECTED}, got '
                     f'{unprotected!r}.')
  if capacity is not None and not callable(capacity):
    for cap in protected_lib.split_capacity(capacity):
      protected_lib.resolve_capacity(cap, 1 << 30, 'capacity', '<construction>')

  wrapped = None if inner is None else optax.with_extra_args_support(inner)

  def init_fn(params):
    inner_state = (optax.EmptyState() if inner is None
                   else inner.init(params))
    if type(params).__name__ == '_ParamsPlaceholder':
      # optax.tree.map_params probe: the memory is never shaped like the params,
      # so the whole memory is one opaque (non-params) leaf of the template.
      return OrthogonalState(memory=_NOT_PARAMS, inner=inner_state)
    params = utils.unbox(params)
    if memory is not None and capacity is None:
      protected_lib.check_memory(memory, params, dimension_numbers)
      protected_lib.check_mode(memory, params, mode, dimension_numbers)
      protected_lib.check_finite_orthonormal(memory)
      return OrthogonalState(memory=jax.tree.map(jnp.asarray, memory),
                             inner=inner_state)
    state_memory = protected_lib.empty_memory(
        params, mode=mode, capacity=1.0 if capacity is None else capacity,
        dimension_numbers=dimension_numbers)
    if memory is not None:
      state_memory = memory_updates.add_directions(state_memory, memory)
    return OrthogonalState(memory=state_memory, inner=inner_state)

  def project(updates, memory_leaves, frozen):
    leaves, treedef = jax.tree.flatten(updates)
    layouts = protected_lib.matrix_layouts(updates, dimension_numbers)
    out = []
    for g, lay, mem in zip(leaves, layouts, memory_leaves):
      if lay is None:
        out.append(g if frozen is None
                   else jnp.where(frozen, jnp.zeros_like(g), g))
        continue
      view = layout_lib.matrix_view(g, lay).astype(jnp.float32)
      view = project_out(view, mem, mode)
      out.append(layout_lib.leaf_from_matrix(view, lay).astype(g.dtype))
    return treedef.unflatten(out)

  def update_fn(updates, state, params=None, **extra_args):
    memory_leaves = protected_lib.check_memory(
        state.memory, updates, dimension_numbers)
    frozen = (_memory_in_use(memory_leaves) if unprotected == 'freeze'
              else None)
    inner_state = state.inner
    if wrapped is not None:
      updates = project(updates, memory_leaves, frozen)
      updates, inner_state = wrapped.update(updates, inner_state, params,
                                            **extra_args)
    return (project(updates, memory_leaves, frozen),
            state._replace(inner=inner_state))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
