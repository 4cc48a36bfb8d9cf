"""Growing a protected-subspace memory and storing it in an optimizer state.

:func:`add_directions` Gram–Schmidts new directions into the free columns of a
memory (shapes never change); :func:`get_memory` / :func:`set_memory` read and
write the memory of the :func:`~subspace_optax.continual.orthogonal_to` stage
of an optax (or flax ``nnx.Optimizer``) state.
"""

from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from subspace_optax._src import utils
from subspace_optax._src.continual import protected as protected_lib
from subspace_optax._src.continual.protected import OrthogonalState
from subspace_optax._src.continual.protected import ProtectedSubspace
from subspace_optax._src.continual.protected import clear
from subspace_optax._src.pipeline import layout as layout_lib

_HIGHEST = jax.lax.Precision.HIGHEST


def _grow_one(basis, count, candidates, candidate_count, tolerance, capacity):
  """Gram–Schmidt ``candidates`` (k, j) into the free columns of ``basis``.

  Only the first ``capacity`` columns of ``basis`` are used (the array may be
  padded). Returns the new basis, the new count and how many candidates were
  wanted (independent of the capacity), so overflow can be reported.
  """
  valid = jnp.arange(candidates.shape[-1]) < candidate_count

  def remove(b, v):
    return v - jnp.matmul(b, jnp.matmul(b.T, v, precision=_HIGHEST),
                          precision=_HIGHEST)

  def body(i, carry):
    b, filled, wanted = carry
    d = jnp.where(valid[i], candidates[:, i], 0.0)
    norm_d = jnp.linalg.norm(d)
    r = remove(b, remove(b, d))  # "twice is enough" (Kahan–Parlett)
    norm_r = jnp.linalg.norm(r)
    accept = (norm_d > 0) & (norm_r > tolerance * norm_d)
    fits = accept & (filled < capacity)
    column = r / jnp.where(norm_r > 0, norm_r, 1.0)
    column = remove(b, column)
    column = column / jnp.maximum(jnp.linalg.norm(column), 1e-30)
    index = jnp.clip(filled, 0, capacity - 1)
    b = jnp.where(fits, b.at[:, index].set(column), b)
    return b, filled + fits.astype(jnp.int32), wanted + accept.astype(jnp.int32)

  # Candidates past candidate_count are zero and change nothing: stop there
  # (a GPM memory often adds a few of up to min(k, N) padded columns).
  steps = jnp.clip(candidate_count, 0, candidates.shape[-1]).astype(jnp.int32)
  return jax.lax.fori_loop(
      0, steps, body,
      (basis.astype(jnp.float32), count.astype(jnp.int32),
       count.astype(jnp.int32)))


@jax.jit
def _grow_jit(basis, count, candidates, candidate_count, tolerance, capacity):
  """:func:`_grow_one` over a flat batch: ``(B, k, c)``, ``(B,)``, ``(B, k, j)``."""
  return jax.vmap(
      lambda b, c, d, k: _grow_one(b, c, d, k, tolerance, capacity))(
          basis, count, candidates, candidate_count)


def _bucket(n: int, minimum: int = 8) -> int:
  """``n`` rounded up to one of four sizes per octave (few compiled shapes)."""
  n = max(n, minimum)
  step = max(1, 1 << max(0, n.bit_length() - 3))
  return -(-n // step) * step


def _grow(basis, count, candidates, candidate_count, tolerance):
  """Batched :func:`_grow_one` with any number of batch axes.

  Every dimension is zero-padded to a bucket size, which changes nothing
  (zero rows and zero candidates contribute nothing; the capacity is a traced
  scalar), so memories of many shapes share a few compilations.
  """
  batch = tuple(count.shape)
  size = math.prod(batch)
  k, c = basis.shape[-2:]
  j = candidates.shape[-1]
  padded_size, k_p, c_p, j_p = (
      _bucket(size, 1), _bucket(k), _bucket(c), _bucket(j))

  on_host = all(_concrete(x) is not None for x in (
      basis, count, candidates, candidate_count))
  xp = np if on_host else jnp  # host padding compiles nothing

  def pad(x, tail, target_tail):
    # A concrete input beside traced ones goes in as a host array: its own
    # sharding (e.g. on an Auto mesh) must not meet the trace's mesh.
    host = _concrete(x)
    x = xp.reshape(xp.asarray(x if host is None else host), (size,) + tail)
    widths = [(0, padded_size - size)] + [
        (0, t - s) for s, t in zip(tail, target_tail)]
    return xp.pad(x, widths)

  grown, filled, wanted = _grow_jit(
      pad(basis, (k, c), (k_p, c_p)), pad(count, (), ()),
      pad(candidates, (k, j), (k_p, j_p)),
      pad(xp.broadcast_to(xp.asarray(candidate_count), batch), (), ()),
      tolerance, np.int32(c))
  if on_host:
    grown, filled, wanted = (np.asarray(x) for x in (grown, filled, wanted))
  out = (grown[:size, :k, :c].reshape(basis.shape),
         filled[:size].reshape(batch), wanted[:size].reshape(batch))
  return tuple(jnp.asarray(x) for x in out)


def _concrete(x) -> Optional[np.ndarray]:
  try:
    return np.asarray(x)
  except (jax.errors.TracerArrayConversionError,
          jax.errors.ConcretizationTypeError):
    return None


def _report_overflow(path, side, wanted, filled, capacity, on_overflow):
  wanted, filled = _concrete(wanted), _concrete(filled)
  if wanted is None or filled is None or not np.any(wanted > filled):
    return
  message = (
      f'{path}: the {side} protected subspace needs {int(np.max(wanted))} '
      f'directions but its capacity is {capacity}; '
      f'{int(np.sum(wanted - filled))} direction(s) were not protected. Give a '
      'larger capacity (orthogonal_to(capacity=...)/empty_memory), a lower '
      'threshold/max_fraction, or on_overflow="warn" to keep the first ones.')
  if on_overflow == 'raise':
    raise ValueError(message)
  if on_overflow == 'warn':
    utils.warn_at_caller(message, RuntimeWarning)


def add_directions(
    memory,
    new,
    *,
    tolerance: float = 1e-4,
    on_overflow: str = 'raise',
    sides: Optional[tuple[str, ...]] = None,
):
  """Grow ``memory`` with the directions of ``new`` (re-orthonormalised).

  Each new direction (in order, so give the most important first) is
  Gram–Schmidt orthogonalised against the columns already held (twice, for
  float32 accuracy), dropped when what is left is below ``tolerance`` times its
  norm (already protected), and otherwise normalised and written into the next
  free column; the count grows. Shapes never change.

  ``new`` holding NaN/Inf is refused with a ``ValueError`` naming the leaf
  (Gram–Schmidt would silently drop such columns); checked on concrete values
  only.

  Args:
    memory: a memory (pytree of :class:`ProtectedSubspace`), e.g.
      ``get_memory(opt_state)`` or :func:`empty_memory`.
    new: a memory of the same structure and dimensions with any capacity (from
      ``sculpt_memory``, ``gpm_memory``, ``gradient_memory``...); its columns
      beyond its counts are ignored.
    tolerance: relative residual norm below which a direction counts as
      already protected.
    on_overflow: ``'raise'`` (default), ``'warn'`` or ``'ignore'`` when more
      directions are wanted than free columns; with ``'warn'``/``'ignore'`` the
      first ones are kept. Checked only on concrete values (not under jit,
      where extra directions are dropped silently).
    sides: which sides of ``new`` to add (``('left',)``, ``('right',)``);
      default every side ``new`` holds (a ``MaskedNode()`` side adds nothing).
      A side ``new`` holds but ``memory`` does not is an error.

  Returns:
    The grown memory (same shapes as ``memory``).

  Examples:
    >>> import jax.numpy as jnp
    >>> from subspace_optax import continual as cl
    >>> g = jnp.eye(6, 4)[None] * jnp.array([4.0, 3.0, 2.0, 1.0])
    >>> memory = cl.gradient_memory({'w': g}, 0.5, mode='left')  # e_1
    >>> h = jnp.eye(6, 4)[None] * jnp.array([1.0, 1.0, 4.0, 1.0])
    >>> new = cl.gradient_memory({'w': h}, 0.5, mode='left')  # e_3
    >>> int(cl.add_directions(memory, new)['w'].left_count)
    2
  """
  if on_overflow not in ('raise', 'warn', 'ignore'):
    raise ValueError(
        f'`on_overflow` must be "raise", "warn" or "ignore", got {on_overflow!r}.')
  is_leaf = protected_lib.is_memory_leaf
  memory_leaves, treedef = jax.tree.flatten(memory, is_leaf=is_leaf)
  try:
    new_leaves = treedef.flatten_up_to(new)
  except (ValueError, TypeError) as error:
    raise ValueError(
        f'`new` does not have the structure of `memory`. ({error})') from error
  protected_lib.check_finite_orthonormal(
      treedef.unflatten(new_leaves), orthonormal=False, what='new directions')
  paths = [layout_lib.path_name(p) for p, _ in
           jax.tree_util.tree_flatten_with_path(memory, is_leaf=is_leaf)[0]]
  out = []
  for path, mem, add in zip(paths, memory_leaves, new_leaves):
    if not isinstance(mem, ProtectedSubspace):
      out.append(mem)
      continue
    if not isinstance(add, ProtectedSubspace):
      raise ValueError(f'{path}: `new` holds {add!r} where the memory holds a '
                       'ProtectedSubspace.')
    fields = {}
    for side in ('left', 'right'):
      basis, count = getattr(mem, side), getattr(mem, side + '_count')
      candidates = getattr(add, side)
      candidate_count = getattr(add, side + '_count')
      if utils.is_masked(candidates) or (
          sides is not None and side not in sides):
        fields[side], fields[side + '_count'] = basis, count
        continue
      if utils.is_masked(basis):
        raise ValueError(
            f'{path}: `new` has {side} directions but the memory holds no '
            f'{side} side; pass sides=("{"right" if side == "left" else "left"}",) '
            'or build the memory with a mode that holds both.')
      batch = tuple(jnp.shape(count))
      protected_lib.check_side(candidates, batch, basis.shape[-2], path,
                               f'new {side}')
      grown, filled, wanted = _grow(
          basis, jnp.asarray(count, jnp.int32),
          jnp.asarray(candidates, jnp.float32),
          jnp.asarray(candidate_count, jnp.int32), float(tolerance))
      _report_overflow(path, side, wanted, filled, basis.shape[-1], on_overflow)
      fields[side], fields[side + '_count'] = grown, filled
    out.append(ProtectedSubspace(**fields))
  return treedef.unflatten(out)


def _is_state(x) -> bool:
  return isinstance(x, OrthogonalState)


def _find_states(opt_state) -> list:
  return [x for x in jax.tree.leaves(opt_state, is_leaf=_is_state)
          if _is_state(x)]


def get_memory(opt_state):
  """The memory held by the (single) :func:`orthogonal_to` stage of a state.

  Works on plain optax states and on flax ``nnx.Optimizer.opt_state``
  (Variables are unwrapped).

  Args:
    opt_state: an optimizer state holding one :class:`OrthogonalState`.

  Returns:
    The memory, a pytree of :class:`ProtectedSubspace` (``MaskedNode`` at
    leaves that are not matrices).

  Examples:
    >>> import jax.numpy as jnp
    >>> from subspace_optax import continual as cl
    >>> params = {'w': jnp.ones((6, 4))}
    >>> state = cl.gpm(1e-2).init(params)
    >>> int(cl.get_memory(state)['w'].left_count)  # nothing protected yet
    0
  """
  states = _find_states(opt_state)
  if len(states) != 1:
    raise ValueError(
        f'Expected exactly one OrthogonalState in the optimizer state, found '
        f'{len(states)}; use optax.tree.get/set to address one.')
  return utils.unbox(states[0].memory)


def set_memory(opt_state, memory, *, tolerance: float = 1e-4,
               on_overflow: str = 'raise'):
  """Put ``memory`` into the :func:`orthogonal_to` stage of ``opt_state``.

  When ``memory`` has exactly the state's shapes it is stored as is (no
  retrace: a jitted step sees the same shapes). Otherwise (e.g. a compact memory
  from ``sculpt_memory``) the state's memory is **replaced** by ``memory``
  re-orthonormalised into the state's capacity (:func:`add_directions` on a
  cleared memory). To grow instead, pass
  ``add_directions(get_memory(opt_state), new)``.

  Raises a ``ValueError`` naming the leaf path when a leaf does not fit, holds
  NaN/Inf, or (stored as is) is not orthonormal: ``|QᵀQ - I| > 1e-4`` on the
  filled columns, or a column beyond the count is not zero (re-orthonormalise
  with ``add_directions(clear(memory), memory)``). These checks need concrete
  values; under ``jax.jit`` they are skipped. Flax ``nnx.Optimizer`` states
  are supported (Variables keep their metadata).

  Args:
    opt_state: an optimizer state holding one :class:`OrthogonalState`.
    memory: the new memory (the structure of :func:`get_memory`'s).
    tolerance: relative energy below which a re-orthonormalised direction is
      dropped (as :func:`add_directions`).
    on_overflow: ``'raise'``, ``'warn'`` or ``'ignore'`` when ``memory`` holds
      more directions than the state's capacity.

  Returns:
    ``opt_state`` with the memory replaced (same structure and, when the
    shapes match, the same shapes).

  Examples:
    >>> import jax.numpy as jnp
    >>> from subspace_optax import continual as cl
    >>> params = {'w': jnp.ones((6, 4))}
    >>> state = cl.gpm(1e-2).init(params)
    >>> g = jnp.eye(6, 4)[None] * jnp.array([4.0, 3.0, 2.0, 1.0])
    >>> memory = cl.gradient_memory({'w': g}, 0.5, mode='left')
    >>> state = cl.set_memory(state, memory)
    >>> int(cl.get_memory(state)['w'].left_count)
    1
  """
  states = _find_states(opt_state)
  if len(states) != 1:
    raise ValueError(
        f'Expected exactly one OrthogonalState in the optimizer state, found '
        f'{len(states)}.')
  current = get_memory(opt_state)
  treedef = jax.tree.structure(current, is_leaf=protected_lib.is_memory_leaf)
  try:
    new_leaves = treedef.flatten_up_to(memory)
  except (ValueError, TypeError) as error:
    raise ValueError(
        'The memory does not have the structure of the optimizer state\'s '
        f'memory (built from other params?). ({error})') from error
  flat_paths = jax.tree_util.tree_flatten_with_path(
      current, is_leaf=protected_lib.is_memory_leaf)[0]
  same = True
  for (path, old), new in zip(flat_paths, new_leaves):
    if isinstance(old, ProtectedSubspace) != isinstance(new, ProtectedSubspace):
      raise ValueError(f'{layout_lib.path_name(path)}: expected '
                       f'{type(old).__name__}, got {type(new).__name__}.')
    if not isinstance(old, ProtectedSubspace):
      continue
    for side in ('left', 'right'):
      a, b = getattr(old, side), getattr(new, side)
      if utils.is_masked(a) and not utils.is_masked(b):
        raise ValueError(
            f'{layout_lib.path_name(path)}: the memory has {side} directions '
            f'but the orthogonal_to stage holds no {side} side (its mode).')
      if utils.is_masked(a):
        continue
      if utils.is_masked(b):
        same = False
        continue
      protected_lib.check_side(
          b, tuple(jnp.shape(getattr(old, side + '_count'))), a.shape[-2],
          layout_lib.path_name(path), side)
      same = same and tuple(jnp.shape(a)) == tuple(jnp.shape(b))
  if same:
    protected_lib.check_finite_orthonormal(memory)
    fitted = jax.tree.map(
        lambda old, new: jnp.asarray(new, old.dtype), current, memory)
  else:
    fitted = add_directions(clear(current), memory, tolerance=tolerance,
                            on_overflow=on_overflow)

  def replace(state):
    if not _is_state(state):
      return state
    return state._replace(memory=jax.tree.map(
        _rebox, state.memory, fitted, is_leaf=utils.is_variable))

  return jax.tree.map(replace, opt_state, is_leaf=_is_state)


def _rebox(old, new):
  if utils.is_variable(old):
    return old.replace(new)
  return new
