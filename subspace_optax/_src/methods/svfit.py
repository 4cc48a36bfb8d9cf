"""SVFit: train the top singular values of each pre-trained weight.

Sun et al., `SVFit: Parameter-Efficient Fine-Tuning of Large Pre-Trained Models
Using Singular Values <https://arxiv.org/abs/2409.05926>`_, 2024.
"""

from __future__ import annotations

from typing import Any, Optional, Union

import numpy as np
import optax

from subspace_optax._src import arguments
from subspace_optax._src.finetune import reparameterize as reparameterize_lib

Rank = Union[int, float, str]


def energy_rank(s: Any, energy: float, path: str) -> int:
  """Smallest ``r`` with ``Σ_{i≤r} σ_i² / Σ_i σ_i² >= energy``.

  The largest such ``r`` over a stack of matrices (one rank per leaf). Read on
  the host from concrete singular values.
  """
  value = reparameterize_lib.host_value(s)
  if value is None:
    raise ValueError(
        f"{path}: rank='energy' reads the singular values on the host; call "
        'init outside jax.jit (on the concrete pre-trained params), or give '
        'an int rank.')
  value = np.asarray(value, np.float64).reshape(-1, value.shape[-1])
  energy_sq = value ** 2
  total = np.sum(energy_sq, axis=-1, keepdims=True)
  share = np.cumsum(energy_sq, axis=-1) / np.where(total > 0, total, 1.0)
  ranks = 1 + np.sum(share < energy * (1 - 1e-12), axis=-1)
  return int(min(np.max(ranks), value.shape[-1]))


def svfit_factorization(
    rank: Rank = 'energy', *, energy: float = 0.99,
) -> reparameterize_lib.Factorization:
  """SVFit's factors: the top-``r`` singular values ``s``, with ``U_r``,
  ``V_r`` frozen; ``reconstruct = U_r diag(s) V_rᵀ``."""
  if isinstance(rank, str) and rank != 'energy':
    raise ValueError(f"`rank` must be an int, a float fraction or 'energy', "
                     f'got {rank!r}.')
  if rank != 'energy':
    reparameterize_lib.validate_rank(rank)
  if isinstance(energy, bool) or not isinstance(energy, (int, float)):
    raise TypeError(f'`energy` must be a Python float, got '
                    f'{type(energy).__name__}.')
  if not 0.0 < energy <= 1.0:
    raise ValueError(f'`energy`={energy} must lie in (0, 1].')

  def init(w, key, path):
    del key
    u, s, v = reparameterize_lib.thin_svd(w, path)
    k = s.shape[-1]
    r = (energy_rank(s, energy, path) if rank == 'energy'
         else reparameterize_lib.resolve_rank(rank, k, path))
    return {'s': s[..., :r]}, {'u': u[..., :r], 'v': v[..., :r]}

  def reconstruct(factors, frozen):
    return reparameterize_lib.matmul(
        'mr,r,nr->mn', frozen['u'], factors['s'], frozen['v'])

  def difference(factors, step, frozen):  # U_r diag(u_s) V_rᵀ
    del factors
    return reconstruct(step, frozen)

  return reparameterize_lib.Factorization('svfit', init, reconstruct,
                                          difference=difference)


@arguments.declare_static_args('rank', 'energy', 'mask', 'stacked')
def svfit(
    learning_rate: optax.ScalarOrSchedule,
    rank: Rank = 'energy',
    *,
    energy: float = 0.99,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    mask: Any = None,
    others: Optional[optax.GradientTransformation] = None,
    stacked: bool = True,
) -> optax.GradientTransformationExtraArgs:
  """SVFit: AdamW on the top singular values of each pre-trained weight.

  Sun et al., `SVFit: Parameter-Efficient Fine-Tuning of Large Pre-Trained
  Models Using Singular Values <https://arxiv.org/abs/2409.05926>`_, 2024.
  With ``W = UΣVᵀ`` (``m x n``) and its top ``r`` triplets,

  .. math::
    W(s) = W_e + U_r\\,diag(s)\\,V_rᵀ,\\qquad W_e = W - U_rΣ_rV_rᵀ,\\qquad
    s_0 = σ_{1..r},

  only ``s`` (``r`` floats per matrix) is trained; ``U_r``, ``V_r`` and
  ``W_e`` are frozen. The rank keeps "over 99 % of the matrix's information":
  ``rank='energy'`` takes the smallest ``r`` with
  ``Σ_{i≤r} σ_i² / Σ_i σ_i² ≥ energy`` (static, read at init from the
  concrete weights; the largest over a stack of layers).
  Exact on the dense model through :func:`subspace_optax.reparameterize`:
  the update is ``U_r diag(s' - s) V_rᵀ``. State per matrix: ``s`` and
  AdamW's two moments (``3r`` floats) plus ``U_r``, ``V_r`` (``(m + n) r``);
  ``W_e`` is never stored (the params hold it).

  Departures: we found no released code; the optimizer settings are the
  caller's (defaults: AdamW, ``b1=0.9, b2=0.999, eps=1e-8``, no weight decay).
  The energy criterion on ``σ²`` is our reading of the paper's "information".

  Args:
    learning_rate: a float or an optax schedule.
    rank: ``'energy'``, an int ``<= min(m, n)`` or a float fraction of it.
    energy: the share of ``Σσ²`` kept by ``rank='energy'``.
    b1: AdamW's first-moment decay.
    b2: AdamW's second-moment decay.
    eps: AdamW's epsilon.
    weight_decay: AdamW's decoupled weight decay, on ``s``.
    mask: which leaves to reparameterise (see
      :func:`subspace_optax.reparameterize`); default every leaf of rank >= 2.
    others: optimizer of the other leaves; None freezes them.
    stacked: leaves of rank > 2 are stacks of matrices.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Examples:
    >>> import jax.numpy as jnp
    >>> import subspace_optax as so
    >>> params = {'w': jnp.diag(jnp.array([3.0, 1.0, 0.1]))}
    >>> tx = so.svfit(1e-2)  # 99 % of Σσ²: rank 2
    >>> tx.init(params).factors['w']['s'].shape
    (2,)

  References:
    Sun et al., 2024, arXiv:2409.05926.
  """
  factorization = svfit_factorization(rank, energy=energy)
  return reparameterize_lib.reparameterize(
      factorization,
      optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps,
                  weight_decay=weight_decay),
      mask=mask, others=others, stacked=stacked)
