"""Residual paths of the subspace pipeline: what happens outside the subspace.

:func:`~subspace_optax.low_rank` hands its ``residual=`` transform the part of
each projected gradient that the basis ``Q`` does not capture,

.. math::
  G_\\perp = G - QQᵀG \\qquad (QᵀG_\\perp = 0,\\quad G_\\perp + QQᵀG = G),

one oriented ``(k, l)`` matrix at a time, with the extra args
``coefficients`` (``C = QᵀG``), ``subspace_updates`` (``N = inner(C)``) and
``gradients`` (``G``) of that matrix; each matrix keeps its own state. The
paths here (state-free but for Fira's norm-growth limiter):

* FRUGAL (Zmushko et al. 2024, arXiv 2411.07837): ``s · sign(G_⊥)`` or
  ``s · G_⊥`` (:func:`frugal_residual`);
* Fira (Chen et al. 2024, arXiv 2410.01623): ``φ ⊙ G_⊥`` with the per-channel
  ratio ``φ_j = ‖N_{:,j}‖ / ‖C_{:,j}‖`` (:func:`scale_residual_by_subspace`),
  then a norm-growth limiter (:func:`fira_residual`).
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import optax

from subspace_optax._src.transforms import norm_growth

GRANULARITIES = ('channel', 'tensor')
FRUGAL_RESIDUALS = ('sign', 'sgd', None)
_MATRIX_AXES = (-2, -1)


def check_extra_args(extra_args: dict, names: tuple[str, ...],
                     who: str) -> None:
  """A named error if ``who`` is used outside ``low_rank(residual=...)``."""
  missing = [n for n in names if n not in extra_args]
  if missing:
    raise ValueError(
        f'{who} is a residual path of subspace_optax.low_rank(residual=...) '
        f'and needs the extra args {missing}; use it there.')


def subspace_norm_ratio(
    coefficients: jax.Array, subspace_update: jax.Array,
    granularity: str = 'channel',
) -> jax.Array:
  """How much the inner optimizer scales each channel, ``‖N_j‖/(‖C_j‖+1e-8)``.

  ``coefficients`` ``C`` and ``subspace_update`` ``N`` have the oriented shape
  ``(*batch, rank, l)``; norms are taken over the rank axis, one factor per
  channel ``j`` of the non-projected axis (``'channel'``, shape
  ``(*batch, 1, l)``), or over the whole matrix (``'tensor'``, shape
  ``(*batch, 1, 1)``). Fira's ``φ`` and APOLLO's ``s``.

  Args:
    coefficients: ``C``, shape ``(*batch, rank, l)``.
    subspace_update: ``N``, the inner optimizer's update of ``C`` (same shape).
    granularity: ``'channel'`` (one factor per column) or ``'tensor'``.

  Returns:
    The factors, float32, shape ``(*batch, 1, l)`` or ``(*batch, 1, 1)``.

  Examples:
    >>> import jax.numpy as jnp
    >>> import subspace_optax as so
    >>> c = jnp.array([[3.0, 1.0], [4.0, 0.0]])
    >>> so.subspace_norm_ratio(c, 2 * c)
    Array([[2., 2.]], dtype=float32)
  """
  if granularity not in GRANULARITIES:
    raise ValueError(
        f'`granularity` must be one of {GRANULARITIES}, got {granularity!r}.')
  axes = (-2,) if granularity == 'channel' else _MATRIX_AXES
  norm = lambda x: jnp.sqrt(jnp.sum(
      jnp.square(x.astype(jnp.float32)), axis=axes, keepdims=True))
  return norm(subspace_update) / (norm(coefficients) + 1e-8)


def scale_residual_by_subspace(
    reference_residual: bool = False, subspace_scale: float = 1.0,
) -> optax.GradientTransformationExtraArgs:
  """Fira's norm-based scaling of the residual, ``S = φ ⊙ (G - QQᵀG)``.

  A residual path for :func:`~subspace_optax.low_rank` (state-free). ``φ`` is
  :func:`subspace_norm_ratio` with channel granularity. With
  ``reference_residual=True`` the residual is the reference code's
  ``G - α QQᵀG`` (its back-projection already carries ``α``), i.e.
  ``S_ref - S_paper = (1-α) φ ⊙ QQᵀG``.

  Args:
    reference_residual: False: the paper's ``G - QQᵀG``; True: the reference
      code's ``G - α QQᵀG``.
    subspace_scale: ``α``, the pipeline's ``scale`` (``reference_residual``
      only).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` (state-free; a residual path
    for :func:`~subspace_optax.low_rank`).

  Examples:
    >>> import jax.numpy as jnp
    >>> import subspace_optax as so
    >>> tx = so.low_rank(so.transforms.scale_by_adam_moments(), rank=2,
    ...                  residual=so.scale_residual_by_subspace())
    >>> params = {'w': jnp.ones((8, 6))}
    >>> updates, state = tx.update(params, tx.init(params))
    >>> updates['w'].shape
    (8, 6)
  """

  def init_fn(params):
    del params
    return optax.EmptyState()

  def update_fn(updates, state, params=None, **extra_args):
    del params
    names = ('coefficients', 'subspace_updates') + (
        ('gradients',) if reference_residual else ())
    check_extra_args(extra_args, names, 'scale_residual_by_subspace')
    residual = updates
    if reference_residual:
      residual = jax.tree.map(
          lambda r, g: r + (1 - subspace_scale) * (g - r),
          updates, extra_args['gradients'])
    out = jax.tree.map(
        lambda r, c, n: r * subspace_norm_ratio(c, n, 'channel'),
        residual, extra_args['coefficients'], extra_args['subspace_updates'])
    return out, state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def fira_residual(
    limiter: Optional[float] = 1.01,
    reference_residual: bool = False,
    subspace_scale: float = 1.0,
) -> optax.GradientTransformationExtraArgs:
  """Fira's residual path: norm-based scaling, then the norm-growth limiter.

  Chen et al., `Fira: Can We Achieve Full-rank Training of LLMs Under Low-rank
  Constraint? <https://arxiv.org/abs/2410.01623>`_, §3.2–3.3. For
  ``low_rank(inner, residual=fira_residual(...))``, per matrix with
  ``C = QᵀG`` and ``N = inner(C)``:

  .. math::
    φ_j = \\frac{‖N_{:,j}‖}{‖C_{:,j}‖ + 10^{-8}},\\qquad
    S = φ ⊙ (G - QQᵀG),\\qquad S \\leftarrow limit(S),

  one factor per channel ``j`` of the non-projected axis (use
  ``side='reference'`` so the channels are those of the larger dimension, as
  Fira). The limiter (:func:`~subspace_optax.clip_norm_growth`) acts per matrix
  (each layer of a stack separately).

  Args:
    limiter: ``γ`` of the norm-growth limiter, or None for no limiter.
    reference_residual: False follows the paper (``G - QQᵀG``); True reproduces
      the reference code (``G - α QQᵀG``, which leaks ``1-α`` of the in-subspace
      gradient into the residual: 75 % at ``α = 0.25``).
    subspace_scale: ``α``, the pipeline's ``scale``; used only with
      ``reference_residual=True``.

  Returns:
    An ``optax.GradientTransformationExtraArgs``. (a residual path for
    :func:`~subspace_optax.low_rank`).

  Examples:
    >>> import jax.numpy as jnp
    >>> import subspace_optax as so
    >>> tx = so.low_rank(so.transforms.scale_by_adam_moments(), rank=2,
    ...                  residual=so.fira_residual(limiter=1.01))
    >>> params = {'w': jnp.ones((8, 6))}
    >>> updates, state = tx.update(params, tx.init(params))
    >>> updates['w'].shape
    (8, 6)
  """
  scaling = scale_residual_by_subspace(reference_residual, subspace_scale)
  if limiter is None:
    return scaling
  return optax.chain(
      scaling, norm_growth.clip_norm_growth(limiter, axes=_MATRIX_AXES))


def frugal_residual(
    residual: str | optax.GradientTransformation | None, scale: float,
) -> Optional[optax.GradientTransformation]:
  """FRUGAL's state-free residual path, ``scale · f(G - QQᵀG)``.

  Zmushko et al., `FRUGAL <https://arxiv.org/abs/2411.07837>`_, Algorithm 1:
  ``'sign'`` is signSGD (``f = sign``), ``'sgd'`` the raw residual
  (``f = id``), an optax transform is ``f`` itself, None means no residual
  path (returns None).
  """
  if residual is None:
    return None
  if isinstance(residual, str) and residual == 'sign':
    return optax.chain(optax.scale_by_sign(), optax.scale(scale))
  if isinstance(residual, str) and residual == 'sgd':
    return optax.scale(scale)
  if isinstance(residual, optax.GradientTransformation):
    return optax.chain(residual, optax.scale(scale))
  raise ValueError(
      f'`residual` must be one of {FRUGAL_RESIDUALS} or an optax transform, '
      f'got {residual!r}.')
