"""One Adam core: the moment updates and bias corrections every variant shares.

The Adam-like transforms of the library (:func:`scale_by_torch_adam`,
:func:`~subspace_optax.scale_by_adam_moments`,
:func:`~subspace_optax.scale_by_resettable_adam`,
:func:`~subspace_optax.scale_by_torch_nesterov_adam`,
:func:`~subspace_optax.scale_by_lion_momentum`) differ only in where ``ε`` sits
and how the bias correction is counted. They share :func:`init_moment`,
:func:`update_moments` (built on ``optax.tree``) and :func:`one_minus_power`:

.. math::
  m_t = β_1 m_{t-1} + (1-β_1) g_t,\\qquad v_t = β_2 v_{t-1} + (1-β_2) g_t^2.

Moments are updated in float32 whatever the gradient's dtype, and start as
``optax.tree.zeros_like`` of the parameters, so they keep each leaf's sharding
(the same sharding before and after an update: one compilation).
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from subspace_optax._src.pipeline import precision


def init_moment(params: optax.Params, dtype: Optional[Any] = None
                ) -> optax.Updates:
  """A zero moment like ``params`` (same shapes and shardings), in ``dtype``
  (None: float32)."""
  return optax.tree.zeros_like(
      params, dtype=jnp.float32 if dtype is None else dtype)


def _float32(updates: optax.Updates) -> optax.Updates:
  return jax.tree.map(lambda g: g.astype(jnp.float32), updates)


def stored_like(new: optax.Updates, old: optax.Updates) -> optax.Updates:
  """``new`` in the dtypes of ``old`` (a moment computed in float32, stored)."""
  return jax.tree.map(lambda n, o: n.astype(o.dtype), new, old)


def first_moment(
    updates: optax.Updates, moment: optax.Updates, decay: float
) -> optax.Updates:
  """``m ← decay·m + (1-decay)·g``, in float32 whatever ``m``'s dtype."""
  return optax.tree.update_moment(
      _float32(updates), _float32(moment), decay, 1)


def update_first_moment(
    updates: optax.Updates, moment: optax.Updates, decay: float
) -> optax.Updates:
  """``m ← decay·m + (1-decay)·g``, computed in float32, stored in ``m``'s dtype."""
  return stored_like(first_moment(updates, moment, decay), moment)


def update_second_moment(
    updates: optax.Updates, moment: optax.Updates, decay: float
) -> optax.Updates:
  """``v ← decay·v + (1-decay)·|g|²``, computed in float32, in ``v``'s dtype."""
  return stored_like(optax.tree.update_moment_per_elem_norm(
      _float32(updates), _float32(moment), decay, 2), moment)


def update_moments(
    updates: optax.Updates, mu: optax.Updates, nu: optax.Updates,
    b1: float, b2: float,
) -> tuple[optax.Updates, optax.Updates]:
  """Adam's moments ``(m, v)`` after the gradient ``updates``."""
  return (update_first_moment(updates, mu, b1),
          update_second_moment(updates, nu, b2))


def moments_for_step(
    updates: optax.Updates, mu: optax.Updates, nu: optax.Updates,
    b1: float, b2: float,
) -> tuple[optax.Updates, optax.Updates]:
  """Adam's moments ``(m, v)`` after ``updates``: ``m`` in float32 (the step
  uses it before it is rounded to a ``mu_dtype``, as ``optax.scale_by_adam``),
  ``v`` in ``nu``'s dtype. Store ``m`` with :func:`stored_like`."""
  return first_moment(updates, mu, b1), update_second_moment(updates, nu, b2)


def one_minus_power(decay: float, count: jax.Array) -> jax.Array:
  """``1 - decayᵗ`` (float32) for ``t = count``, accurate for ``decay`` near 1.

  Computed as ``-expm1(t log1p(-(1 - decay)))`` with ``1 - decay`` taken in
  Python double precision: ``float32(0.999)`` is off by 1.3e-8, which would
  put a 1e-5 relative error into ``1 - β₂`` at ``t = 1`` (``optax``'s
  ``1 - decay**count`` in float32 has that error).
  """
  t = count.astype(jnp.float32)
  return -jnp.expm1(t * jnp.log1p(-(1.0 - decay)))


def bias_correction(count: jax.Array, b1: float, b2: float) -> jax.Array:
  """Adam's step-size factor ``sqrt(1 - β₂ᵗ) / (1 - β₁ᵗ)`` at update ``count``."""
  return jnp.sqrt(one_minus_power(b2, count)) / one_minus_power(b1, count)


def _like(u: jax.Array, g: jax.Array) -> jax.Array:
  return u.astype(jnp.result_type(g))


class ScaleByTorchAdamState(NamedTuple):
  count: jax.Array  # int32 scalar
  mu: optax.Updates  # first moment, like the updates
  nu: optax.Updates  # second moment, like the updates


def scale_by_torch_adam(
    b1: float = 0.9, b2: float = 0.999, eps: float = 1e-6, *,
    mu_dtype: Optional[Any] = None,
) -> optax.GradientTransformation:
  """Adam as GaLore, Fira and APOLLO compute it (``eps`` inside the bias correction).

  .. math::
    m_t = β_1 m_{t-1} + (1-β_1) g,\\quad v_t = β_2 v_{t-1} + (1-β_2) g^2,\\quad
    u_t = \\frac{\\sqrt{1-β_2^t}}{1-β_1^t}\\,\\frac{m_t}{\\sqrt{v_t} + ε}.

  ``optax.scale_by_adam`` adds ``ε`` after the bias correction, i.e. it uses
  ``ε·sqrt(1-β_2^t)`` here; the two agree up to that ``ε`` term.

  As in ``optax.scale_by_adam``, ``mu_dtype`` (None: float32) is the dtype in
  which the first moment is stored; it is computed, and the step taken, in
  float32. The second moment stays float32.

  Args:
    b1: decay of the first moment ``β_1``.
    b2: decay of the second moment ``β_2``.
    eps: ``ε``, added to ``sqrt(v)`` before the bias correction.
    mu_dtype: dtype in which the first moment is stored; None: float32.

  Returns:
    An ``optax.GradientTransformation`` whose state is a
    :class:`ScaleByTorchAdamState`.

  Examples:
    >>> import jax.numpy as jnp
    >>> import subspace_optax as so
    >>> tx = so.transforms.scale_by_torch_adam()
    >>> params = jnp.zeros(2)
    >>> updates, state = tx.update(jnp.array([1.0, -2.0]), tx.init(params))
    >>> updates
    Array([ 0.999..., -0.999...], dtype=float32)

  References:
    Kingma & Ba, `Adam <https://arxiv.org/abs/1412.6980>`_, 2014 (Algorithm 1,
    "efficient version" in §2).
  """

  mu_dtype = precision.float_dtype(mu_dtype, 'mu_dtype')

  def init_fn(params):
    return ScaleByTorchAdamState(
        jnp.zeros([], jnp.int32), init_moment(params, mu_dtype),
        init_moment(params))

  def update_fn(updates, state, params=None):
    del params
    count = optax.safe_increment(state.count)
    mu, nu = moments_for_step(updates, state.mu, state.nu, b1, b2)
    step = bias_correction(count, b1, b2)
    out = jax.tree.map(
        lambda m, v, g: _like(step * m / (jnp.sqrt(v) + eps), g),
        mu, nu, updates)
    return out, ScaleByTorchAdamState(count, stored_like(mu, state.mu), nu)

  return optax.GradientTransformation(init_fn, update_fn)


# ------------------------------------------- Adam split around a projection
# Adam split in two: the moment ratio and the bias-corrected step size.
#
# Fira and APOLLO (like GaLore's PyTorch AdamW) compute ``m / (sqrt(v) + ε)``
# from *uncorrected* moments, build their scale factors from that ratio, and
# only then multiply the whole update by Adam's bias correction
# ``sqrt(1 - β₂ᵗ) / (1 - β₁ᵗ)``. Splitting Adam into these two transforms puts
# the bias correction after the subspace pipeline, so such methods see exactly
# the reference's quantities:
#
# .. math::
#   chain(scale\_by\_adam\_moments,\ scale\_by\_bias\_correction)
#   = scale\_by\_torch\_adam.


class ScaleByAdamMomentsState(NamedTuple):
  mu: optax.Updates  # first moment (uncorrected), like the updates
  nu: optax.Updates  # second moment (uncorrected), like the updates


class ScaleByBiasCorrectionState(NamedTuple):
  count: jax.Array  # int32 scalar


def scale_by_adam_moments(
    b1: float = 0.9, b2: float = 0.999, eps: float = 1e-6, *,
    mu_dtype: Optional[Any] = None,
) -> optax.GradientTransformation:
  """Adam's ratio of uncorrected moments, ``m / (sqrt(v) + ε)``.

  .. math::
    m_t = β_1 m_{t-1} + (1-β_1) g,\\quad v_t = β_2 v_{t-1} + (1-β_2) g^2,\\quad
    u_t = \\frac{m_t}{\\sqrt{v_t} + ε}.

  Follow it (anywhere later in the chain) by :func:`scale_by_bias_correction`
  to get Adam (Kingma & Ba, `Adam <https://arxiv.org/abs/1412.6980>`_, 2014,
  Algorithm 1 in its "efficient" form, as PyTorch computes it). The state has
  no step count, so the moments can sit inside a subspace pipeline.
  ``mu_dtype`` (None: float32) stores the first moment as in
  ``optax.scale_by_adam``: computed, and the step taken, in float32.

  Args:
    b1: decay of the first moment ``β_1``.
    b2: decay of the second moment ``β_2``.
    eps: ``ε``, added to ``sqrt(v)``.
    mu_dtype: dtype in which the first moment is stored; None: float32.

  Returns:
    An ``optax.GradientTransformation`` whose state is a
    :class:`ScaleByAdamMomentsState` (no count).

  Examples:
    >>> import jax.numpy as jnp
    >>> import subspace_optax as so
    >>> tx = so.transforms.scale_by_adam_moments()
    >>> params = jnp.zeros(2)
    >>> updates, state = tx.update(jnp.array([1.0, -2.0]), tx.init(params))
    >>> updates
    Array([ 3.16..., -3.16...], dtype=float32)
  """
  mu_dtype = precision.float_dtype(mu_dtype, 'mu_dtype')

  def init_fn(params):
    return ScaleByAdamMomentsState(
        init_moment(params, mu_dtype), init_moment(params))

  def update_fn(updates, state, params=None):
    del params
    mu, nu = moments_for_step(updates, state.mu, state.nu, b1, b2)
    out = jax.tree.map(
        lambda m, v, g: (m / (jnp.sqrt(v) + eps)).astype(jnp.result_type(g)),
        mu, nu, updates)
    return out, ScaleByAdamMomentsState(stored_like(mu, state.mu), nu)

  return optax.GradientTransformation(init_fn, update_fn)


def scale_by_bias_correction(
    b1: float = 0.9, b2: float = 0.999
) -> optax.GradientTransformation:
  """Multiply the updates by Adam's bias correction ``sqrt(1-β₂ᵗ) / (1-β₁ᵗ)``.

  ``t`` counts the updates of this transform (1 at the first). See
  :func:`scale_by_adam_moments`.

  Args:
    b1: decay of the first moment ``β_1``.
    b2: decay of the second moment ``β_2``.

  Returns:
    An ``optax.GradientTransformation`` whose state is a
    :class:`ScaleByBiasCorrectionState`.

  Examples:
    >>> import jax.numpy as jnp
    >>> import subspace_optax as so
    >>> tx = so.transforms.scale_by_bias_correction(b1=0.5, b2=0.75)
    >>> params = jnp.zeros(2)
    >>> updates, state = tx.update(jnp.array([1.0, -2.0]), tx.init(params))
    >>> updates
    Array([ 1., -2.], dtype=float32)
  """

  def init_fn(params):
    del params
    return ScaleByBiasCorrectionState(jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params=None):
    del params
    count = optax.safe_increment(state.count)
    step = bias_correction(count, b1, b2)
    return jax.tree.map(
        lambda u: (step * u).astype(jnp.result_type(u)), updates
    ), ScaleByBiasCorrectionState(count)

  return optax.GradientTransformation(init_fn, update_fn)


# ------------------------------------------------ FRUGAL's restartable Adam


class ScaleByResettableAdamState(NamedTuple):
  count: optax.Updates  # int32 scalar per leaf: updates since the last reset
  mu: optax.Updates
  nu: optax.Updates


def scale_by_resettable_adam(
    b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
    eps_root: float = 0.0, *, mu_dtype: Optional[Any] = None,
) -> optax.GradientTransformation:
  """``optax.scale_by_adam`` whose bias correction restarts with zeroed moments.

  Each leaf keeps its own step count, restarted whenever both of its moments are
  exactly zero on entry: at initialisation, and when
  :func:`~subspace_optax.low_rank` with ``on_refresh='reset'`` has just zeroed a
  refreshed leaf's moments. This is FRUGAL's ``reset_statistics`` (moments *and*
  step count reset), per leaf so that it works with staggered refreshes.
  Without the restart the first update after a reset would be
  ``~ (1-β₁)/sqrt(1-β₂) ≈ 3.2`` times too large (the second moment's bias
  correction would assume a long history).

  Otherwise identical to ``optax.scale_by_adam`` (``ε`` added after the bias
  correction, as FRUGAL's AdamW). A leaf whose gradient is exactly zero from the
  start keeps restarting, so its bias correction starts with its first nonzero
  gradient. ``mu_dtype`` (None: float32) stores the first moment as in
  ``optax.scale_by_adam``: computed, and the step taken, in float32.

  Args:
    b1: decay of the first moment ``β_1``.
    b2: decay of the second moment ``β_2``.
    eps: ``ε``, added after the bias correction.
    eps_root: ``ε`` inside the square root (as ``optax.scale_by_adam``).
    mu_dtype: dtype in which the first moment is stored; None: float32.

  Returns:
    An ``optax.GradientTransformation`` whose state is a
    :class:`ScaleByResettableAdamState` (one count per leaf).

  Examples:
    >>> import jax.numpy as jnp
    >>> import subspace_optax as so
    >>> tx = so.transforms.scale_by_resettable_adam()
    >>> params = jnp.zeros(2)
    >>> updates, state = tx.update(jnp.array([1.0, -2.0]), tx.init(params))
    >>> updates
    Array([ 1., -1.], dtype=float32)
  """
  mu_dtype = precision.float_dtype(mu_dtype, 'mu_dtype')

  def init_fn(params):
    return ScaleByResettableAdamState(
        jax.tree.map(lambda p: jnp.zeros([], jnp.int32), params),
        init_moment(params, mu_dtype), init_moment(params))

  def restarted_count(count, m, v):
    fresh = jnp.logical_not(jnp.any(m != 0) | jnp.any(v != 0))
    return optax.safe_increment(jnp.where(fresh, 0, count))

  def update_fn(updates, state, params=None):
    del params
    count = jax.tree.map(restarted_count, state.count, state.mu, state.nu)
    mu, nu = moments_for_step(updates, state.mu, state.nu, b1, b2)

    def leaf(g, t, m, v):
      m_hat = m / one_minus_power(b1, t)
      v_hat = v / one_minus_power(b2, t)
      return (m_hat / (jnp.sqrt(v_hat + eps_root) + eps)).astype(
          jnp.result_type(g))

    out = jax.tree.map(leaf, updates, count, mu, nu)
    return out, ScaleByResettableAdamState(
        count, stored_like(mu, state.mu), nu)

  return optax.GradientTransformation(init_fn, update_fn)


# ------------------------------------------------------- AdamP's Adam


def scale_by_torch_nesterov_adam(
    b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
    nesterov: bool = False, *, mu_dtype: Optional[Any] = None,
) -> optax.GradientTransformation:
  """Adam as AdamP computes it, with its Nesterov variant.

  .. math::
    u = \\frac{m_t / (1-β_1^t)}{\\sqrt{v_t/(1-β_2^t)} + ε},\\qquad
    \\text{Nesterov: } m_t \\to β_1 m_t + (1-β_1) g_t.

  Without Nesterov this equals ``optax.scale_by_adam``; optax's Nesterov
  (NAdam) bias-corrects the two terms separately, AdamP does not.
  State: ``optax.ScaleByAdamState``.

  Args:
    b1: decay of the first moment ``β_1``.
    b2: decay of the second moment ``β_2``.
    eps: ``ε``, added after the bias correction.
    nesterov: use AdamP's Nesterov momentum.
    mu_dtype: dtype in which the first moment is stored; None: float32.

  Returns:
    An ``optax.GradientTransformation`` whose state is an
    ``optax.ScaleByAdamState``.

  Examples:
    >>> import jax.numpy as jnp
    >>> import subspace_optax as so
    >>> tx = so.transforms.scale_by_torch_nesterov_adam()
    >>> params = jnp.zeros(2)
    >>> updates, state = tx.update(jnp.array([1.0, -2.0]), tx.init(params))
    >>> updates
    Array([ 1., -1.], dtype=float32)
  """
  mu_dtype = precision.float_dtype(mu_dtype, 'mu_dtype')

  def init_fn(params):
    return optax.ScaleByAdamState(
        count=jnp.zeros([], jnp.int32), mu=init_moment(params, mu_dtype),
        nu=init_moment(params))

  def update_fn(updates, state, params=None):
    del params
    count = optax.safe_increment(state.count)
    mu, nu = moments_for_step(updates, state.mu, state.nu, b1, b2)
    correction1 = one_minus_power(b1, count)
    correction2 = one_minus_power(b2, count)

    directions = update_first_moment(updates, mu, b1) if nesterov else mu

    def step(m, v, g):
      return (m / correction1 / (jnp.sqrt(v / correction2) + eps)).astype(
          jnp.result_type(g))

    return (jax.tree.map(step, directions, nu, updates),
            optax.ScaleByAdamState(count, stored_like(mu, state.mu), nu))

  return optax.GradientTransformation(init_fn, update_fn)
