"""Balanced re-factorization of W = BA (pretraining benchmark, arXiv 2505.22922)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import subspace_optax as so


@pytest.mark.parametrize('batch,m,r,n', [((), 9, 3, 7), ((2,), 6, 4, 5),
                                         ((), 3, 5, 4)])
def test_product_is_unchanged_and_factors_are_balanced(batch, m, r, n):
  rng = np.random.RandomState(0)
  b = rng.randn(*batch, m, r).astype(np.float32) * 3.0  # unbalanced scales
  a = rng.randn(*batch, r, n).astype(np.float32) * 0.1
  new_b, new_a = jax.jit(so.refactorize)(b, a)
  assert new_b.shape == b.shape and new_a.shape == a.shape
  np.testing.assert_allclose(new_b @ new_a, b @ a, rtol=1e-4, atol=1e-5)
  sigma = np.linalg.svd((b @ a).astype(np.float64), compute_uv=False)
  p = min(m, n, r)
  expected = np.zeros(batch + (r, r))
  idx = np.arange(p)
  expected[..., idx, idx] = sigma[..., :p]
  tol = 1e-4 * sigma.max()
  np.testing.assert_allclose(np.swapaxes(new_b, -1, -2) @ new_b, expected,
                             atol=tol)
  np.testing.assert_allclose(new_a @ np.swapaxes(new_a, -1, -2), expected,
                             atol=tol)


def test_dtype_is_kept_and_mismatched_factors_are_rejected():
  b = jnp.ones((4, 2), jnp.bfloat16)
  a = jnp.ones((2, 3), jnp.bfloat16)
  new_b, new_a = jax.jit(so.refactorize)(b, a)
  assert new_b.dtype == new_a.dtype == jnp.bfloat16
  with pytest.raises(ValueError, match='W = BA'):
    so.refactorize(jnp.ones((4, 2)), jnp.ones((3, 5)))
