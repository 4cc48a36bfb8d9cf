"""Tests of the pure-JAX k-means (subspace_optax/_src/merging/kmeans.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from subspace_optax._src.merging import kmeans as kmeans_lib


def _blobs(seed=0, clusters=4, per=25, dim=5, spread=20.0):
  rng = np.random.default_rng(seed)
  centres = rng.normal(size=(clusters, dim)) * spread
  points = np.concatenate([c + rng.normal(size=(per, dim)) for c in centres])
  labels = np.repeat(np.arange(clusters), per)
  return points.astype(np.float32), labels


def _same_partition(a, b):
  """Equal up to a permutation of the cluster labels."""
  a, b = np.asarray(a), np.asarray(b)
  pairs = set(zip(a.tolist(), b.tolist()))
  return len(pairs) == len(set(a.tolist())) == len(set(b.tolist()))


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_recovers_well_separated_clusters(seed):
  points, labels = _blobs(seed)
  result = kmeans_lib.kmeans(jnp.asarray(points), 4, jax.random.key(seed))
  assert _same_partition(result.assignments, labels)
  assert result.centroids.shape == (4, 5)
  # The centroids are the cluster means.
  for j in range(4):
    np.testing.assert_allclose(
        result.centroids[j], points[result.assignments == j].mean(0),
        rtol=1e-5, atol=1e-4)


def test_seeding_picks_one_point_per_cluster():
  points, labels = _blobs(3, clusters=5, spread=100.0)
  seeds = kmeans_lib.kmeans_plus_plus(jnp.asarray(points), 5,
                                      jax.random.key(0))
  # k-means++ draws each next centre far from the chosen ones.
  picked = [int(np.argmin(np.abs(points - s).sum(1))) for s in seeds]
  assert sorted(labels[picked].tolist()) == [0, 1, 2, 3, 4]


def test_agrees_with_sklearn_up_to_permutation():
  sklearn_cluster = pytest.importorskip('sklearn.cluster')
  points, _ = _blobs(4, clusters=3, per=40, dim=3, spread=8.0)
  ours = kmeans_lib.kmeans(jnp.asarray(points), 3, jax.random.key(1),
                           restarts=5)
  theirs = sklearn_cluster.KMeans(3, n_init=5, random_state=0).fit(points)
  assert _same_partition(ours.assignments, theirs.labels_)
  np.testing.assert_allclose(ours.inertia, theirs.inertia_, rtol=1e-4)


def test_cosine_metric_clusters_by_direction():
  rng = np.random.default_rng(0)
  directions = np.eye(3, dtype=np.float32)
  # Same direction, very different norms: cosine groups them, Euclid does not.
  scales = np.array([0.1, 1.0, 10.0, 100.0], np.float32)
  points = np.concatenate(
      [d * scales[:, None] + 0.01 * rng.normal(size=(4, 3)) for d in directions]
  ).astype(np.float32)
  labels = np.repeat(np.arange(3), 4)
  cosine = kmeans_lib.kmeans(jnp.asarray(points), 3, jax.random.key(0),
                             metric='cosine', restarts=3)
  assert _same_partition(cosine.assignments, labels)
  np.testing.assert_allclose(jnp.linalg.norm(cosine.centroids, axis=1), 1.0,
                             rtol=1e-5)
  euclid = kmeans_lib.kmeans(jnp.asarray(points), 3, jax.random.key(0),
                             restarts=3)
  assert not _same_partition(euclid.assignments, labels)


def test_deterministic_given_key_and_jittable():
  points, _ = _blobs(5)
  run = jax.jit(lambda p, k: kmeans_lib.kmeans(p, 4, k, restarts=2))
  a = run(jnp.asarray(points), jax.random.key(7))
  b = run(jnp.asarray(points), jax.random.key(7))
  np.testing.assert_array_equal(a.assignments, b.assignments)
  np.testing.assert_array_equal(a.centroids, b.centroids)


def test_no_cluster_is_left_empty():
  # Duplicated points: without the repair, k = n leaves clusters empty.
  points = jnp.array([[0.0, 0.0]] * 3 + [[5.0, 5.0]] * 3)
  for k in range(1, 7):
    result = kmeans_lib.kmeans(points, k, jax.random.key(k))
    assert len(np.unique(result.assignments)) == k


def test_stops_early_at_the_tolerance():
  points, _ = _blobs(6)
  result = kmeans_lib.kmeans(jnp.asarray(points), 4, jax.random.key(0),
                             iterations=50)
  assert 1 <= int(result.iterations) < 50


@pytest.mark.parametrize(('kwargs', 'message'), [
    ({'num_clusters': 0}, 'between 1 and the number of points'),
    ({'num_clusters': 7}, 'between 1 and the number of points'),
    ({'metric': 'manhattan'}, 'metric must be one of'),
    ({'restarts': 0}, 'restarts must be at least 1'),
])
def test_bad_arguments_are_named(kwargs, message):
  args = {'num_clusters': 2, **kwargs}
  with pytest.raises(ValueError, match=message):
    kmeans_lib.kmeans(jnp.ones((6, 2)), key=jax.random.key(0), **args)


def test_points_must_be_two_dimensional():
  with pytest.raises(ValueError, match='points must be 2-D'):
    kmeans_lib.kmeans(jnp.ones((6,)), 2, jax.random.key(0))
