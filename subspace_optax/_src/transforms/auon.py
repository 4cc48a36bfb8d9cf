"""AuON: Frobenius-normalized Nesterov momentum with a cosh-RMS brake.

Maity, `AuON: A Linear-time Alternative to Semi-Orthogonal Momentum Updates
<https://arxiv.org/abs/2509.24320>`_, 2025.

What the method computes, honestly stated: with ``X = M̂/‖M̂‖_F`` the brake is
``√mean(cosh²(γX)) ≈ 1 + γ²/(2N)`` for ``N`` entries (``Σ X² = 1``), so for
real layer sizes it is ``1 + O(1e-4)`` and AuON is, to that accuracy,
normalized Nesterov momentum with ``‖U‖_F ≈ 1`` (``√min(m, n)`` times smaller
than Muon's orthogonalized step at equal learning rate). The hybrid variant
runs Newton–Schulz steps on ``X`` before the brake.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from subspace_optax._src.pipeline import layout as layout_lib
from subspace_optax._src.pipeline import per_matrix
from subspace_optax._src.transforms import adam

NEWTON_SCHULZ_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
_HIGHEST = jax.lax.Precision.HIGHEST


class ScaleByAuonState(NamedTuple):
  mu: optax.Updates  # momentum, like the params


def cosh_brake(x: jax.Array, gamma: float = 1.0) -> jax.Array:
  """``√mean(cosh(γ x)²)`` over the last two axes (per matrix)."""
  c = jnp.cosh(gamma * x.astype(jnp.float32))
  return jnp.sqrt(jnp.mean(c * c, axis=(-2, -1), keepdims=True))


def newton_schulz_step(
    x: jax.Array, coefficients: tuple[float, float, float] = NEWTON_SCHULZ_COEFFICIENTS
) -> jax.Array:
  """One quintic Newton–Schulz step ``aX + b(XXᵀ)X + c(XXᵀ)²X`` per matrix.

  Keller Jordan's Muon coefficients ``(3.4445, -4.7750, 2.0315)``; the Gram
  matrix is taken on the smaller side (tall matrices are transposed).
  """
  a, b, c = coefficients
  tall = x.shape[-2] > x.shape[-1]
  if tall:
    x = jnp.swapaxes(x, -1, -2)
  gram = jnp.matmul(x, jnp.swapaxes(x, -1, -2), precision=_HIGHEST)
  poly = b * gram + c * jnp.matmul(gram, gram, precision=_HIGHEST)
  x = a * x + jnp.matmul(poly, x, precision=_HIGHEST)
  return jnp.swapaxes(x, -1, -2) if tall else x


def _as_matrices(x: jax.Array) -> jax.Array:
  """Leaves of rank >= 2: matrices over the last two axes; others: one row."""
  return x if x.ndim >= 2 else x.reshape(1, -1)


def scale_by_auon(
    beta: float = 0.95,
    nesterov: bool = True,
    newton_schulz_steps: int = 0,
    gamma: float = 1.0,
    eps: float = 1e-7,
    normalize: bool = True,
    mu_dtype: Optional[Any] = None,
) -> optax.GradientTransformation:
  """AuON's direction: normalized (Nesterov) momentum divided by a cosh-RMS brake.

  Maity, `AuON <https://arxiv.org/abs/2509.24320>`_, 2025 (paper-era code). Per
  matrix (last two axes; leading axes are batch axes; leaves of rank < 2 are
  one row):

  .. math::
    m \\leftarrow β m + (1-β) g,\\quad M̂ = β m + (1-β) g\\ (\\text{Nesterov})
    \\text{ or } m,\\quad X = \\frac{M̂}{\\|M̂\\|_F + ε},\\quad
    X \\leftarrow NS^{s}(X),\\quad
    U = \\frac{X}{\\sqrt{\\mathrm{mean}\\cosh^2(γX)} + 10^{-8}}.

  With ``s = 0`` (AuON) ``‖U‖_F = 1/brake ≈ 1 - γ²/(2N)``. ``s = 1`` is the
  paper's Hybrid-AuON (the packaged code defaults to 5 steps). The packaged
  ``AuON`` class instead divides the *unnormalized* ``M̂`` by the brake of
  ``γ X`` with ``γ = 1.5``: ``normalize=False, gamma=1.5``.

  Args:
    beta: momentum decay.
    nesterov: use the Nesterov look-ahead ``β m + (1-β) g``.
    newton_schulz_steps: Newton–Schulz steps after normalization (hybrid).
    gamma: ``γ`` inside the brake (paper code 1, packaged code 1.5).
    eps: added to ``‖M̂‖_F``.
    normalize: output ``X``-based (paper) or ``M̂``-based (packaged) steps.
    mu_dtype: dtype of the momentum (default: the params').

  Returns:
    An ``optax.GradientTransformation`` whose state is a
    :class:`ScaleByAuonState`.

  Examples:
    >>> import jax.numpy as jnp
    >>> import subspace_optax as so
    >>> tx = so.scale_by_auon()
    >>> params = {'w': jnp.ones((8, 6))}
    >>> updates, state = tx.update(params, tx.init(params))
    >>> float(jnp.linalg.norm(updates['w'])) < 1.0  # unit norm, then braked
    True
  """
  if isinstance(newton_schulz_steps, bool) or not isinstance(
      newton_schulz_steps, int) or newton_schulz_steps < 0:
    raise ValueError('`newton_schulz_steps` must be a Python int >= 0.')

  def direction(m, fold_scale: bool):
    shape, dtype = m.shape, m.dtype
    m = _as_matrices(m.astype(jnp.float32))
    norm = jnp.sqrt(jnp.sum(m * m, axis=(-2, -1), keepdims=True))
    if fold_scale and not newton_schulz_steps:
      # X = M̂ / (‖M̂‖ + ε) is not formed: its scale enters the brake's
      # reduction and the step's factor, so XLA:CPU holds M̂ only (one
      # matrix, where X took a second). XLA:GPU fuses X as written and
      # holds neither.
      scale = 1.0 / (norm + eps)
      brake = cosh_brake(m * scale, gamma)
      out = m * ((scale if normalize else 1.0) / (brake + 1e-8))
    else:
      x = m / (norm + eps)
      for _ in range(newton_schulz_steps):
        x = newton_schulz_step(x)
      out = (x if normalize else m) / (cosh_brake(x, gamma) + 1e-8)
    return out.reshape(shape).astype(dtype)

  def init_fn(params):
    return ScaleByAuonState(optax.tree.zeros_like(params, dtype=mu_dtype))

  def step(mu, g, fold_scale: bool):
    # The look-ahead is not stored: float32, whatever the momentum's dtype.
    looked = adam.first_moment(g, mu, beta) if nesterov else mu
    return direction(looked, fold_scale).astype(jnp.result_type(g))

  def leaf_step(mu, g):
    # On the CPU a stack of matrices one matrix at a time, each step written
    # in place of its gradient: the float32 temporaries are one matrix's.
    # GPUs fuse the vectorised step.
    batch_axes = max(g.ndim - 2, 0)
    return per_matrix.on_platform(
        mu, g,
        cpu=lambda mu, g: per_matrix.over_matrices(
            functools.partial(step, fold_scale=True), batch_axes, mu, g,
            into=g),
        gpu=layout_lib.batched(functools.partial(step, fold_scale=False),
                               batch_axes))

  def update_fn(updates, state, params=None):
    del params
    mu = adam.update_first_moment(updates, state.mu, beta)
    return jax.tree.map(leaf_step, mu, updates), ScaleByAuonState(mu)

  return optax.GradientTransformation(init_fn, update_fn)


def scale_by_aspect_ratio() -> optax.GradientTransformation:
  """Multiply each matrix update by ``√max(1, fan_out / fan_in)``.

  For flax kernels ``(..., in, out)`` (the last two axes); AuON's and Muon's
  width scaling. Leaves of rank < 2 are unchanged.

  Returns:
    An ``optax.GradientTransformation`` (state-free).

  Examples:
    >>> import jax.numpy as jnp
    >>> import subspace_optax as so
    >>> tx = so.scale_by_aspect_ratio()
    >>> updates, _ = tx.update({'w': jnp.ones((2, 8))}, tx.init(None))
    >>> float(updates['w'][0, 0])  # sqrt(8 / 2)
    2.0
  """

  def update_fn(updates, state, params=None):
    del params

    def scale(u):
      if u.ndim < 2:
        return u
      return u * math.sqrt(max(1.0, u.shape[-1] / u.shape[-2]))

    return jax.tree.map(scale, updates), state

  return optax.GradientTransformation(
      lambda params: optax.EmptyState(), update_fn)


