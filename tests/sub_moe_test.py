"""Tests of Sub-MoE expert merging (subspace_optax/_src/merging/sub_moe.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from subspace_optax._src.merging import sub_moe as sub_moe_lib
from subspace_optax._src.merging import whitening

E, D, F = 6, 5, 7
GROUPS = np.array([0, 0, 0, 1, 2, 2])  # Unequal sizes: exercises the padding.
FREQUENCIES = np.array([1.0, 2.0, 5.0, 3.0, 4.0, 0.5], np.float32)


def _experts(seed=0):
  keys = jax.random.split(jax.random.key(seed), 3)
  return {'gate': jax.random.normal(keys[0], (E, D, F)),
          'up': jax.random.normal(keys[1], (E, D, F)),
          'down': jax.random.normal(keys[2], (E, F, D))}


def _outputs(seed=0, tokens=4):
  return jax.random.normal(jax.random.key(seed + 100), (E, tokens, D))


def _merge(rank=None, **kwargs):
  return sub_moe_lib.sub_moe(
      _experts(), _outputs(), FREQUENCIES, 3, rank, groups=GROUPS, **kwargs)


def _weighted_average(w, members):
  f = FREQUENCIES[members] / FREQUENCIES[members].sum()
  return np.einsum('k,kmn->mn', f, np.asarray(w, np.float64)[members])


def _output_basis(w, members, rank):
  """Top-``rank`` right singular vectors of the group stacked on the input
  axis (rows): the output-side basis U shared by ``W_i = V_i Σ Uᵀ``."""
  stacked = np.concatenate(list(np.asarray(w, np.float64)[members]), axis=0)
  _, s, vt = np.linalg.svd(stacked, full_matrices=False)
  return vt[:rank].T, s


def test_untruncated_merge_is_the_frequency_weighted_average():
  result = _merge(rank=None)
  for name, w in _experts().items():
    assert result.experts[name].shape == (3,) + w.shape[1:]
    for g in range(3):
      np.testing.assert_allclose(
          result.experts[name][g],
          _weighted_average(w, np.flatnonzero(GROUPS == g)),
          rtol=1e-5, atol=1e-5)


def test_full_rank_equals_untruncated():
  full = _merge(rank={'gate': F, 'up': F, 'down': D})
  for name, w in _merge(rank=None).experts.items():
    np.testing.assert_allclose(full.experts[name], w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('rank', [1, 3])
def test_truncated_merge_lies_in_the_shared_output_basis(rank):
  result = _merge(rank=rank)
  for name, w in _experts().items():
    for g in range(3):
      members = np.flatnonzero(GROUPS == g)
      u, _ = _output_basis(w, members, rank)
      merged = np.asarray(result.experts[name][g], np.float64)
      # In the span of the shared basis: projecting onto it changes nothing.
      np.testing.assert_allclose(merged @ u @ u.T, merged, atol=1e-4)
      # And it is the weighted average projected on that basis.
      average = _weighted_average(w, members)
      np.testing.assert_allclose(merged, average @ u @ u.T, atol=1e-4)
      assert np.linalg.matrix_rank(merged, tol=1e-4) <= rank


def test_basis_is_shared_on_the_output_side_not_the_input_side():
  # Stacking along the output axis (columns) would share an input-side basis;
  # the merge must not be that.
  rank, members = 2, np.flatnonzero(GROUPS == 0)
  w = np.asarray(_experts()['gate'], np.float64)
  merged = np.asarray(_merge(rank=rank).experts['gate'][0], np.float64)
  wide = np.concatenate(list(w[members]), axis=1)
  left, _, _ = np.linalg.svd(wide, full_matrices=False)
  wrong = left[:, :rank] @ left[:, :rank].T @ _weighted_average(w, members)
  assert not np.allclose(merged, wrong, atol=1e-2)


@pytest.mark.parametrize('rank', [1, 2, 4])
def test_truncation_error_is_the_discarded_singular_energy(rank):
  experts = _experts()
  singleton = sub_moe_lib.sub_moe(
      experts, _outputs(), FREQUENCIES, E, rank, groups=np.arange(E))
  for name, w in experts.items():
    for i in range(E):
      _, s = _output_basis(w, [i], rank)
      error = np.sum((np.asarray(singleton.experts[name][i], np.float64)
                      - np.asarray(w[i], np.float64))**2)
      np.testing.assert_allclose(error, np.sum(s[rank:]**2), rtol=1e-4,
                                 atol=1e-5)
  # For a group: ||W - Σ w_i W_i||² <= Σ_{j>r} σ_j² of the stacked group.
  merged = _merge(rank=rank)
  for name, w in experts.items():
    for g in range(3):
      members = np.flatnonzero(GROUPS == g)
      _, s = _output_basis(w, members, rank)
      error = np.sum((np.asarray(merged.experts[name][g], np.float64)
                      - _weighted_average(w, members))**2)
      assert error <= np.sum(s[rank:]**2) * (1 + 1e-4) + 1e-6


def test_merge_weights_and_router_remap():
  result = _merge()
  np.testing.assert_array_equal(result.groups, GROUPS)
  np.testing.assert_array_equal(
      result.router_remap, (GROUPS[None, :] == np.arange(3)[:, None]))
  np.testing.assert_allclose(result.weights.sum(1), 1.0, rtol=1e-6)
  np.testing.assert_allclose(result.weights[0, :3], [1 / 8, 2 / 8, 5 / 8],
                             rtol=1e-6)
  assert np.all(np.asarray(result.weights)[result.router_remap == 0] == 0)


def test_remapped_softmax_is_the_sum_of_group_probabilities():
  logits = 10 * jax.random.normal(jax.random.key(3), (2, 4, E))
  grouped = sub_moe_lib.remap_logits(logits, _merge().router_remap)
  assert grouped.shape == (2, 4, 3)
  probs = jax.nn.softmax(logits)
  expected = jnp.stack([probs[..., GROUPS == g].sum(-1) for g in range(3)], -1)
  np.testing.assert_allclose(jax.nn.softmax(grouped), expected, rtol=1e-5,
                             atol=1e-6)


def test_kmeans_groups_experts_with_similar_outputs():
  rng = np.random.default_rng(0)
  base = rng.normal(size=(3, 16, D))
  truth = np.array([2, 0, 1, 0, 2, 1])
  scale = rng.uniform(0.5, 2.0, size=(E, 1, 1))  # Cosine ignores the scale.
  outputs = base[truth] * scale + 0.05 * rng.normal(size=(E, 16, D))
  result = sub_moe_lib.sub_moe(_experts(), jnp.asarray(outputs, jnp.float32),
                               FREQUENCIES, 3, key=jax.random.key(1))
  pairs = set(zip(np.asarray(result.groups).tolist(), truth.tolist()))
  assert len(pairs) == 3
  again = sub_moe_lib.sub_moe(_experts(), jnp.asarray(outputs, jnp.float32),
                              FREQUENCIES, 3, key=jax.random.key(1))
  np.testing.assert_array_equal(result.groups, again.groups)


# ----------------------------------------------------------------------------
# Bad inputs are named.


def _call(experts=None, outputs=None, frequencies=None, num_groups=3,
          rank=None, groups=None):
  return sub_moe_lib.sub_moe(
      _experts() if experts is None else experts,
      _outputs() if outputs is None else outputs,
      FREQUENCIES if frequencies is None else frequencies,
      num_groups, rank, groups=groups)


def _with(name, value):
  return {**_experts(), name: value}


@pytest.mark.parametrize(('kwargs', 'message'), [
    ({'experts': _with('up', jnp.ones((E - 1, D, F)))},
     'disagree on the number of experts'),
    ({'experts': _with('up', jnp.ones((E, D, F + 1)))},
     'SwiGLU experts need gate and up of shape'),
    ({'experts': _with('down', jnp.ones((E, D, F)))},
     'SwiGLU experts need gate and up of shape'),
    ({'experts': _with('gate', jnp.ones((E, D)))}, r'must be \(E, m, n\)'),
    ({'experts': {}}, 'experts is empty'),
    ({'outputs': jnp.ones((E + 1, 4, D))}, 'expert_outputs must be'),
    ({'frequencies': np.ones(E + 1)}, 'frequencies must have shape'),
    ({'num_groups': 0}, 'num_groups must be an int between 1 and'),
    ({'num_groups': E + 1}, 'num_groups must be an int between 1 and'),
    ({'rank': F + 1}, "rank=8 for 'gate' exceeds its output size n=7"),
    ({'rank': {'down': D + 1}}, "rank=6 for 'down' exceeds"),
    ({'rank': 0}, 'must be a positive int or None'),
    ({'rank': {'mlp': 2}}, r"rank names \['mlp'\] are not experts"),
    ({'frequencies': -FREQUENCIES}, 'frequencies must be >= 0'),
    ({'groups': np.array([0, 0, 0, 1, 1, 1])}, 'covering every group'),
])
def test_bad_arguments_are_named(kwargs, message):
  with pytest.raises(ValueError, match=message):
    _call(**kwargs)


def test_an_expert_never_routed_to_is_named():
  frequencies = FREQUENCIES.copy()
  frequencies[[1, 4]] = 0.0
  with pytest.raises(ValueError, match=r'Expert\(s\) \[1, 4\] were never '
                     r'routed to.*(?s:.*)prune these experts'):
    _call(frequencies=frequencies)


@pytest.mark.parametrize('where', ['experts', 'outputs', 'frequencies'])
def test_non_finite_inputs_are_named(where):
  experts, outputs, frequencies = _experts(), _outputs(), FREQUENCIES.copy()
  if where == 'experts':
    experts['down'] = experts['down'].at[2, 1, 0].set(jnp.nan)
    name = r"experts\['down'\]"
  elif where == 'outputs':
    outputs = outputs.at[0, 0, 0].set(jnp.inf)
    name = 'expert_outputs'
  else:
    frequencies[3] = np.inf
    name = 'frequencies'
  with pytest.raises(ValueError, match=name + '.*non-finite'):
    _call(experts, outputs, frequencies)


# ---------------------------------------------------- activation whitening


def _inputs(shape, seed=0):
  """Calibration inputs with a strongly anisotropic covariance, so the
  whitened truncation differs from the plain one."""
  x = np.random.default_rng(seed).normal(size=shape)
  return jnp.asarray(x * np.geomspace(10.0, 0.1, shape[-1]), jnp.float32)


def _whiten():
  return {'up': _inputs((40, D)), 'down': _inputs((E, 40, F), 1)}


def test_whitened_untruncated_merge_is_still_the_weighted_average():
  """No truncation: S^{-ᵀ} undoes Sᵀ exactly (would be SᵀW̄ without it)."""
  result = _merge(rank=None, whiten=_whiten())
  for name, w in _experts().items():
    for g in range(3):
      np.testing.assert_allclose(
          result.experts[name][g],
          _weighted_average(w, np.flatnonzero(GROUPS == g)),
          rtol=1e-4, atol=1e-4)


def _calibration_error(x, merged, reference):
  x = np.asarray(x, np.float64)
  return np.linalg.norm(x @ (np.asarray(merged, np.float64) - reference))


@pytest.mark.parametrize('rank', [1, 3])
def test_whitening_gives_the_optimal_calibration_truncation(rank):
  """One expert: the whitened merge is W U_r U_rᵀ with the output basis that
  minimises ||X W (I - P)||, so its calibration error is the tail energy of
  XW, and below the unwhitened merge's."""
  w = np.asarray(_experts()['gate'][:1], np.float64)  # (1, D, F)
  x = _inputs((40, D), 2)
  cholesky = whitening.input_cholesky(x, ridge=0.0)[None]
  whitened = sub_moe_lib.merge_group(jnp.asarray(w, jnp.float32),
                                     jnp.ones(1), rank, cholesky)
  plain = sub_moe_lib.merge_group(jnp.asarray(w, jnp.float32), jnp.ones(1),
                                  rank)
  tail = np.linalg.svd(np.asarray(x, np.float64) @ w[0],
                       compute_uv=False)[rank:]
  optimal = np.sqrt(np.sum(tail ** 2))
  error = _calibration_error(x, whitened, w[0])
  np.testing.assert_allclose(error, optimal, rtol=1e-3)
  assert error < 0.9 * _calibration_error(x, plain, w[0])


def test_whitened_group_merge_matches_the_whitened_joint_svd():
  """Several experts, one input set each: W = (Σ w_i W_i) U_r U_rᵀ with U_r
  the top right singular vectors of the whitened stack [S_iᵀ W_i]."""
  rank = 2
  x = _inputs((E, 40, F), 3)
  result = _merge(rank=rank, whiten={'down': x})
  cholesky = np.asarray(whitening.input_cholesky(x), np.float64)
  w = np.asarray(_experts()['down'], np.float64)
  for g in range(3):
    members = np.flatnonzero(GROUPS == g)
    stacked = np.concatenate([cholesky[i].T @ w[i] for i in members])
    basis = np.linalg.svd(stacked, full_matrices=False)[2][:rank].T
    expected = _weighted_average(w, members) @ basis @ basis.T
    np.testing.assert_allclose(result.experts['down'][g], expected,
                               rtol=1e-4, atol=1e-4)
  # Unwhitened names are merged as before.
  np.testing.assert_allclose(result.experts['up'],
                             _merge(rank=rank).experts['up'], atol=1e-6)


@pytest.mark.parametrize('whiten, message', [
    ({'mlp': jnp.ones((4, D))}, r"whiten names \['mlp'\] are not experts"),
    ({'up': jnp.ones((4, F))}, r"whiten\['up'\] must be .* m=5"),
    ({'down': jnp.ones((E + 1, 4, F))}, r"whiten\['down'\] must be"),
    ({'up': jnp.full((4, D), jnp.nan)}, r"whiten\['up'\].*non-finite"),
])
def test_bad_whitening_inputs_are_named(whiten, message):
  with pytest.raises(ValueError, match=message):
    _merge(rank=2, whiten=whiten)
