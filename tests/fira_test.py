"""Tests of Fira and its pieces: norm-ratio scaling, the residual, the limiter."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

import subspace_optax as so


def _normal(seed, shape):
  return jax.random.normal(jax.random.key(seed), shape)


def test_clip_norm_growth_bounds_successive_norms():
  tx = so.clip_norm_growth(1.01)
  direction = {'a': _normal(0, (5, 3)), 'b': _normal(1, (4,))}
  state = tx.init(direction)
  update = jax.jit(tx.update)
  norms = []
  for t in range(6):
    scale = [1.0, 2.0, 4.0, 8.0, 0.5, 0.6][t]
    out, state = update(jax.tree.map(lambda x: scale * x, direction), state)
    norms.append({k: float(jnp.linalg.norm(v)) for k, v in out.items()})
    if t == 0:  # the first update passes unchanged
      np.testing.assert_allclose(out['a'], direction['a'], rtol=1e-6)
  for k in direction:
    for before, after in zip(norms[:-1], norms[1:]):
      assert after[k] <= 1.01 * before[k] * (1 + 1e-6)
    # Growth is clipped to exactly 1.01 per step; a shrinking input passes.
    np.testing.assert_allclose(norms[3][k], 1.01**3 * norms[0][k], rtol=1e-5)
    np.testing.assert_allclose(
        norms[4][k], 0.5 * float(jnp.linalg.norm(direction[k])), rtol=1e-5)
  assert jax.tree.map(jnp.shape, state.norm) == {'a': (), 'b': ()}


def test_clip_norm_growth_per_matrix_of_a_stack():
  tx = so.clip_norm_growth(1.01, axes=(-2, -1))
  x = _normal(2, (3, 4, 5))
  state = tx.init(x)
  assert state.norm.shape == (3,)
  update = jax.jit(tx.update)
  _, state = update(x, state)
  grown = x * jnp.array([1.0, 3.0, 0.5])[:, None, None]
  out, _ = update(grown, state)
  ratio = jnp.linalg.norm(out, axis=(1, 2)) / jnp.linalg.norm(x, axis=(1, 2))
  np.testing.assert_allclose(ratio, [1.0, 1.01, 0.5], rtol=1e-5)


def _synthetic(seed, batch=(2,), k=6, l=9, r=2):
  g = np.asarray(_normal(seed, batch + (k, l)), np.float64)
  q = np.linalg.qr(np.asarray(_normal(seed + 1, batch + (k, r))))[0]
  c = np.einsum('...kr,...kl->...rl', q, g)
  in_span = np.einsum('...kr,...rl->...kl', q, c)
  n = np.asarray(_normal(seed + 2, batch + (r, l)), np.float64)
  return g, q, c, n, in_span


def test_channel_factors_match_numpy_and_residual_is_scaled():
  g, _, c, n, in_span = _synthetic(0)
  phi = np.linalg.norm(n, axis=-2) / (np.linalg.norm(c, axis=-2) + 1e-8)
  ours = so.subspace_norm_ratio(jnp.asarray(c), jnp.asarray(n), 'channel')
  assert ours.shape == (2, 1, 9)
  np.testing.assert_allclose(ours[:, 0], phi, rtol=1e-5)
  tensor = so.subspace_norm_ratio(jnp.asarray(c), jnp.asarray(n), 'tensor')
  np.testing.assert_allclose(
      tensor[:, 0, 0], np.linalg.norm(n, axis=(1, 2)) / (
          np.linalg.norm(c, axis=(1, 2)) + 1e-8), rtol=1e-5)
  residual = so.fira_residual(limiter=None)
  tree = lambda x: {'w': jnp.asarray(x, jnp.float32)}
  out, _ = jax.jit(residual.update)(
      tree(g - in_span), residual.init(tree(g)), coefficients=tree(c),
      subspace_updates=tree(n), gradients=tree(g))
  np.testing.assert_allclose(out['w'], phi[:, None, :] * (g - in_span),
                             rtol=1e-4, atol=1e-5)


def test_paper_and_reference_residuals_differ_by_in_subspace_part():
  g, _, c, n, in_span = _synthetic(3)
  phi = np.linalg.norm(n, axis=-2) / (np.linalg.norm(c, axis=-2) + 1e-8)
  alpha = 0.25
  tree = lambda x: {'w': jnp.asarray(x, jnp.float32)}
  args = dict(coefficients=tree(c), subspace_updates=tree(n), gradients=tree(g))
  outs = []
  for reference in (False, True):
    tx = so.fira_residual(None, reference_residual=reference,
                          subspace_scale=alpha)
    outs.append(jax.jit(tx.update)(
        tree(g - in_span), tx.init(tree(g)), **args)[0]['w'])
  np.testing.assert_allclose(
      outs[1] - outs[0], (1 - alpha) * phi[:, None, :] * in_span,
      rtol=1e-4, atol=1e-5)


def test_fira_first_step_end_to_end():
  """Channels of the larger dimension; paper vs reference differ by (1-α)φ⊙QQᵀG."""
  params = {'w': jnp.ones((12, 30))}  # reference side: basis over the 12 rows
  grads = {'w': _normal(4, (12, 30))}
  alpha, lr = 0.25, 0.1
  outs = []
  for reference in (False, True):
    tx = so.fira(lr, rank=3, scale=alpha, reference_residual=reference)
    state = tx.init(params)
    updates, state = jax.jit(tx.update)(grads, state, params)
    outs.append(np.asarray(updates['w']))
  q = np.asarray(state[0].basis['w'])
  assert q.shape == (12, 3)
  g = np.asarray(grads['w'], np.float64)
  c = q.T @ g
  n = 0.1 * c / (np.sqrt(0.001) * np.abs(c) + 1e-6)  # uncorrected Adam, step 1
  phi = np.linalg.norm(n, axis=0) / (np.linalg.norm(c, axis=0) + 1e-8)
  assert phi.shape == (30,)  # one factor per channel of the larger dimension
  step = np.sqrt(1 - 0.999) / (1 - 0.9)
  expected = -lr * step * (alpha * q @ n + phi * (g - q @ c))
  np.testing.assert_allclose(outs[0], expected, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(
      outs[1] - outs[0], -lr * step * (1 - alpha) * phi * (q @ c),
      rtol=1e-4, atol=1e-6)


def test_split_adam_equals_torch_adam():
  params = {'w': jnp.ones((3, 4))}
  split = optax.chain(so.transforms.scale_by_adam_moments(), so.transforms.scale_by_bias_correction())
  torch_adam = so.transforms.scale_by_torch_adam()
  a, b = split.init(params), torch_adam.init(params)
  for t in range(3):
    grads = {'w': _normal(10 + t, (3, 4))}
    u, a = split.update(grads, a)
    v, b = torch_adam.update(grads, b)
    np.testing.assert_allclose(u['w'], v['w'], rtol=1e-6)


def test_fira_state_bytes_equal_analytic_size():
  params = {'w': jnp.ones((40, 16)), 'stack': jnp.ones((2, 10, 14)),
            'b': jnp.ones((16,))}
  tx = so.fira(1e-3, rank=4, dimension_numbers=so.last_two_axes)
  state = tx.init(params)
  expected = so.state_sizes.fira_bytes(params, 4, dimension_numbers=so.last_two_axes)
  assert so.state_bytes(state) == expected
  # GaLore's state plus one limiter scalar per matrix (3) and Adam's count
  # moved to the bias correction.
  assert expected == so.state_sizes.galore_bytes(
      params, 4, side='reference', dimension_numbers=so.last_two_axes) + 3 * 4
  # The limiter's state is per matrix: stacked over the stack's layers.
  residual = state[0].residual_state
  assert residual['b'] == optax.MaskedNode()
  assert residual['w'][1].norm.shape == ()
  assert residual['stack'][1].norm.shape == (2,)
