"""Effort: train the minor singular triplets, keep the principal ones.

Yan et al., `Orthogonal Subspace Decomposition for Generalizable AI-Generated
Image Detection <https://arxiv.org/abs/2411.15633>`_, ICML 2025.
"""

from __future__ import annotations

from typing import Any, Optional

import jax.numpy as jnp
import optax

from subspace_optax._src import arguments
from subspace_optax._src.finetune import reparameterize as reparameterize_lib

CONSTRAINTS = (None, 'orthogonal')


def effort_penalty(factors, frozen, orthogonal_weight: float,
                   norm_weight: float):
  """Effort's constraint losses for one matrix (paper Eqs. 5–6).

  ``orthogonal_weight (‖ÛᵀÛ - I‖_F² + ‖V̂ᵀV̂ - I‖_F²)`` with
  ``Û = [U_r, U_res]``, ``V̂ = [V_r, V_res]``, plus ``norm_weight |‖W'‖_F² - ‖W‖_F²|``, the norm of
  ``W' = U_rΣ_rV_rᵀ + U_res diag(s) V_resᵀ`` computed from the factors (no
  ``m x n`` product).
  """
  mm = reparameterize_lib.matmul
  u = jnp.concatenate([frozen['u'], factors['u']], axis=-1)
  v = jnp.concatenate([frozen['v'], factors['v']], axis=-1)
  eye = jnp.eye(u.shape[-1], dtype=u.dtype)
  orthogonal = (jnp.sum((mm('mi,mj->ij', u, u) - eye) ** 2)
                + jnp.sum((mm('ni,nj->ij', v, v) - eye) ** 2))
  s_main, s_res = frozen['s'], factors['s']
  cross = jnp.sum(s_main[:, None] * mm('mi,mj->ij', frozen['u'], factors['u'])
                  * mm('ni,nj->ij', frozen['v'], factors['v']) * s_res[None])
  residual = jnp.sum(
      s_res[:, None] * mm('mi,mj->ij', factors['u'], factors['u'])
      * mm('ni,nj->ij', factors['v'], factors['v']) * s_res[None])
  norm_sq = jnp.sum(s_main ** 2) + 2 * cross + residual
  return (orthogonal_weight * orthogonal
          + norm_weight * jnp.abs(norm_sq - frozen['norm_sq']))


def effort_factorization(
    rank: int | float = 1, *, constraint: Optional[str] = None,
    orthogonal_weight: float = 1.0, norm_weight: float = 1.0,
) -> reparameterize_lib.Factorization:
  """Effort's factors: the bottom-``rank`` triplets ``U_res, s, V_res``;
  ``reconstruct = U_res diag(s) V_resᵀ`` (see :func:`effort`)."""
  if constraint not in CONSTRAINTS:
    raise ValueError(f'`constraint` must be one of {CONSTRAINTS}, got '
                     f'{constraint!r}.')
  reparameterize_lib.validate_rank(rank)

  def init(w, key, path):
    del key
    u, s, v = reparameterize_lib.thin_svd(w, path)
    k = s.shape[-1]
    q = reparameterize_lib.resolve_rank(rank, k, path)
    factors = {'u': u[..., k - q:], 's': s[..., k - q:], 'v': v[..., k - q:]}
    if constraint is None:
      return factors, {}
    frozen = {'u': u[..., :k - q], 's': s[..., :k - q], 'v': v[..., :k - q],
              'norm_sq': jnp.sum(s ** 2, axis=-1)}
    return factors, frozen

  def reconstruct(factors, frozen):
    del frozen
    return reparameterize_lib.matmul(
        'mq,q,nq->mn', factors['u'], factors['s'], factors['v'])

  def penalty(factors, frozen):
    return effort_penalty(factors, frozen, orthogonal_weight, norm_weight)

  return reparameterize_lib.Factorization(
      'effort', init, reconstruct,
      penalty if constraint == 'orthogonal' else None)


@arguments.declare_static_args('rank', 'constraint', 'mask', 'stacked')
def effort(
    learning_rate: optax.ScalarOrSchedule,
    rank: int | float = 1,
    *,
    constraint: Optional[str] = None,
    orthogonal_weight: float = 1.0,
    norm_weight: float = 1.0,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    mask: Any = None,
    others: Optional[optax.GradientTransformation] = None,
    stacked: bool = True,
) -> optax.GradientTransformationExtraArgs:
  """Effort: AdamW on the minor singular triplets of each weight.

  Yan et al., `Orthogonal Subspace Decomposition for Generalizable
  AI-Generated Image Detection <https://arxiv.org/abs/2411.15633>`_, ICML 2025.
  With the thin SVD ``W = UΣVᵀ`` (``k = min(m, n)``) split into the principal
  ``r = k - q`` and the residual ``q = rank`` triplets:

  .. math::
    W' = U_rΣ_rV_rᵀ + U_{res}\\,diag(s)\\,V_{res}ᵀ,

  the principal part frozen; ``U_res`` (``m x q``), ``s`` (``q``) and
  ``V_res`` (``n x q``) all trained, starting at the bottom ``q`` triplets.
  The released code keeps ``q = 1`` (the single smallest triplet) trainable.
  Exact on the dense model through :func:`subspace_optax.reparameterize`.
  State per matrix: ``(m + n + 1) q`` factors and AdamW's two moments; nothing
  frozen is stored by default (the params hold ``U_rΣ_rV_rᵀ``).

  ``constraint=None`` (default) follows the released training code as we
  read it, which adds no constraint loss. ``constraint='orthogonal'`` adds
  the paper's losses to the factor gradients: ``orthogonal_weight
  (‖ÛᵀÛ - I‖_F² + ‖V̂ᵀV̂ - I‖_F²)`` (``Û = [U_r, U_res]``) and
  ``norm_weight |‖W'‖_F² - ‖W‖_F²|`` (:func:`effort_penalty`); this stores
  ``U_r``, ``σ_r``, ``V_r`` (about ``(m + n) k`` floats). Departures: the
  weights (1.0 each) are ours; copies of the released layer compute the
  orthogonality loss as ``0.5 ‖ÛÛᵀ - I‖_F + 0.5 ‖V̂V̂ᵀ - I‖_F`` (unsquared;
  the same target on square weights), whose gradient is undefined at the
  orthonormal start. At the start ``‖W'‖_F² - ‖W‖_F²`` is rounding noise, so
  the norm loss's first gradients have an arbitrary sign.

  Args:
    learning_rate: a float or an optax schedule.
    rank: ``q``, the trained minor triplets: an int ``<= min(m, n)`` or a
      float fraction of it.
    constraint: None or ``'orthogonal'``.
    orthogonal_weight: weight of the orthogonality loss.
    norm_weight: weight of the singular-value (Frobenius) norm loss.
    b1: AdamW's first-moment decay.
    b2: AdamW's second-moment decay.
    eps: AdamW's epsilon.
    weight_decay: AdamW's decoupled weight decay, on every factor.
    mask: which leaves to reparameterise (see
      :func:`subspace_optax.reparameterize`).
    others: optimizer of the other leaves; None freezes them.
    stacked: leaves of rank > 2 are stacks of matrices.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Examples:
    >>> import jax.numpy as jnp
    >>> import subspace_optax as so
    >>> params = {'w': jnp.diag(jnp.array([3.0, 2.0, 1.0]))}
    >>> so.effort(1e-3).init(params).factors['w']['s']
    Array([1.], dtype=float32)

  References:
    Yan et al., 2025, arXiv:2411.15633.
  """
  factorization = effort_factorization(
      rank, constraint=constraint, orthogonal_weight=orthogonal_weight,
      norm_weight=norm_weight)
  return reparameterize_lib.reparameterize(
      factorization,
      optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps,
                  weight_decay=weight_decay),
      mask=mask, others=others, stacked=stacked)
