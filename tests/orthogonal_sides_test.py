"""``orthogonal_to`` removes the protected components on the documented sides:
left ``Uᵀ Δ' = 0``, right ``Δ' V = 0``, two-sided both, block ``UᵀΔ'V = 0``."""

import jax.numpy as jnp
import numpy as np
import pytest

import spectra
import subspace_optax as so

M, N, C = 7, 5, 2


def _memory():
  left = spectra.orthonormal(M, C, 0)
  right = spectra.orthonormal(N, C, 1)
  memory = {'w': so.continual.ProtectedSubspace(
      left=jnp.asarray(left, jnp.float32),
      right=jnp.asarray(right, jnp.float32),
      left_count=jnp.int32(C), right_count=jnp.int32(C))}
  return memory, left, right


def _masked(mode):
  memory, left, right = _memory()
  delta = np.random.default_rng(2).normal(size=(M, N))
  tx = so.continual.orthogonal_to(memory, mode=mode)
  params = {'w': jnp.zeros((M, N))}
  out, _ = tx.update({'w': jnp.asarray(delta, jnp.float32)}, tx.init(params),
                     params)
  return np.asarray(out['w'], np.float64), delta, left, right


@pytest.mark.parametrize('mode', ['two_sided', 'left', 'right', 'block'])
def test_each_mode_removes_exactly_its_sides(mode):
  out, delta, u, v = _masked(mode)
  pu, pv = u @ u.T, v @ v.T
  want = {
      'two_sided': (np.eye(M) - pu) @ delta @ (np.eye(N) - pv),
      'left': (np.eye(M) - pu) @ delta,
      'right': delta @ (np.eye(N) - pv),
      'block': delta - pu @ delta @ pv,
  }[mode]
  np.testing.assert_allclose(out, want, atol=1e-5)
  left_leak = np.abs(u.T @ out).max()
  right_leak = np.abs(out @ v).max()
  assert np.abs(u.T @ out @ v).max() < 1e-6
  assert (left_leak < 1e-6) == (mode in ('two_sided', 'left'))
  assert (right_leak < 1e-6) == (mode in ('two_sided', 'right'))
  # Nothing outside the protected subspaces is removed.
  free = (np.eye(M) - pu) @ delta @ (np.eye(N) - pv)
  np.testing.assert_allclose((np.eye(M) - pu) @ out @ (np.eye(N) - pv), free,
                             atol=1e-5)
