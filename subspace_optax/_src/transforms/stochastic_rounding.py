"""Low-precision params updated by stochastic rounding, without a master copy.

Adding a small float32 update ``Δ`` to a bfloat16 weight ``θ`` with
round-to-nearest loses it whenever ``|Δ|`` is below half a bfloat16 step of
``θ`` (about ``|θ| · 2⁻⁹``): late in training, with a small learning rate,
most of the update is rounded away. :func:`~subspace_optax.master_weights`
fixes that with a float32 copy (4 more bytes per parameter);
:func:`stochastic_rounding` instead rounds ``θ + Δ`` up or down at random, so
the expected weight is the exact one and no copy is kept.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from subspace_optax._src import utils
from subspace_optax._src.transforms import quantize


class StochasticRoundingState(NamedTuple):
  """State of :func:`stochastic_rounding`: the number of updates so far (the
  keys are ``fold_in(key(seed), count)``, so no key is stored)."""

  count: jax.Array  # int32 scalar


def _is_narrow_float(leaf) -> bool:
  dtype = jnp.result_type(leaf)
  return (jnp.issubdtype(dtype, jnp.floating)
          and jnp.finfo(dtype).bits < jnp.finfo(jnp.float32).bits)


def stochastic_rounding(seed: int = 0) -> optax.GradientTransformation:
  """Apply updates to bfloat16 (float16) params by stochastic rounding.

  Q-GaLore (Zhang et al., `Q-GaLore: Quantized GaLore with INT4 Projection
  and Layer-Adaptive Low-Rank Gradients <https://arxiv.org/abs/2407.08296>`_,
  2024) keeps its weights in low precision and applies each update with
  stochastic rounding instead of keeping a high-precision master copy (Gupta
  et al., `arXiv 1502.02551 <https://arxiv.org/abs/1502.02551>`_). For each
  leaf stored in a float type narrower than float32, with update ``Δ``:

  .. math::
    θ_{t+1} = SR(θ_t + Δ_t), \\qquad
    SR(x) = \\begin{cases} ⌈x⌉ & \\text{with probability }
    \\frac{x - ⌊x⌋}{⌈x⌉ - ⌊x⌋} \\\\ ⌊x⌋ & \\text{otherwise} \\end{cases}

  where ``⌊x⌋``, ``⌈x⌉`` are the neighbours of ``x`` in the param's dtype
  (:func:`~subspace_optax.stochastic_round`), so
  ``E[θ_{t+1}] = θ_t + Δ_t``: updates far below the dtype's step still move
  the weights on average. The emitted update is
  ``u = SR(θ + Δ) - θ`` in float32 (exact: both are bfloat16 values), so
  ``optax.apply_updates`` sets ``θ`` to ``SR(θ + Δ)`` exactly. Float32 (and
  wider) leaves and non-float leaves pass through unchanged. Each leaf of each
  step draws its own key, ``fold_in(fold_in(key(seed), count), leaf)``.

  Put it **last** in the chain: ``optax.chain(tx, stochastic_rounding())``.
  Its state is one int32; :func:`~subspace_optax.master_weights` is the
  alternative that costs 4 bytes per low-precision parameter.

  Args:
    seed: seed of the rounding draws.

  Returns:
    An ``optax.GradientTransformation`` whose state is a
    :class:`StochasticRoundingState`; its ``update`` needs ``params``.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import subspace_optax as so
    >>> params = {'w': jnp.ones(4096, jnp.bfloat16)}
    >>> tx = optax.chain(optax.sgd(1.0), so.stochastic_rounding())
    >>> state = tx.init(params)
    >>> grads = {'w': jnp.full(4096, -1e-3)}  # an eighth of bf16's step at 1
    >>> updates, state = tx.update(grads, state, params)
    >>> new = optax.apply_updates(params, updates)
    >>> new['w'].dtype
    dtype(bfloat16)
    >>> bool(abs(new['w'].astype(jnp.float32).mean() - 1.001) < 3e-4)
    True
    >>> bool(jnp.all(params['w'] + grads['w'].astype(jnp.bfloat16) == 1))
    True
  """
  if isinstance(seed, bool) or not isinstance(seed, int):
    raise TypeError(f'`seed` must be an int, got {seed!r}.')

  def init_fn(params):
    del params
    return StochasticRoundingState(count=jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError('stochastic_rounding needs the params: call '
                       'update(updates, state, params).')
    params = utils.unbox(params)
    leaves, treedef = jax.tree.flatten(updates)
    step_key = jax.random.fold_in(jax.random.key(seed), state.count)
    out = []
    for i, (u, p) in enumerate(zip(leaves, treedef.flatten_up_to(params))):
      if not _is_narrow_float(p) or utils.passes_through(u):
        out.append(u)
        continue
      exact = p.astype(jnp.float32) + u.astype(jnp.float32)
      rounded = quantize.stochastic_round(
          exact, p.dtype, jax.random.fold_in(step_key, i))
      out.append(rounded.astype(jnp.float32) - p.astype(jnp.float32))
    return treedef.unflatten(out), StochasticRoundingState(
        count=optax.safe_increment(state.count))

  return optax.GradientTransformation(init_fn, update_fn)
