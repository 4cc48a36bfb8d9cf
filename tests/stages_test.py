"""Tests of the update stages' helpers (pipeline/stages.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from subspace_optax._src.pipeline import stages


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize('value, finite', [
    (1.0, True), (3e38, True), (-3e38, True), (np.inf, False),
    (-np.inf, False), (np.nan, False)])
def test_all_finite(dtype, value, finite):
  # One Inf or NaN anywhere in a stack must be seen, and large finite
  # entries must not read as overflow.
  x = jnp.full((3, 4, 5), 2e38, dtype).at[1, 2, 3].set(value)
  assert bool(stages.all_finite(x)) == finite
  assert bool(jax.jit(stages.all_finite)(x)) == finite
  for platform in ('cpu', 'cuda'):
    jax.jit(stages.all_finite).trace(x).lower(lowering_platforms=(platform,))


def test_all_finite_of_a_zero_size_leaf():
  assert bool(stages.all_finite(jnp.zeros((0, 3))))
