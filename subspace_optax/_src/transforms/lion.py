"""Lion's momentum before the sign (Online Subspace Descent's inner step)."""

from __future__ import annotations

from typing import Any, Optional

import jax.numpy as jnp
import optax

from subspace_optax._src.pipeline import precision
from subspace_optax._src.transforms import adam


def scale_by_lion_momentum(
    b1: float = 0.9, b2: float = 0.99, *, mu_dtype: Optional[Any] = None,
) -> optax.GradientTransformation:
  """Lion's interpolated momentum without the sign (to be signed later).

  .. math::
    u = β_1 m + (1 - β_1) g,\\qquad m \\leftarrow β_2 m + (1 - β_2) g.

  ``optax.chain(scale_by_lion_momentum(), optax.scale_by_sign())`` is
  ``optax.scale_by_lion()``; putting a projection between the two reproduces
  Online Subspace Descent's reference Lion (sign after unprojection).
  State: ``optax.ScaleByLionState`` (same as ``optax.scale_by_lion``).

  Args:
    b1: the interpolation factor ``β_1`` of the returned direction.
    b2: the decay ``β_2`` of the stored momentum.
    mu_dtype: dtype in which the momentum is stored (as in
      ``optax.scale_by_lion``); None: the params' dtype.

  Returns:
    An ``optax.GradientTransformation``.

  Examples:
    >>> import jax.numpy as jnp
    >>> import subspace_optax as so
    >>> tx = so.transforms.scale_by_lion_momentum(b1=0.5)
    >>> params = jnp.zeros(2)
    >>> updates, state = tx.update(jnp.array([2., -4.]), tx.init(params))
    >>> updates  # (1 - b1) g: the sign is taken later
    Array([ 1., -2.], dtype=float32)
  """
  mu_dtype = precision.float_dtype(mu_dtype, 'mu_dtype')

  def init_fn(params):
    return optax.ScaleByLionState(
        count=jnp.zeros([], jnp.int32),
        mu=optax.tree.zeros_like(params, dtype=mu_dtype))

  def update_fn(updates, state, params=None):
    del params
    direction = adam.update_first_moment(updates, state.mu, b1)
    mu = adam.update_first_moment(updates, state.mu, b2)
    return direction, optax.ScaleByLionState(optax.safe_increment(state.count), mu)

  return optax.GradientTransformation(init_fn, update_fn)


