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

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from subspace_optax._src.bases import base as bases_lib
from subspace_optax._src.bases import singular
from subspace_optax._src.pipeline import sharding

_HIGHEST = jax.lax.Precision.HIGHEST
INITIAL_BASES = ('range_finder', 'random', 'svd')
BASIS_OPTIMIZERS = ('adam', 'sgd')


class OnlinePCAState(NamedTuple):
  """State of one matrix's online basis.

  Attributes:
    basis: ``(k, r)`` float32, the basis that projects this step's gradient.
    optimizer_state: the basis optimizer's state (e.g. Adam's moments of ``P``).
    next_basis: with ``lagged=True`` the basis for the next step (the paper's
      ``P_{t+1}``); otherwise ``optax.MaskedNode()``.
  """

  basis: jax.Array
  optimizer_state: optax.OptState
  next_basis: Any


def online_pca_gradient(
    basis: jax.Array, g: jax.Array, orthogonality_weight: float
) -> jax.Array:
  """Closed-form gradient of the online-PCA loss at ``P = basis`` (see module doc).

  A zero gradient gives ``G̃ = 0`` (only the orthogonality term acts).

  Args:
    basis: ``P``, ``(k, r)``.
    g: the gradient ``G``, ``(k, l)`` (normalised here: ``G̃ = G/‖G‖_F``).
    orthogonality_weight: ``λ``.

  Returns:
    ``∇_P L``, the shape of ``basis``.

  Examples:
    >>> import jax.numpy as jnp
    >>> import subspace_optax as so
    >>> p = jnp.eye(4, 2)  # spans the gradient's range: a stationary point
    >>> g = jnp.eye(4, 3) * jnp.array([2.0, 1.0, 0.0])
    >>> so.bases.online_pca_gradient(p, g, 0.1)
    Array([[0., 0.],
           [0., 0.],
           [0., 0.],
           [0., 0.]], dtype=float32)
  """
  g = g.astype(jnp.float32)
  norm = jnp.sqrt(jnp.sum(g * g))
  norm = jnp.where(norm > 0, norm, 1.0)
  # G̃ = G / ‖G‖ enters only through A and B: the products are divided by the
  # norm, not G (a full-size copy).
  a = sharding.einsum('kr,kl->rl', basis, g) / norm
  b = sharding.einsum('kl,rl->kr', g, a) / norm
  gram_a = sharding.einsum('rl,sl->rs', a, a, precision=_HIGHEST)
  gram_p = sharding.einsum('kr,ks->rs', basis, basis, precision=_HIGHEST)
  grad = 2.0 * (
      sharding.einsum('kr,rs->ks', basis, gram_a, precision=_HIGHEST)
      + sharding.einsum('kr,rs->ks', b, gram_p, precision=_HIGHEST) - 2.0 * b)
  if not (isinstance(orthogonality_weight, (int, float))
          and orthogonality_weight == 0):  # a Python 0 skips the term
    eye = jnp.eye(gram_p.shape[0], dtype=gram_p.dtype)
    grad = grad + 4.0 * orthogonality_weight * sharding.einsum(
        'kr,rs->ks', basis, gram_p - eye, precision=_HIGHEST)
  return grad


def _cholesky_qr2(p: jax.Array) -> jax.Array:
  """Orthonormal columns spanning ``p`` by two Cholesky-QR passes (no noise).

  Meant for a nearly orthonormal ``p``; falls back to ``p`` if the Gram matrix
  is numerically singular.
  """
  q = p
  for _ in range(2):
    gram = sharding.einsum('kp,kq->pq', q, q, precision=_HIGHEST)
    q = sharding.einsum('kp,pq->kq', q, bases_lib.inverse_cholesky_factor(gram),
                        precision=_HIGHEST)
  return jnp.where(jnp.all(jnp.isfinite(q)), q, p)


def range_finder(
    g: jax.Array, rank: int, key: jax.Array, power_iterations: int = 1
) -> jax.Array:
  """An orthonormal ``k x rank`` basis of the dominant range of ``g``, SVD-free.

  ``Q = orth(G Ω)`` then ``power_iterations`` rounds of
  ``Q = orth(G orth(GᵀQ))`` (Halko, Martinsson & Tropp, arXiv 0909.4061), with
  Cholesky-QR only: no SVD and no eigendecomposition, in any order of columns.

  Args:
    g: a ``(k, l)`` matrix (``jax.vmap`` it over stacked layers).
    rank: columns of the basis (static).
    key: PRNG key of the Gaussian sketch ``Ω``.
    power_iterations: subspace iterations.

  Returns:
    A ``(k, rank)`` matrix with orthonormal columns.

  Examples:
    >>> import jax
    >>> import jax.numpy as jnp
    >>> import subspace_optax as so
    >>> g = jnp.diag(jnp.array([3.0, 2.0, 0.0, 0.0]))  # rank 2
    >>> q = so.bases.range_finder(g, 2, jax.random.key(0))
    >>> bool(jnp.allclose(q @ (q.T @ g), g, atol=1e-3))  # spans its range
    True
  """
  g = g.astype(jnp.float32)
  keys = jax.random.split(key, 2 + 2 * power_iterations)
  sketch = bases_lib.normal_matrix(keys[0], (g.shape[1], rank))
  q = bases_lib.orthonormalize(
      sharding.einsum('kl,lr->kr', g, sketch, precision=_HIGHEST), keys[1])
  for i in range(power_iterations):
    z = bases_lib.orthonormalize(
        sharding.einsum('kl,kr->lr', g, q, precision=_HIGHEST), keys[2 + 2 * i])
    q = bases_lib.orthonormalize(
        sharding.einsum('kl,lr->kr', g, z, precision=_HIGHEST), keys[3 + 2 * i])
  return q


def _initial_basis(kind: str, g: jax.Array, old: jax.Array, key: jax.Array):
  rank = old.shape[1]
  if kind == 'range_finder':
    q = range_finder(g, rank, key)
  elif kind == 'random':
    draw, noise = jax.random.split(key)
    q = bases_lib.orthonormalize(sharding.reshard_like(
        bases_lib.normal_matrix(draw, old.shape), old), noise)
  else:
    u, _ = singular.singular_vectors(
        sharding.replicate_matrix(g.astype(jnp.float32)))
    q = u[:, :rank]
  return sharding.reshard_like(q.astype(jnp.float32), old)


def basis_optimizer(
    optimizer: str | optax.GradientTransformation,
    learning_rate: optax.ScalarOrSchedule,
    weight_decay: float = 0.0,
) -> optax.GradientTransformation:
  """The optimizer of the basis: ``'adam'`` (AdamW), ``'sgd'`` or any optax one.

  ``'adam'`` is ``optax.adamw(learning_rate, weight_decay=weight_decay)``
  (the reference's ``torch.optim.AdamW``; its default weight decay is 0.01);
  ``'sgd'`` is plain gradient descent with decoupled weight decay.
  """
  if isinstance(optimizer, optax.GradientTransformation):
    return optimizer
  if optimizer == 'adam':
    return optax.adamw(learning_rate, weight_decay=weight_decay)
  if optimizer == 'sgd':
    return optax.chain(
        optax.add_decayed_weights(weight_decay),
        optax.scale_by_learning_rate(learning_rate))
  raise ValueError(
      f'`optimizer` must be one of {BASIS_OPTIMIZERS} or an optax '
      f'GradientTransformation, got {optimizer!r}.')


def online_pca(
    learning_rate: optax.ScalarOrSchedule = 0.005,
    orthogonality_weight: float = 0.1,
    optimizer: str | optax.GradientTransformation = 'adam',
    reorthonormalize: bool = False,
    initial: str = 'range_finder',
    lagged: bool = False,
    weight_decay: float = 0.0,
) -> bases_lib.BasisMethod:
  """A basis tracked by one optimizer step per update on the online-PCA loss.

  Liang et al., `Memory-Efficient LLM Training with Online Subspace Descent
  <https://arxiv.org/abs/2408.12857>`_, NeurIPS 2024. Every update:

  .. math::
    P \\leftarrow P + \\mathrm{opt}(∇L(P)),\\qquad
    L(P) = \\|PPᵀG̃ - G̃\\|_F^2 + λ\\|PᵀP - I\\|_F^2,\\quad G̃ = G/\\|G\\|_F,

  with the closed-form gradient :func:`online_pca_gradient` (two ``k x l x r``
  products, no SVD). The basis optimizer's state lives in the basis state. At
  update 0 the basis is initialised from the first gradient (``initial``), then
  only online steps run (the pipeline selects the two with one ``lax.cond`` on
  the step count, so the steady-state step contains no SVD unless
  ``initial='svd'`` puts one in the never-taken branch). If the first gradient
  is not finite the placeholder ``I[:, :r]`` is kept and the online steps start
  from it.

  Paper vs reference code (kyleliang919/Online-Subspace-Descent): the paper
  uses ``λ = 0.1``; the reference has no orthogonality term and never
  re-orthonormalizes (``orthogonality_weight=0.0``), initialises ``P`` by an
  SVD of the first gradient (``initial='svd'``), uses AdamW with torch's default
  weight decay 0.01 on ``P`` (``weight_decay=0.01``) at learning rate
  ``1/update_proj_gap`` scaled by the weight schedule (pass a schedule), and
  projects ``G_t`` with ``P_t`` before stepping ``P`` (``lagged=True``); its
  basis lies on the smaller side (``side='reference'`` in the preset).

  Args:
    learning_rate: the basis optimizer's learning rate (float or schedule);
      the reference uses ``1/T`` (0.005 for ``T = 200``).
    orthogonality_weight: ``λ`` of the soft orthogonality penalty (paper 0.1;
      reference 0).
    optimizer: ``'adam'`` (AdamW), ``'sgd'``, or any optax transform (then
      ``learning_rate`` and ``weight_decay`` are ignored).
    reorthonormalize: after each step, replace ``P`` by an orthonormal basis of
      its span (two Cholesky-QR passes, ``O(k r²)``). The span, hence the
      projection, is unchanged; only the conditioning is.
    initial: the basis at update 0: ``'range_finder'`` (default; an SVD-free
      randomized range finder of the first gradient, one power iteration),
      ``'random'`` (orthonormal Gaussian, gradient-free) or ``'svd'`` (the
      reference: top singular vectors of the first gradient).
    lagged: False (default) steps ``P`` with ``G_t`` and projects ``G_t`` with
      the result, so the basis used has seen the current gradient and no second
      basis is stored. True follows the paper's order (project ``G_t`` with
      ``P_t``, then ``P_{t+1} = step(P_t, G_t)``), storing ``P_{t+1}`` too
      (``+ k r`` floats). At update 0 the initial basis is used and not stepped.
    weight_decay: decoupled weight decay on ``P`` for the built-in optimizers.

  Returns:
    A :class:`BasisMethod`, for ``basis=`` of :func:`subspace_optax.low_rank`
    and the presets. Its basis moves at every update (``every_step``).

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import subspace_optax as so
    >>> tx = so.low_rank(optax.scale_by_adam(), rank=2,
    ...                  basis=so.bases.online_pca())
    >>> params = {'w': jnp.ones((8, 6))}
    >>> updates, state = tx.update(params, tx.init(params))
    >>> so.bases.online_pca().name
    'online_pca'
  """
  if initial not in INITIAL_BASES:
    raise ValueError(f'`initial` must be one of {INITIAL_BASES}, got {initial!r}.')
  if isinstance(orthogonality_weight, (int, float)) and orthogonality_weight < 0:
    raise ValueError('`orthogonality_weight` must be >= 0.')
  tx = basis_optimizer(optimizer, learning_rate, weight_decay)

  def init(k, l, rank):
    basis = bases_lib.dense_init(k, l, rank)
    return OnlinePCAState(
        basis=basis, optimizer_state=tx.init(jnp.zeros((k, rank), jnp.float32)),
        next_basis=basis if lagged else optax.MaskedNode())

  def first_refresh(g, old, key, align):
    del align
    basis = _initial_basis(initial, g, old.basis, key)
    return OnlinePCAState(
        basis=basis, optimizer_state=tx.init(basis),
        next_basis=basis if lagged else optax.MaskedNode())

  def refresh(g, old, key, align):
    del key, align
    current = old.next_basis if lagged else old.basis
    gradient = online_pca_gradient(current, g, orthogonality_weight)
    step, optimizer_state = tx.update(gradient, old.optimizer_state, current)
    moved = current + step.astype(current.dtype)
    if reorthonormalize:
      moved = _cholesky_qr2(moved)
    moved = sharding.reshard_like(moved, current)
    if lagged:
      return OnlinePCAState(current, optimizer_state, moved)
    return OnlinePCAState(moved, optimizer_state, optax.MaskedNode())

  def project(g, state):
    return bases_lib.dense_project(g, state.basis)

  def unproject(c, state):
    return bases_lib.dense_unproject(c, state.basis)

  def transition(old, new):
    return bases_lib.dense_transition(old.basis, new.basis)

  # Only an SVD needs a finite gradient (LAPACK's never returns on a matrix
  # mixing Inf and finite entries); the online step and the other initial
  # bases give a non-finite basis for a non-finite gradient, and the stages
  # drop it, without the finite copy of the gradient.
  return bases_lib.BasisMethod(
      'online_pca', init, refresh, project, unproject, transition,
      every_step=True, first_refresh=first_refresh,
      handles_non_finite=initial != 'svd')


