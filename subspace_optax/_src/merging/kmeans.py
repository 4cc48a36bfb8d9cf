"""K-means clustering in pure JAX, with k-means++ seeding.

Used by Sub-MoE (:mod:`subspace_optax._src.merging.sub_moe`) to group the
experts of a mixture of experts, and usable on its own. Everything is a pure
function of ``(points, key)``: jit-able (``num_clusters``, ``metric``,
``iterations`` and ``restarts`` are static) and deterministic given the key.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

METRICS = ('euclidean', 'cosine')


class KMeansResult(NamedTuple):
  """What :func:`kmeans` returns.

  Attributes:
    assignments: ``(n,)`` int32, the cluster of each point.
    centroids: ``(k, d)`` cluster centres (unit norm for ``metric='cosine'``).
    inertia: scalar, the summed distance of each point to its centroid
      (squared Euclidean distance, or ``1 - cos`` for ``metric='cosine'``).
    iterations: scalar int32, the Lloyd iterations run (of the last restart).
  """

  assignments: jax.Array
  centroids: jax.Array
  inertia: jax.Array
  iterations: jax.Array


def _normalize(x: jax.Array) -> jax.Array:
  norm = jnp.linalg.norm(x, axis=-1, keepdims=True)
  return x / jnp.where(norm > 0, norm, 1.0)


def _distances(points, centroids, metric):
  """``(n, k)`` distances: squared Euclidean or ``1 - cos`` (unit inputs)."""
  if metric == 'cosine':
    return jnp.maximum(1.0 - points @ centroids.T, 0.0)
  squared = (jnp.sum(points**2, -1)[:, None] - 2.0 * points @ centroids.T
             + jnp.sum(centroids**2, -1)[None, :])
  return jnp.maximum(squared, 0.0)


def _update(points, assignments, old, num_clusters, metric):
  """Centroids as the means of their points (renormalised for cosine)."""
  one_hot = jax.nn.one_hot(assignments, num_clusters, dtype=points.dtype)
  counts = one_hot.sum(0)
  sums = one_hot.T @ points
  means = sums / jnp.maximum(counts, 1.0)[:, None]
  if metric == 'cosine':
    means = _normalize(means)
  return jnp.where(counts[:, None] > 0, means, old)


def _fill_empty(points, assignments, centroids, num_clusters, metric):
  """Gives each empty cluster the farthest point of a cluster of size ≥ 2.

  Lloyd's algorithm can empty a cluster; this makes every cluster non-empty
  whenever ``n >= k`` (clusters are filled one by one, in index order).
  """

  def fill(j, carry):
    assignments, centroids = carry
    counts = jnp.bincount(assignments, length=num_clusters)
    own = _distances(points, centroids, metric)[
        jnp.arange(points.shape[0]), assignments]
    movable = counts[assignments] >= 2
    candidate = jnp.argmax(jnp.where(movable, own, -1.0))
    empty = counts[j] == 0
    assignments = jnp.where(
        empty, assignments.at[candidate].set(j), assignments)
    centroids = jnp.where(
        empty, centroids.at[j].set(points[candidate]), centroids)
    return assignments, centroids

  return jax.lax.fori_loop(0, num_clusters, fill, (assignments, centroids))


def kmeans_plus_plus(
    points: jax.Array, num_clusters: int, key: jax.Array, *,
    metric: str = 'euclidean') -> jax.Array:
  """k-means++ seeding: ``(k, d)`` initial centroids drawn from ``points``.

  Arthur & Vassilvitskii, `k-means++: The Advantages of Careful Seeding
  <https://dl.acm.org/doi/10.5555/1283383.1283494>`_, SODA 2007: the first
  centre is uniform over the points, each next one is drawn with probability

  .. math::
    p(x) = D(x)^2 / \\sum_y D(y)^2,

  ``D(x)`` the distance from ``x`` to its nearest chosen centre. (For
  ``metric='cosine'`` the weight is ``(1 - cos)^2``; points are normalised
  first.) If every point coincides with a centre, the draw is uniform.

  Args:
    points: ``(n, d)`` points.
    num_clusters: ``k``, at most ``n``.
    key: a ``jax.random`` key.
    metric: ``'euclidean'`` or ``'cosine'``.

  Returns:
    ``(k, d)`` centroids, each one of the (normalised) points.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> import subspace_optax as so
    >>> points = jnp.array([[0., 0.], [0., 0.1], [9., 9.]])
    >>> seeds = so.merging.kmeans_plus_plus(points, 2, jax.random.key(0))
    >>> bool((seeds == points[2]).all(1).any())  # the far point is a seed
    True
  """
  _check(points, num_clusters, metric)
  if metric == 'cosine':
    points = _normalize(points)
  n = points.shape[0]
  first_key, key = jax.random.split(key)
  first = jax.random.randint(first_key, (), 0, n)
  centroids = jnp.zeros((num_clusters, points.shape[1]), points.dtype)
  centroids = centroids.at[0].set(points[first])
  nearest = _distances(points, points[first][None], metric)[:, 0]

  def step(j, carry):
    centroids, nearest = carry
    weight = nearest**2 if metric == 'cosine' else nearest
    weight = jnp.where(weight.sum() > 0, weight, jnp.ones_like(weight))
    pick = jax.random.categorical(jax.random.fold_in(key, j), jnp.log(weight))
    centroids = centroids.at[j].set(points[pick])
    new = _distances(points, points[pick][None], metric)[:, 0]
    return centroids, jnp.minimum(nearest, new)

  centroids, _ = jax.lax.fori_loop(
      1, num_clusters, step, (centroids, nearest))
  return centroids


def _check(points, num_clusters, metric):
  if metric not in METRICS:
    raise ValueError(f'metric must be one of {METRICS}, got {metric!r}.')
  if points.ndim != 2:
    raise ValueError(
        f'points must be 2-D (n, d), got shape {tuple(points.shape)}.')
  if not 1 <= num_clusters <= points.shape[0]:
    raise ValueError(
        f'num_clusters must be between 1 and the number of points '
        f'{points.shape[0]}, got {num_clusters}.')


def _lloyd(points, key, num_clusters, metric, iterations, tol):
  """One k-means run from a k-means++ seed; points already normalised."""
  centroids = kmeans_plus_plus(points, num_clusters, key, metric=metric)

  def assign(centroids):
    assignments = jnp.argmin(_distances(points, centroids, metric), -1)
    return _fill_empty(points, assignments, centroids, num_clusters, metric)

  def cond(carry):
    _, _, shift, i = carry
    return (i < iterations) & (shift > tol)

  def body(carry):
    centroids, _, _, i = carry
    assignments, centroids = assign(centroids)
    new = _update(points, assignments, centroids, num_clusters, metric)
    shift = jnp.max(jnp.sum((new - centroids)**2, -1))
    return new, assignments, shift, i + 1

  start = (centroids, jnp.zeros(points.shape[0], jnp.int32),
           jnp.array(jnp.inf, points.dtype), jnp.int32(0))
  centroids, _, _, count = jax.lax.while_loop(cond, body, start)
  assignments, centroids = assign(centroids)
  centroids = _update(points, assignments, centroids, num_clusters, metric)
  distance = _distances(points, centroids, metric)
  inertia = distance[jnp.arange(points.shape[0]), assignments].sum()
  return KMeansResult(assignments.astype(jnp.int32), centroids, inertia, count)


@functools.partial(
    jax.jit,
    static_argnames=('num_clusters', 'metric', 'iterations', 'restarts'))
def kmeans(
    points: jax.Array,
    num_clusters: int,
    key: jax.Array,
    *,
    metric: str = 'euclidean',
    iterations: int = 100,
    tol: float = 1e-7,
    restarts: int = 1,
) -> KMeansResult:
  """K-means (Lloyd's algorithm) from k-means++ seeds, in pure JAX.

  Lloyd, `Least squares quantization in PCM
  <https://doi.org/10.1109/TIT.1982.1056489>`_, 1982, seeded by k-means++
  (:func:`kmeans_plus_plus`). It alternates

  .. math::
    a_i = \\arg\\min_j d(x_i, c_j),\\qquad
    c_j = \\frac{1}{|S_j|}\\sum_{i \\in S_j} x_i,

  until the largest squared centroid shift is at most ``tol`` or after
  ``iterations`` steps. With ``metric='cosine'`` the points are normalised,
  ``d = 1 - cos`` and the centroids are renormalised means (spherical k-means,
  Dhillon & Modha 2001). A cluster left empty is given the point farthest
  from its own centroid among clusters with two or more points, so every
  cluster is non-empty. ``restarts`` runs start from ``restarts`` keys split
  from ``key`` (batched with ``vmap``) and the lowest inertia is kept.

  Args:
    points: ``(n, d)`` float points.
    num_clusters: ``k`` (static), between 1 and ``n``.
    key: a ``jax.random`` key; the result is a deterministic function of it.
    metric: ``'euclidean'`` (squared distance) or ``'cosine'``.
    iterations: the most Lloyd steps (static).
    tol: stop once ``max_j ||c_j^{new} - c_j||² <= tol``.
    restarts: the number of seeded runs (static); the best is returned.

  Returns:
    A :class:`KMeansResult` (assignments, centroids, inertia, iterations).

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> import subspace_optax as so
    >>> points = jnp.array([[0., 0.], [0., 1.], [10., 10.], [10., 11.]])
    >>> result = so.merging.kmeans(points, 2, jax.random.key(0))
    >>> bool(result.assignments[0] == result.assignments[1]
    ...      != result.assignments[2] == result.assignments[3])
    True
  """
  _check(points, num_clusters, metric)
  if restarts < 1:
    raise ValueError(f'restarts must be at least 1, got {restarts}.')
  points = points.astype(jnp.promote_types(points.dtype, jnp.float32))
  if metric == 'cosine':
    points = _normalize(points)
  keys = jax.random.split(key, restarts)
  runs = jax.vmap(
      lambda k: _lloyd(points, k, num_clusters, metric, iterations, tol))(keys)
  best = jnp.argmin(runs.inertia)
  return jax.tree.map(lambda x: x[best], runs)
