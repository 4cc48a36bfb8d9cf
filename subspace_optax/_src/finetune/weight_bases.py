"""Singular subspaces of the weights themselves, as a protected memory.

The principal (or minor) singular vectors of each pre-trained weight, in the
memory format of :func:`subspace_optax.continual.orthogonal_to`: updates then
avoid (``'top'``) the directions that carry most of the pre-trained weight, or
(``'bottom'``) the ones that carry least of it.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from subspace_optax._src.finetune import reparameterize as reparameterize_lib

ENDS = ('top', 'bottom')
MODES = ('two_sided', 'left', 'right', 'block')


def weight_subspace_basis(
    params: Any,
    rank: int | float,
    *,
    end: str = 'top',
    mode: str = 'two_sided',
    mask: Any = None,
    stacked: bool = True,
) -> Any:
  """A protected-subspace memory from the singular vectors of the weights.

  Per matrix leaf ``W = UΣVᵀ`` (``m x n``, rows = the leaf's second-to-last
  axis, the input axis of a flax kernel), the ``rank`` singular vectors at
  ``end`` of the spectrum:

  .. math::
    left = U_{:, S},\\qquad right = V_{:, S},\\qquad
    S = \\{1..r\\}\\ (top)\\ or\\ \\{k-r+1..k\\}\\ (bottom).

  With ``orthogonal_to(memory, mode='two_sided')`` every update ``Δ`` then
  satisfies ``U_Sᵀ Δ = 0`` and ``Δ V_S = 0``: the top singular triplets of
  the pre-trained weight are left untouched (``end='top'``). This is a
  projection in weight space named as what it is; it is not the
  reparameterisation of :func:`subspace_optax.svfit` or
  :func:`subspace_optax.milora`.

  Args:
    params: the pre-trained params (concrete arrays).
    rank: columns per side: an int ``<= min(m, n)`` or a float fraction of it.
    end: ``'top'`` (principal) or ``'bottom'`` (minor) singular vectors.
    mode: the :func:`~subspace_optax.continual.orthogonal_to` mode it is meant
      for; sides it does not use hold ``optax.MaskedNode()``.
    mask: pytree of bools (or callable ``params ->`` one) choosing the
      leaves; default every leaf of rank >= 2. Others hold ``MaskedNode()``.
    stacked: leaves of rank > 2 are stacks of ``(m, n)`` matrices (pass
      ``dimension_numbers=subspace_optax.last_two_axes`` to ``orthogonal_to``).

  Returns:
    A pytree with the structure of ``params`` of
    :class:`~subspace_optax.continual.ProtectedSubspace` (float32 bases,
    counts ``rank``) or ``optax.MaskedNode()``, usable as ``orthogonal_to``'s
    ``memory`` or with ``continual.set_memory``. Raises a ``ValueError``
    naming the leaf for a rank above ``min(m, n)`` or a non-finite weight.

  Examples:
    >>> import jax.numpy as jnp
    >>> import subspace_optax as so
    >>> params = {'w': jnp.diag(jnp.array([3.0, 2.0, 1.0]))}
    >>> memory = so.continual.weight_subspace_basis(params, 1)
    >>> tx = so.continual.orthogonal_to(memory)
    >>> state = tx.init(params)
    >>> update, _ = tx.update({'w': jnp.ones((3, 3))}, state, params)
    >>> float(abs(update['w'][0]).max())  # row and column of σ₁ removed
    0.0

  References:
    Saha, Garg, Roy, 2021, arXiv:2103.09762 (the projection of
    ``orthogonal_to``).
  """
  # Imported here: the public continual namespace imports much of the package.
  from subspace_optax import continual  # pylint: disable=g-import-not-at-top

  if end not in ENDS:
    raise ValueError(f'`end` must be one of {ENDS}, got {end!r}.')
  if mode not in MODES:
    raise ValueError(f'`mode` must be one of {MODES}, got {mode!r}.')
  use_left = mode in ('two_sided', 'left', 'block')
  use_right = mode in ('two_sided', 'right', 'block')
  flat, treedef = jax.tree_util.tree_flatten_with_path(params)
  if mask is None:
    flags = [np.ndim(p) >= 2 for _, p in flat]
  else:
    tree = mask(params) if callable(mask) else mask
    try:
      flags = [bool(f) for f in treedef.flatten_up_to(tree)]
    except (ValueError, TypeError) as error:
      raise ValueError('`mask` must be a pytree of bools with the structure '
                       f'of the params. ({error})') from error
  out = []
  for (path, p), flag in zip(flat, flags):
    name = jax.tree_util.keystr(path) or '<root>'
    if not flag:
      out.append(optax.MaskedNode())
      continue
    if np.ndim(p) < 2 or (np.ndim(p) > 2 and not stacked):
      raise ValueError(
          f'{name}: a leaf of shape {np.shape(p)} is not a (stack of) '
          'matrices; leave it out with `mask` (or pass stacked=True).')
    w = jnp.asarray(p)
    reparameterize_lib.check_finite(w, name, 'the weight')
    u, s, v = reparameterize_lib.thin_svd(w, name)
    k = s.shape[-1]
    r = reparameterize_lib.resolve_rank(rank, k, name)
    part = slice(0, r) if end == 'top' else slice(k - r, k)
    count = jnp.full(w.shape[:-2], r, jnp.int32)
    masked = optax.MaskedNode()
    out.append(continual.ProtectedSubspace(
        left=u[..., part].astype(jnp.float32) if use_left else masked,
        right=v[..., part].astype(jnp.float32) if use_right else masked,
        left_count=count if use_left else masked,
        right_count=count if use_right else masked))
  return treedef.unflatten(out)
