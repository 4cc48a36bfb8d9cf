"""Online Subspace Descent: a basis moved every step by online PCA, no SVD.

Liang, Liu, Chen & Liu, `Memory-Efficient LLM Training with Online Subspace
Descent <https://arxiv.org/abs/2408.12857>`_, NeurIPS 2024.

Instead of recomputing an SVD every ``T`` steps, the basis ``P`` (``k x r``)
takes one optimizer step per update on the online-PCA loss of the normalized
gradient ``G̃ = G / ‖G‖_F``:

.. math::
  L(P) = \\|P Pᵀ G̃ - G̃\\|_F^2 + λ \\|PᵀP - I\\|_F^2,

whose gradient has the closed form (``E = PPᵀG̃ - G̃``, ``A = PᵀG̃``,
``B = G̃Aᵀ``, ``S = PᵀP``)

.. math::
  ∇L = 2(E G̃ᵀ P + G̃ Eᵀ P) + 4λ P (S - I) = 2(P A Aᵀ + B S - 2B) + 4λ P (S - I),

two ``k x l x r`` products and ``O(k r²)`` work: no SVD, no ``k x l``
temporary. For ``PᵀP = I`` it is Oja's rule ``-2(I - PPᵀ) G̃G̃ᵀ P``.
"""

from __future__ import annotations

from typing import Any, Optional

import optax

from subspace_optax._src import arguments
from subspace_optax._src.bases import online_pca as online_pca_lib
from subspace_optax._src.pipeline import low_rank as low_rank_lib
from subspace_optax._src.pipeline import precision as precision_lib
from subspace_optax._src.transforms import adam
from subspace_optax._src.transforms import lion

INNER_OPTIMIZERS = ('adam', 'lion')


@arguments.declare_static_args('rank', 'mask', 'dimension_numbers', 'mu_dtype')
def online_subspace_descent(
    learning_rate: optax.ScalarOrSchedule,
    rank: int | float = 128,
    *,
    side: str = 'reference',
    scale: float = 0.25,
    inner: str = 'adam',
    sign_after_unproject: bool = False,
    basis_learning_rate: optax.ScalarOrSchedule = 0.005,
    basis_optimizer: str | optax.GradientTransformation = 'adam',
    orthogonality_weight: float = 0.1,
    reorthonormalize: bool = False,
    initial: str = 'range_finder',
    lagged: bool = False,
    basis_weight_decay: float = 0.0,
    b1: float = 0.9,
    b2: Optional[float] = None,
    eps: float = 1e-6,
    weight_decay: float = 0.0,
    mask: Optional[Any] = None,
    dimension_numbers: Any = None,
    seed: int = 0,
    mu_dtype: Optional[Any] = None,
) -> optax.GradientTransformationExtraArgs:
  """Online Subspace Descent with an Adam or Lion inner optimizer.

  Liang et al., `Memory-Efficient LLM Training with Online Subspace Descent
  <https://arxiv.org/abs/2408.12857>`_, NeurIPS 2024. Per matrix, every update:

  .. math::
    P \\leftarrow P + \\mathrm{opt}_P(∇_P \\|PPᵀG̃ - G̃\\|^2 + λ\\|PᵀP - I\\|^2),\\quad
    C = PᵀG,\\quad N = inner(C),\\quad W \\leftarrow W - η(α P N + λ_W W),

  with ``inner`` Adam (PyTorch ``ε`` placement, as the reference's AdamW) or
  Lion (``sign`` of the interpolated momentum, taken in the subspace, so the
  update stays in ``span(P)``). ``sign_after_unproject=True`` reproduces the
  reference Lion, ``sign(P (β_1 m + (1-β_1) C))``: a dense full-rank sign step
  (then ``scale`` has no effect). Basis options: :func:`online_pca`, whose
  docstring lists the paper-vs-reference choices. Defaults: the reference
  recipe's ``α = 0.25`` and basis learning rate ``1/200`` with AdamW on ``P``.
  State size: :func:`subspace_optax.state_sizes.online_subspace_descent_bytes`.

  Args:
    learning_rate: the weights' learning rate (float or schedule).
    rank: subspace rank (int, clamped per matrix) or a fraction of ``min(m, n)``.
    side: see :func:`subspace_optax.low_rank`.
    scale: ``α``, multiplies the unprojected update.
    inner: ``'adam'`` or ``'lion'``.
    sign_after_unproject: Lion only: take the sign after unprojection
      (reference).
    basis_learning_rate: learning rate of ``P``'s optimizer (float or schedule).
    basis_optimizer: ``'adam'`` (AdamW), ``'sgd'``, or an optax transform.
    orthogonality_weight: ``λ`` (paper 0.1, reference 0).
    reorthonormalize: re-orthonormalize ``P`` after each step.
    initial: ``'range_finder'``, ``'random'`` or ``'svd'`` (reference).
    lagged: project ``G_t`` with ``P_t`` (paper order; stores ``P_{t+1}`` too).
    basis_weight_decay: decoupled weight decay on ``P`` (reference 0.01).
    b1, b2: the inner optimizer's betas; ``b2`` defaults to 0.999 (Adam) or
      0.99 (Lion).
    eps: Adam's ``ε`` (PyTorch placement).
    weight_decay: decoupled weight decay ``λ_W`` on the weights.
    mask: optax mask for the weight decay.
    dimension_numbers: which leaves to project; see :func:`subspace_optax.low_rank`.
    seed: seed of the random initial basis.
    mu_dtype: dtype in which the inner optimizer's first moment (Adam's or
      Lion's momentum) is stored (as in ``optax.adamw``), e.g.
      ``jnp.bfloat16``; computed in float32. None: float32. Adam's second
      moment and the basis optimizer's state stay float32.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; its ``update`` needs
    ``params`` when ``weight_decay`` is used.

  Examples:
    >>> import jax.numpy as jnp
    >>> import subspace_optax as so
    >>> params = {'w': jnp.ones((8, 6))}
    >>> tx = so.online_subspace_descent(
    ...     learning_rate=1e-3, rank=2, inner='lion')
    >>> state = tx.init(params)
    >>> updates, state = tx.update(params, state, params)
    >>> so.state_bytes(state) == so.state_sizes.online_subspace_descent_bytes(
    ...     params, rank=2, inner='lion')
    True
  """
  if inner not in INNER_OPTIMIZERS:
    raise ValueError(f'`inner` must be one of {INNER_OPTIMIZERS}, got {inner!r}.')
  if not isinstance(basis_optimizer, optax.GradientTransformation) and (
      basis_optimizer not in online_pca_lib.BASIS_OPTIMIZERS):
    raise ValueError(
        f'`basis_optimizer` must be one of {online_pca_lib.BASIS_OPTIMIZERS} or an optax '
        f'GradientTransformation, got {basis_optimizer!r}.')
  if sign_after_unproject and inner != 'lion':
    raise ValueError('`sign_after_unproject` applies to inner="lion" only.')
  mu_dtype = precision_lib.float_dtype(mu_dtype, 'mu_dtype')
  if inner == 'adam':
    inner_tx = adam.scale_by_torch_adam(
        b1, 0.999 if b2 is None else b2, eps, mu_dtype=mu_dtype)
  elif sign_after_unproject:
    inner_tx = lion.scale_by_lion_momentum(
        b1, 0.99 if b2 is None else b2, mu_dtype=mu_dtype)
  else:
    inner_tx = optax.scale_by_lion(
        b1, 0.99 if b2 is None else b2, mu_dtype=mu_dtype)
  basis = online_pca_lib.online_pca(
      basis_learning_rate, orthogonality_weight, basis_optimizer,
      reorthonormalize, initial, lagged, basis_weight_decay)
  return optax.chain(
      low_rank_lib.low_rank(
          inner_tx, rank=rank, basis=basis, side=side, on_refresh='keep',
          align_signs=False, scale=scale,
          dimension_numbers=dimension_numbers, seed=seed),
      optax.scale_by_sign() if sign_after_unproject else optax.identity(),
      optax.add_decayed_weights(weight_decay, mask),
      optax.scale_by_learning_rate(learning_rate),
  )
