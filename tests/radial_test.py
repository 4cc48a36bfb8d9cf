"""AdamP / SGDP against a direct numpy computation of the reference rule."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import subspace_optax as so
from subspace_optax._src.pipeline import per_matrix

DELTA, WD_RATIO, EPS = 0.1, 0.1, 1e-8


def _numpy_projection(w, g, p):
  """AdamP's _projection on PyTorch layout (channels on axis 0); (p, ratio)."""
  for rows in (w.shape[0], 1):
    wv, gv = w.reshape(rows, -1), g.reshape(rows, -1)
    w_norm = np.linalg.norm(wv, axis=1)
    cosine = np.abs((wv * gv).sum(1)) / (
        np.maximum(w_norm, EPS) * np.maximum(np.linalg.norm(gv, axis=1), EPS))
    if cosine.max() < DELTA / np.sqrt(wv.shape[1]):
      unit = wv / (w_norm[:, None] + EPS)
      pv = p.reshape(rows, -1)
      pv = pv - unit * (unit * pv).sum(1, keepdims=True)
      return pv.reshape(p.shape), WD_RATIO
  return p, 1.0


def _numpy_adamp(w, grads, lr, wd, b1=0.9, b2=0.999, eps=1e-8, nesterov=False):
  w = w.astype(np.float64).copy()
  m, v = np.zeros_like(w), np.zeros_like(w)
  for t, g in enumerate(grads, start=1):
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    denom = np.sqrt(v) / np.sqrt(1 - b2**t) + eps
    perturb = ((b1 * m + (1 - b1) * g) if nesterov else m) / denom
    perturb, ratio = _numpy_projection(w, g, perturb)
    w = w * (1 - lr * wd * ratio) - lr / (1 - b1**t) * perturb
  return w


def _numpy_sgdp(w, grads, lr, wd, momentum, nesterov):
  w = w.astype(np.float64).copy()
  buf = np.zeros_like(w)
  for g in grads:
    buf = momentum * buf + g
    d = g + momentum * buf if nesterov else buf
    d, ratio = _numpy_projection(w, g, d)
    w = w * (1 - lr * wd * ratio / (1 - momentum)) - lr * d
  return w


def _gradients(w, kind, steps=3, seed=0):
  """Gradients orthogonal to each output channel / to the whole layer / generic."""
  rng = np.random.RandomState(seed)
  out = []
  for _ in range(steps):
    g = rng.randn(*w.shape)
    if kind == 'channel':
      wv, gv = w.reshape(w.shape[0], -1), g.reshape(w.shape[0], -1)
      gv = gv - wv * ((wv * gv).sum(1) / (wv * wv).sum(1))[:, None]
      g = gv.reshape(w.shape)
    elif kind == 'layer':
      g = g - w * (w * g).sum() / (w * w).sum()
    out.append(g)
  return out


@functools.lru_cache(maxsize=None)
def _adamp(channel_axis):
  """One AdamP (and its compiled update) shared by the parametrized cases."""
  tx = so.adamp(0.01, weight_decay=0.5, nesterov=True,
                channel_axis=channel_axis)
  return tx, jax.jit(tx.update)


def _run(tx, w, grads, layout, update=None):
  """Our optimizer on the weight in ``layout`` ('torch' or 'flax' = transposed)."""
  to = (lambda x: x) if layout == 'torch' else (lambda x: x.T)
  params = jnp.asarray(to(w), jnp.float32)
  state = tx.init(params)
  update = update or jax.jit(tx.update)
  for g in grads:
    u, state = update(jnp.asarray(to(g), jnp.float32), state, params)
    params = params + u
  return to(np.asarray(params))


@pytest.mark.parametrize('kind', ['channel', 'layer', 'generic'])
def test_adamp_matches_the_reference_rule(kind):
  w = np.random.RandomState(1).randn(6, 10)
  grads = _gradients(w, kind)
  # The premise of each case: which test of the rule fires.
  _, ratio = _numpy_projection(w, grads[0], grads[0])
  assert (ratio == WD_RATIO) == (kind != 'generic')
  if kind == 'layer':  # the channel test must fail for the layer test to run
    cosine = np.abs((w * grads[0]).sum(1)) / (
        np.linalg.norm(w, axis=1) * np.linalg.norm(grads[0], axis=1))
    assert cosine.max() > DELTA / np.sqrt(w.shape[1])
  expected = _numpy_adamp(w, grads, lr=0.01, wd=0.5, nesterov=True)
  for layout, axis in (('torch', 0), ('flax', -1)):
    tx, update = _adamp(axis)
    np.testing.assert_allclose(_run(tx, w, grads, layout, update), expected,
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('kind', ['channel', 'layer', 'generic'])
def test_the_gpu_lowering_matches_the_reference_rule(kind, monkeypatch):
  # GPUs take the inner products without XLA:CPU's barrier around each
  # reduction's operands (radial._inner_products); the rule is the same.
  monkeypatch.setattr(per_matrix, 'on_platform',
                      lambda *args, cpu, gpu: gpu(*args))
  w = np.random.RandomState(1).randn(6, 10)
  grads = _gradients(w, kind)
  expected = _numpy_adamp(w, grads, lr=0.01, wd=0.5, nesterov=True)
  tx = so.adamp(0.01, weight_decay=0.5, nesterov=True, channel_axis=0)
  np.testing.assert_allclose(_run(tx, w, grads, 'torch'), expected,
                             rtol=1e-5, atol=1e-6)


def _lowered_for(lowering, monkeypatch):
  """Take ``lowering``'s branch of ``per_matrix.on_platform`` ('cpu', 'gpu')."""
  monkeypatch.setattr(per_matrix, 'on_platform',
                      lambda *args, cpu, gpu: dict(cpu=cpu, gpu=gpu)[lowering](
                          *args))


@pytest.mark.parametrize('lowering', ['cpu', 'gpu'])
@pytest.mark.parametrize('kind', ['channel', 'layer', 'generic'])
@pytest.mark.parametrize('nesterov', [True, False])
def test_sgdp_matches_the_reference_rule(nesterov, kind, lowering,
                                         monkeypatch):
  # XLA:CPU's lowering takes ⟨w, p⟩ of the Nesterov step p = g + μb as
  # ⟨w, g⟩ + μ⟨w, b⟩; GPUs reduce p itself. The rule is the same.
  _lowered_for(lowering, monkeypatch)
  w = np.random.RandomState(2).randn(5, 8)
  grads = _gradients(w, kind, seed=3)
  expected = _numpy_sgdp(w, grads, lr=0.1, wd=0.2, momentum=0.9,
                         nesterov=nesterov)
  tx = so.sgdp(0.1, momentum=0.9, nesterov=nesterov, weight_decay=0.2,
               channel_axis=0)
  np.testing.assert_allclose(_run(tx, w, grads, 'torch'), expected,
                             rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('lowering', ['cpu', 'gpu'])
@pytest.mark.parametrize('dtype', ['float32', 'bfloat16'])
def test_nesterov_momentum_is_the_nesterov_trace(dtype, lowering,
                                                 monkeypatch):
  # project_radial(trace(μ), nesterov_momentum=μ) projects optax.trace's
  # Nesterov step g + μb, on matrices (projected) and vectors (passed).
  _lowered_for(lowering, monkeypatch)
  rng = np.random.RandomState(5)
  params = {'w': jnp.asarray(rng.randn(6, 10), dtype),
            'b': jnp.asarray(rng.randn(10), dtype)}
  kwargs = dict(weight_decay=0.3, channel_axis=0)
  ours = so.project_radial(optax.trace(0.9), nesterov_momentum=0.9, **kwargs)
  reference = so.project_radial(optax.trace(0.9, nesterov=True), **kwargs)
  states = ours.init(params), reference.init(params)
  for _ in range(3):
    # A cosine of 0.01 with each output channel of the current weight: under
    # the threshold 0.1/√10, so the channel projection applies, and ⟨w, g⟩
    # is not 0 (CPU: ⟨w, p⟩ = ⟨w, g⟩ + μ⟨w, b⟩).
    w = np.asarray(params['w'], np.float64)
    (g,) = _gradients(w, 'channel', steps=1, seed=rng.randint(1 << 30))
    g += 0.01 * w * (np.linalg.norm(g, axis=1) / np.linalg.norm(w, axis=1)
                     )[:, None]
    assert _numpy_projection(w, g, g)[1] == WD_RATIO
    grads = {'w': jnp.asarray(g, dtype), 'b': jnp.asarray(rng.randn(10), dtype)}
    (u, s), (v, r) = (jax.jit(tx.update)(grads, state, params)
                      for tx, state in ((ours, states[0]),
                                        (reference, states[1])))
    states = s, r
    for a, b in zip(jax.tree.leaves(u), jax.tree.leaves(v)):
      assert a.dtype == b.dtype == jnp.dtype(dtype)
      np.testing.assert_allclose(
          np.asarray(a, np.float32), np.asarray(b, np.float32),
          rtol=1e-5 if dtype == 'float32' else 2e-2,
          atol=1e-5 if dtype == 'float32' else 2e-2)
    params = jax.tree.map(lambda p, x: p - 0.1 * x, params, v)


def test_projected_step_has_no_radial_component():
  w = np.random.RandomState(4).randn(7, 12)
  grads = _gradients(w, 'channel', steps=1)
  tx = so.project_radial(so.transforms.scale_by_torch_nesterov_adam())
  params = jnp.asarray(w.T, jnp.float32)  # flax layout (in, out)
  step, _ = jax.jit(tx.update)(jnp.asarray(grads[0].T, jnp.float32),
                               tx.init(params), params)
  radial = np.sum(np.asarray(step) * w.T, axis=0)  # per output channel
  assert np.abs(radial).max() < 1e-5 * np.abs(np.asarray(step)).max()
  # Plain Adam's step does have a radial part here (Adam's elementwise scale).
  adam_step = np.sign(grads[0].T)  # first Adam step = sign(g) (up to ε)
  assert np.abs(np.sum(adam_step * w.T, axis=0)).max() > 0.1


def test_vectors_pass_through_and_params_are_required():
  tx = so.adamp(0.1, weight_decay=0.1)
  params = {'b': jnp.ones((4,))}
  u, _ = tx.update({'b': jnp.ones((4,))}, tx.init(params), params)
  np.testing.assert_allclose(u['b'], -0.1 * (1.0 + 0.1), rtol=1e-5)
  with pytest.raises(ValueError, match='params'):
    tx.update({'b': jnp.ones((4,))}, tx.init(params))


def test_adamp_state_bytes_match_the_analytic_size():
  params = {'w': jnp.zeros((6, 4)), 'b': jnp.zeros((4,))}
  state = jax.eval_shape(so.adamp(1e-3).init, params)
  assert so.state_bytes(state) == so.state_sizes.adamp_bytes(params)
