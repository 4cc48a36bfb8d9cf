"""Exact reparameterised fine-tuning on an unchanged dense model.

Methods such as LoRA, PiSSA, MiLoRA, SVFit, SALT or Effort train a few
*factors* ``f`` that stand for a weight ``W(f) = W_rest + R(f)``; ``W_rest`` is
frozen. Instead of changing the model, :func:`reparameterize` keeps the dense
weights as the params and trains the factors inside the optimizer state: the
factor gradients come from the weight gradient by the chain rule (a VJP of
``R``), an inner optax optimizer steps the factors, and the emitted update is
the change of the weight, ``R(f_{t+1}) - R(f_t)``. Starting from the
pre-trained weights ``W_0``, the params then stay equal to the reparameterised
weight ``W_0 - R(f_0) + R(f_t)`` (to float rounding) at every step: the same
trajectory as training the factors of the reparameterised model directly.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from subspace_optax._src import arguments
from subspace_optax._src import utils
from subspace_optax._src.finetune import factor_sharding
from subspace_optax._src.pipeline import sharding

HIGHEST = jax.lax.Precision.HIGHEST
# Raised when a value that a host check needs is traced (under jax.jit).
TRACED_ERRORS = (jax.errors.ConcretizationTypeError,
                 jax.errors.TracerIntegerConversionError,
                 jax.errors.TracerArrayConversionError)


class Factorization(NamedTuple):
  """How one weight matrix is reparameterised by trainable factors.

  Attributes:
    name: a short name, for messages.
    init: ``(w, key, path) -> (factors, frozen)``. ``w`` is the pre-trained
      weight, shape ``(*batch, m, n)`` (a stack of matrices when ``batch`` is
      not empty) in float32 (float64 for float64 params); ``key`` a PRNG key;
      ``path`` the leaf's name, for error messages. ``factors`` (trained) and
      ``frozen`` (constant) are pytrees of arrays with the leading ``batch``
      axes.
    reconstruct: ``(factors, frozen) -> (m, n)``, for ONE matrix (the
      transform vmaps it over the batch axes): the part of the weight that
      depends on the factors. The weight is ``W_rest + reconstruct(f, frozen)``
      with ``W_rest = W_0 - reconstruct(f_0, frozen)``; ``W_rest`` is held by
      the params, never stored.
    penalty: optional ``(factors, frozen) -> scalar`` for ONE matrix, a loss
      term on the factors (e.g. Effort's constraints) whose gradient is added
      to the factor gradients.
    difference: optional ``(factors, step, frozen) -> (m, n)`` for ONE
      matrix: ``reconstruct(factors + step) - reconstruct(factors)`` written
      in the step ``u_f`` of the factors (e.g. ``U diag(u_s) Vᵀ``), so that
      its rounding is relative to the update. Default: the difference of the
      two reconstructions, whose rounding is relative to ``|R(f)|`` (often
      ``|W|``), and so is the rounding of ``f + u_f`` itself.
  """

  name: str
  init: Callable[[jax.Array, jax.Array, str], tuple[Any, Any]]
  reconstruct: Callable[[Any, Any], jax.Array]
  penalty: Optional[Callable[[Any, Any], jax.Array]] = None
  difference: Optional[Callable[[Any, Any, Any], jax.Array]] = None


class ReparameterizeState(NamedTuple):
  """State of :func:`reparameterize`.

  Attributes:
    factors: per params leaf, the trained factors (a pytree of arrays with the
      leaf's batch axes) or ``optax.MaskedNode()`` for leaves not
      reparameterised.
    frozen: per params leaf, the constant factors (e.g. singular vectors), or
      ``optax.MaskedNode()``.
    inner_state: the state of ``inner``, over the tree of factors.
    others_state: the state of ``others``, over the leaves not reparameterised.
  """

  factors: Any
  frozen: Any
  inner_state: Any
  others_state: Any


def matmul(spec: str, *operands) -> jax.Array:
  """``jnp.einsum`` at HIGHEST precision (no TF32 or bf16 passes on GPU/TPU);
  under an Explicit mesh each output dim keeps its input's mesh axis."""
  return sharding.einsum(spec, *operands, precision=HIGHEST)


def compute_dtype(dtype) -> Any:
  """float32 for 16-bit and float32 weights, float64 for float64 ones."""
  return jnp.promote_types(dtype, jnp.float32)


RANK_FIX = 'give a positive int <= min(m, n) or a float fraction in (0, 1]'


def validate_rank(rank: Any, what: str = 'rank') -> None:
  """Construction-time check of a rank (no shapes known yet): a Python int or
  float fraction, positive; a ``TypeError`` names ``static_args`` for arrays."""
  if isinstance(rank, (np.integer, np.floating)):
    rank = rank.item()
  if isinstance(rank, bool) or not isinstance(rank, (int, float)):
    raise TypeError(
        f'`{what}` must be a Python int or a float fraction in (0, 1], got '
        f'{type(rank).__name__}: it fixes the shapes of the state, so it '
        'cannot be a traced or array value (with optax.inject_hyperparams, '
        f"list it in static_args=('{what}', ...)).")
  resolve_rank(rank, 1 << 30, 'construction', what)


def resolve_rank(rank: Any, size: int, path: str, what: str = 'rank') -> int:
  """An int rank ``<= size``, or a float fraction in (0, 1] of ``size``."""
  if isinstance(rank, (np.integer, np.floating)):
    rank = rank.item()
  if isinstance(rank, bool) or not isinstance(rank, (int, float)):
    raise TypeError(f'{path}: `{what}` must be an int or a float fraction, got '
                    f'{rank!r}; {RANK_FIX}.')
  if isinstance(rank, float):
    if not 0.0 < rank <= 1.0:
      raise ValueError(f'{path}: `{what}`={rank} is a float outside (0, 1]; '
                       f'{RANK_FIX}.')
    return max(1, round(rank * size))
  if rank <= 0:
    raise ValueError(f'{path}: `{what}`={rank} is not positive; {RANK_FIX}.')
  if rank > size:
    raise ValueError(
        f'{path}: `{what}`={rank} is above min(m, n)={size} of this matrix. '
        f'Give a rank <= {size}, a float fraction in (0, 1], or leave this '
        'leaf out with `mask`.')
  return rank


def host_value(x) -> Optional[np.ndarray]:
  """``x`` on the host, or None when it is traced (under ``jax.jit``)."""
  try:
    return np.asarray(x)
  except TRACED_ERRORS:
    return None


def check_finite(x, path: str, what: str) -> None:
  """Raise a ``ValueError`` naming ``path`` if concrete ``x`` holds NaN/Inf."""
  value = host_value(x)
  if value is None:
    return
  bad = int(np.sum(~np.isfinite(value)))
  if bad:
    raise ValueError(
        f'{path}: {what} holds {bad} non-finite (NaN/Inf) entries, so its '
        'singular vectors are undefined. Load finite pre-trained weights, or '
        'leave this leaf out with `mask`.')


def thin_svd(w: jax.Array, path: str) -> tuple[jax.Array, jax.Array,
                                                jax.Array]:
  """``(U, σ, V)`` of ``w = U diag(σ) Vᵀ`` (thin, σ descending), batched.

  Shapes ``(*batch, m, k)``, ``(*batch, k)``, ``(*batch, n, k)`` with
  ``k = min(m, n)``, in :func:`compute_dtype`. Raises a ``ValueError`` naming
  ``path`` when the (concrete) result is not finite.
  """
  w = w.astype(compute_dtype(w.dtype))
  u, s, vt = jnp.linalg.svd(w, full_matrices=False)
  v = jnp.swapaxes(vt, -1, -2)
  for x in (u, s, v):
    check_finite(x, path, 'the SVD of the weight')
  return u, s, v


def _batched(fn: Callable[..., Any], num_batch_axes: int) -> Callable[..., Any]:
  for _ in range(num_batch_axes):
    fn = jax.vmap(fn)
  return fn


def _flags(mask, params, treedef, leaves) -> list[bool]:
  if mask is None:
    return [np.ndim(p) >= 2 for p in leaves]
  tree = mask(params) if callable(mask) else mask
  try:
    flags = treedef.flatten_up_to(tree)
  except (ValueError, TypeError) as error:
    raise ValueError(
        '`mask` must be a pytree of bools with the structure of the params '
        f'(or a callable params -> such a tree). ({error})') from error
  for flag in flags:
    if not isinstance(flag, (bool, np.bool_)):
      raise TypeError(f'`mask` leaves must be Python bools, got {flag!r}.')
  return [bool(f) for f in flags]


def _check_leaf(p, path: str, stacked: bool) -> None:
  ndim = np.ndim(p)
  if ndim < 2:
    raise ValueError(
        f'{path}: a leaf of shape {np.shape(p)} is not a matrix and cannot be '
        'reparameterised; set it to False in `mask` (it then gets `others`).')
  if ndim > 2 and not stacked:
    raise ValueError(
        f'{path}: a leaf of shape {np.shape(p)} is not 2-D. Pass stacked=True '
        'to read its leading axes as a stack of (m, n) matrices (one '
        'factorisation each), or leave it out with `mask`.')


@arguments.declare_static_args('mask', 'stacked', 'seed')
def reparameterize(
    factorization: Factorization,
    inner: optax.GradientTransformation,
    *,
    mask: Any = None,
    others: Optional[optax.GradientTransformation] = None,
    stacked: bool = True,
    seed: int = 0,
) -> optax.GradientTransformationExtraArgs:
  """Train the factors of a reparameterised weight, emitting weight updates.

  Per matrix leaf ``W_0`` (``m x n``), ``factorization.init`` builds factors
  ``f_0`` and constants ``c`` (e.g. from the SVD ``W_0 = UΣVᵀ``); the model's
  weight is ``W(f) = W_0 - R(f_0) + R(f)`` with
  ``R = factorization.reconstruct``.
  Each update, from the weight gradient ``G``:

  .. math::
    g_f = (\\partial R / \\partial f)^{*} G \\ (+\\ \\nabla_f\\,penalty),\\quad
    (u_f, s) = inner(g_f, s, f),\\quad f' = f + u_f,\\quad
    Δ = R(f') - R(f).

  ``inner`` receives the factors as its params, so weight decay (e.g. in
  ``optax.adamw``) acts on the factors, as in the original methods. When the
  params start at ``W_0`` and receive only these updates, ``params_t = W(f_t)``
  to float rounding, and ``G`` is the gradient of the reparameterised model,
  so the trajectory is the one of training ``f`` directly: no model surgery.
  Put nothing that changes the updates (clipping, a learning-rate scale) after
  this transform; put it inside ``inner``.

  **Precision.** Factors and reconstructions are float32 (float64 for float64
  params) at HIGHEST matmul precision, and ``Δ`` is their difference, cast to
  the param dtype. With bfloat16 params a small ``Δ`` is lost when it is added
  to the weight, so the params drift from ``W(f_t)``: keep float32 params, or
  float32 master weights (``subspace_optax.master_weights``) for bfloat16.

  **Sharding.** On a mesh the factors are sharded by rule from each weight's
  sharding (factor matrices' axes of length ``m``/``n`` take the weight's
  mesh axes; ranks and factor vectors are replicated); the
  SVD at init gathers each weight once. The state keeps its shardings across
  steps on Auto and Explicit meshes, and the updates are sharded like params.

  **Other leaves.** Leaves out of ``mask`` or not matrices get ``others``
  (default: a zero update, frozen, as PEFT freezes everything but the
  adapters); pass e.g. ``optax.adam(1e-4)`` to train biases and norms.

  Args:
    factorization: a :class:`Factorization`, e.g. from the presets
      :func:`subspace_optax.svfit` or :func:`subspace_optax.lora`.
    inner: the optimizer of the factors (e.g. ``optax.adamw``).
    mask: pytree of bools with the params' structure, or a callable ``params
      ->`` such a tree: True marks the leaves to reparameterise. Default: every
      leaf of rank >= 2.
    others: optimizer of the other leaves; ``None`` freezes them.
    stacked: read the leading axes of a leaf of rank > 2 as a stack of
      ``(m, n)`` matrices (e.g. ``nnx.scan`` layers), one factorisation each;
      with False such a leaf raises a ``ValueError``.
    seed: seeds the random factors (LoRA, SALT), one key per leaf.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is a
    :class:`ReparameterizeState`; ``init`` needs the pre-trained params (their
    values, not only shapes). Raises a ``ValueError`` naming the leaf for a
    rank above ``min(m, n)``, a non-finite weight, a non-matrix leaf in
    ``mask``, or updates whose tree does not match the params.

  Examples:
    >>> import jax.numpy as jnp, optax
    >>> import subspace_optax as so
    >>> params = {'w': jnp.arange(12.0).reshape(4, 3) / 10, 'b': jnp.zeros(3)}
    >>> tx = so.svfit(1e-2, rank=2)
    >>> state = tx.init(params)
    >>> grads = {'w': jnp.ones((4, 3)), 'b': jnp.ones(3)}
    >>> updates, state = tx.update(grads, state, params)
    >>> updates['b']  # frozen by default
    Array([0., 0., 0.], dtype=float32)
  """
  others = optax.set_to_zero() if others is None else others
  inner = optax.with_extra_args_support(inner)
  others = optax.with_extra_args_support(others)
  rebuild = factorization.reconstruct
  difference = factorization.difference or (
      lambda f, step, c: rebuild(jax.tree.map(jnp.add, f, step), c)
      - rebuild(f, c))

  def init_fn(params):
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    leaves = [p for _, p in flat]
    flags = _flags(mask, params, treedef, leaves)
    key = jax.random.PRNGKey(seed)
    factors, frozen, rest = [], [], []
    for i, ((path, p), flag) in enumerate(zip(flat, flags)):
      if not flag:
        factors.append(optax.MaskedNode())
        frozen.append(optax.MaskedNode())
        rest.append(p)
        continue
      name = jax.tree_util.keystr(path) or '<root>'
      _check_leaf(p, name, stacked)
      w = jnp.asarray(p)
      w = w.astype(compute_dtype(w.dtype))
      check_finite(w, name, 'the weight')
      # Factors are sharded by rule from the weight (see factor_sharding).
      where = sharding.placement(p)
      f, c = factorization.init(
          factor_sharding.gathered(w), jax.random.fold_in(key, i), name)
      factors.append(factor_sharding.place_factors(f, where, w.shape))
      frozen.append(factor_sharding.place_factors(c, where, w.shape))
      rest.append(optax.MaskedNode())
    factors = treedef.unflatten(factors)
    return ReparameterizeState(
        factors=factors, frozen=treedef.unflatten(frozen),
        inner_state=inner.init(factors),
        others_state=others.init(treedef.unflatten(rest)))

  def leaf_gradient(f, c, g):
    out, vjp = jax.vjp(lambda f: rebuild(f, c), f)
    (gf,) = vjp(sharding.reshard_like(g.astype(out.dtype), out))
    if factorization.penalty is not None:
      extra = jax.grad(factorization.penalty)(f, c)
      gf = jax.tree.map(jnp.add, gf, factor_sharding.like(extra, gf))
    return factor_sharding.like(gf, f)

  def update_fn(updates, state, params=None, **extra_args):
    flat, treedef = jax.tree_util.tree_flatten_with_path(updates)
    try:
      factors = treedef.flatten_up_to(state.factors)
      frozen = treedef.flatten_up_to(state.frozen)
      weights = (treedef.flatten_up_to(params) if params is not None
                 else [None] * len(flat))
    except (ValueError, TypeError) as error:
      raise ValueError(
          'reparameterize: the updates (or params) do not have the structure '
          'of the params given to init; give gradients of the same params '
          f'tree. ({error})') from error
    is_matrix = [not utils.is_masked(f) for f in factors]
    grads, rest = [], []
    for (path, g), f, c, matrix in zip(flat, factors, frozen, is_matrix):
      if not matrix:
        grads.append(optax.MaskedNode())
        rest.append(g)
        continue
      nb = np.ndim(g) - 2
      shape = jax.eval_shape(_batched(rebuild, max(nb, 0)), f, c).shape
      if nb < 0 or tuple(np.shape(g)) != tuple(shape):
        raise ValueError(
            f'{jax.tree_util.keystr(path)}: the update has shape '
            f'{np.shape(g)} but this leaf was reparameterised with shape '
            f'{shape} at init; give gradients of the same params.')
      grads.append(_batched(leaf_gradient, nb)(f, c, g))
      rest.append(optax.MaskedNode())
    factor_updates, inner_state = inner.update(
        treedef.unflatten(grads), state.inner_state, state.factors,
        **extra_args)
    new_factors = optax.apply_updates(state.factors, factor_updates)
    rest_params = None if params is None else treedef.unflatten(
        [optax.MaskedNode() if m else p for m, p in zip(is_matrix, weights)])
    rest_updates, others_state = others.update(
        treedef.unflatten(rest), state.others_state, rest_params, **extra_args)
    rest_flat = treedef.flatten_up_to(rest_updates)
    out = []
    for (_, g), f, step, c, p, r, matrix in zip(
        flat, factors, treedef.flatten_up_to(factor_updates), frozen, weights,
        rest_flat, is_matrix):
      if not matrix:
        out.append(r)
        continue
      delta = _batched(difference, np.ndim(g) - 2)(f, step, c)
      delta = sharding.reshard_like(delta, g if p is None else p)
      out.append(delta.astype(g.dtype if p is None else jnp.result_type(p)))
    new_state = ReparameterizeState(
        factors=new_factors, frozen=state.frozen, inner_state=inner_state,
        others_state=others_state)
    return treedef.unflatten(out), new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
