"""SALT: scale and shift the top singular values, LoRA on the rest.

Elsayed et al., `SALT: Singular Value Adaptation with Low-Rank Transformation
<https://arxiv.org/abs/2503.16055>`_, 2025.
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
import optax

from subspace_optax._src import arguments
from subspace_optax._src import utils
from subspace_optax._src.finetune import reparameterize as reparameterize_lib


def salt_factorization(
    rank: int | float = 0.1, lora_rank: int = 256, *, init_scale: float = 0.01,
) -> reparameterize_lib.Factorization:
  """SALT's factors ``α, β`` (``r``) and ``X`` (``(k-r) x q``), ``Y``
  (``q x (k-r)``), with the thin SVD ``U, σ, V`` frozen;
  ``reconstruct = U ReLU(M) Vᵀ`` (see :func:`salt`)."""
  if isinstance(lora_rank, bool) or not isinstance(lora_rank, int) or (
      lora_rank <= 0):
    raise ValueError(f'`lora_rank` must be a positive int, got {lora_rank!r}.')
  reparameterize_lib.validate_rank(rank)

  def init(w, key, path):
    u, s, v = reparameterize_lib.thin_svd(w, path)
    k = s.shape[-1]
    r = reparameterize_lib.resolve_rank(rank, k, path)
    rest = k - r
    q = lora_rank
    if q > rest:
      utils.warn_at_caller(
          f'{path}: SALT lora_rank={q} is above the {rest} residual singular '
          f'values of this {w.shape[-2]}x{w.shape[-1]} matrix (rank={r}); '
          f'clamped to {rest}.', utils.RankClampedWarning)
      q = rest
    batch = w.shape[:-2]
    factors = {
        'scale': jnp.ones(batch + (r,), s.dtype),
        'shift': jnp.zeros(batch + (r,), s.dtype),
        'x': init_scale * jax.random.normal(key, batch + (rest, q), s.dtype),
        'y': jnp.zeros(batch + (q, rest), s.dtype),
    }
    return factors, {'u': u, 's': s, 'v': v}

  def reconstruct(factors, frozen):
    return reparameterize_lib.matmul(
        'mk,kl,nl->mn', frozen['u'], jax.nn.relu(spectrum(factors, frozen)),
        frozen['v'])

  def difference(factors, step, frozen):
    new = jax.tree.map(jnp.add, factors, step)
    before, after = spectrum(factors, frozen), spectrum(new, frozen)
    # Where ReLU is the identity on both sides, M' - M from the step of the
    # factors (rounding relative to the update, not to σ).
    linear = jnp.where((before > 0) & (after > 0),
                       spectrum_step(factors, step, frozen),
                       jax.nn.relu(after) - jax.nn.relu(before))
    return reparameterize_lib.matmul('mk,kl,nl->mn', frozen['u'], linear,
                                     frozen['v'])

  return reparameterize_lib.Factorization('salt', init, reconstruct,
                                          difference=difference)


def spectrum(factors, frozen) -> jax.Array:
  """SALT's ``M`` (``k x k``) of one matrix, before the ReLU."""
  s = frozen['s']
  r = factors['scale'].shape[-1]
  top = factors['scale'] * s[:r] + factors['shift']
  rest = jnp.diag(s[r:]) + reparameterize_lib.matmul(
      'aq,qb->ab', factors['x'], factors['y'])
  m = jnp.zeros((s.shape[0], s.shape[0]), s.dtype)
  return m.at[:r, :r].set(jnp.diag(top)).at[r:, r:].set(rest)


def spectrum_step(factors, step, frozen) -> jax.Array:
  """``M(factors + step) - M(factors)`` of one matrix, from the step."""
  s = frozen['s']
  r = factors['scale'].shape[-1]
  top = step['scale'] * s[:r] + step['shift']
  rest = reparameterize_lib.matmul(
      'aq,qb->ab', step['x'], factors['y'] + step['y']
  ) + reparameterize_lib.matmul('aq,qb->ab', factors['x'], step['y'])
  m = jnp.zeros((s.shape[0], s.shape[0]), s.dtype)
  return m.at[:r, :r].set(jnp.diag(top)).at[r:, r:].set(rest)


@arguments.declare_static_args('rank', 'lora_rank', 'mask', 'stacked',
                                'seed')
def salt(
    learning_rate: optax.ScalarOrSchedule = 1e-4,
    rank: int | float = 0.1,
    lora_rank: int = 256,
    *,
    init_scale: float = 0.01,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    mask: Any = None,
    others: Optional[optax.GradientTransformation] = None,
    stacked: bool = True,
    seed: int = 0,
) -> optax.GradientTransformationExtraArgs:
  """SALT: AdamW on a scale/shift of the top singular values and a LoRA
  on the residual spectrum.

  Elsayed et al., `SALT: Singular Value Adaptation with Low-Rank
  Transformation <https://arxiv.org/abs/2503.16055>`_, 2025. With the thin SVD
  ``W = U diag(σ) Vᵀ`` (``k = min(m, n)``), the top ``r`` values and the
  residual ``k - r``:

  .. math::
    W' = U\\,ReLU(M)\\,Vᵀ,\\qquad M = \\begin{pmatrix}
    diag(α ⊙ σ_{1..r} + β) & 0 \\\\ 0 & diag(σ_{r+1..k}) + XY\\end{pmatrix},

  ``ReLU`` applied to every entry of ``M``. Trained per matrix: ``α, β``
  (``2r``), ``X`` (``(k-r) x q``) and ``Y`` (``q x (k-r)``); ``U, σ, V`` are
  frozen (``mk + k + nk`` floats of state). Init ``α = 1, β = 0``,
  ``X ~ N(0, init_scale²)``, ``Y = 0``, so ``W' = W`` (``ReLU(σ) = σ``).
  Exact on the dense model through :func:`subspace_optax.reparameterize`.

  Official settings (`BioMedIA-MBZUAI/SALT
  <https://github.com/BioMedIA-MBZUAI/SALT>`_): ``r`` = 10 % of ``min(m, n)``,
  LoRA rank 256, AdamW at ``1e-4``. Departures: the released code draws both
  ``X`` and ``Y`` from ``N(0, 0.01²)``, so its ``W'`` differs from ``W`` at
  init; here ``Y = 0`` so that training starts at the pre-trained weights. The
  off-diagonal entries of ``M`` then start at exactly 0, where ``ReLU``'s
  derivative is 0 (as in PyTorch): ``X`` gets its first gradient after ``Y``
  has moved. ``lora_rank`` above ``k - r`` is clamped, with a warning naming
  the leaf.

  Args:
    learning_rate: a float or an optax schedule.
    rank: ``r``, an int ``<= min(m, n)`` or a float fraction of it.
    lora_rank: ``q``, clamped to ``k - r``.
    init_scale: standard deviation of ``X`` at init.
    b1: AdamW's first-moment decay.
    b2: AdamW's second-moment decay.
    eps: AdamW's epsilon.
    weight_decay: AdamW's decoupled weight decay, on every factor.
    mask: which leaves to reparameterise (see
      :func:`subspace_optax.reparameterize`).
    others: optimizer of the other leaves; None freezes them.
    stacked: leaves of rank > 2 are stacks of matrices.
    seed: seeds ``X``.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Examples:
    >>> import jax.numpy as jnp
    >>> import subspace_optax as so
    >>> params = {'w': jnp.eye(20, 10)}
    >>> state = so.salt(rank=0.2, lora_rank=4).init(params)
    >>> state.factors['w']['x'].shape
    (8, 4)

  References:
    Elsayed et al., 2025, arXiv:2503.16055.
  """
  factorization = salt_factorization(rank, lora_rank, init_scale=init_scale)
  return reparameterize_lib.reparameterize(
      factorization,
      optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps,
                  weight_decay=weight_decay),
      mask=mask, others=others, stacked=stacked, seed=seed)
