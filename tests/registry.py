"""Every public method configuration, small enough for tests.

The common, resume and error tests iterate over :data:`REGISTRY`. Each entry
names a public factory of ``subspace_optax`` (top level or
``subspace_optax.continual``) and the keyword arguments of a tiny configuration
(rank 2, refresh every 3 updates, so a few steps cross a refresh). The
arguments ``optax.inject_hyperparams`` must treat as static come from
``subspace_optax.static_args``.

When a method lands in ``subspace_optax/__init__.py`` (or ``continual``), add
it here: the test ``test_registry_covers_every_public_method`` in
``common_test.py`` fails until it is registered (or listed in
:data:`NOT_METHODS`).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

import subspace_optax as so

RANK = 2
REFRESH = 3


@dataclasses.dataclass(frozen=True)
class Entry:
  """A public factory with a small test configuration."""

  name: str
  factory: Callable[..., optax.GradientTransformation]
  kwargs: dict[str, Any]
  # Builds the kwargs that depend on the params (e.g. a protected memory).
  params_kwargs: Optional[Callable[[Any], dict[str, Any]]] = None
  # Why inject_hyperparams cannot wrap it (None: it can).
  no_inject: Optional[str] = None

  @property
  def static_args(self) -> tuple[str, ...]:
    """Arguments inject_hyperparams must leave alone (shapes, callables)."""
    return so.static_args(self.factory)

  def make(self, params=None, **overrides) -> optax.GradientTransformation:
    return self.factory(**self.arguments(params, **overrides))

  def arguments(self, params=None, **overrides) -> dict[str, Any]:
    kwargs = dict(self.kwargs)
    if self.params_kwargs is not None:
      kwargs.update(self.params_kwargs(
          make_params() if params is None else params))
    kwargs.update(overrides)
    return kwargs


def make_params(seed: int = 0):
  """Mixed dtypes and layouts in one small tree.

  ``w`` (float32) is projected on its rows, ``stack`` (bfloat16, two stacked
  layers) on its columns, ``b`` is a vector that is not projected.
  """
  shapes = {'w': ((8, 6), jnp.float32), 'stack': ((2, 5, 9), jnp.bfloat16),
            'b': ((4,), jnp.float32)}
  keys = jax.random.split(jax.random.key(seed), len(shapes))
  return {
      name: jax.random.normal(key, shape, jnp.float32).astype(dtype)
      for key, (name, (shape, dtype)) in zip(keys, sorted(shapes.items()))
  }


# An extra keyword argument every update must accept (and ignore).
EXTRA_ARGS = {'unexpected_extra_arg': jnp.float32(1.0)}


def as_bytes(tree) -> list[np.ndarray]:
  """Every array leaf as raw bytes, for bit-exact comparisons (bf16 too)."""
  return [np.frombuffer(np.asarray(leaf).tobytes(), np.uint8)
          for leaf in jax.tree.leaves(tree)]


@functools.lru_cache(maxsize=None)
def compiled(name: str):
  """``(tx, jitted update, trace counter, params)`` for a registry entry.

  Cached, so every test file in a session shares one compilation per method.
  ``trace counter[0]`` counts how often the update was traced.
  """
  params = make_params()
  tx = REGISTRY[name].make(params)
  traces = [0]

  def update(updates, state, params=None, **extra_args):
    traces[0] += 1
    return tx.update(updates, state, params, **extra_args)

  return tx, jax.jit(update), traces, params


def gradients(params, seed: int):
  """A reproducible gradient tree like ``params``."""
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(1000 + seed), len(leaves))
  return treedef.unflatten([
      jax.random.normal(k, jnp.shape(p), jnp.float32).astype(jnp.result_type(p))
      for k, p in zip(keys, leaves)
  ])


def _memory(params, mode='two_sided'):
  """A protected memory with one orthonormal direction per side and matrix."""
  memory = so.continual.empty_memory(
      params, mode=mode, capacity=2, dimension_numbers=so.last_two_axes)

  def fill(mem):
    if not isinstance(mem, so.continual.ProtectedSubspace):
      return mem
    fields = {}
    for side in ('left', 'right'):
      basis = getattr(mem, side)
      if isinstance(basis, optax.MaskedNode):
        fields[side] = fields[side + '_count'] = basis
        continue
      direction = np.zeros(basis.shape, np.float32)
      direction[..., 0] = 1.0 / np.sqrt(basis.shape[-2])
      fields[side] = jnp.asarray(direction)
      fields[side + '_count'] = jnp.ones_like(getattr(mem, side + '_count'))
    return so.continual.ProtectedSubspace(**fields)

  return jax.tree.map(fill, memory, is_leaf=lambda x: isinstance(
      x, so.continual.ProtectedSubspace))


_LR = 1e-2
_SMALL = dict(rank=RANK, refresh=REFRESH, dimension_numbers=so.last_two_axes)


def _column_scale() -> so.Factorization:
  """A user-built factorisation for ``so.reparameterize``: one trained scale
  per column, ``W(c) = W_0 diag(c)`` (``c_0 = 1``)."""

  def init(w, key, path):
    del key, path
    return {'scale': jnp.ones(w.shape[:-2] + w.shape[-1:], w.dtype)}, {'w': w}

  def reconstruct(factors, frozen):
    return frozen['w'] * factors['scale']

  return so.Factorization('column_scale', init, reconstruct)


# The fine-tuning presets reparameterise every matrix and freeze the rest by
# default; ``others`` trains the vector ``b`` so that every leaf moves.
_FINETUNE = dict(learning_rate=_LR, rank=RANK, others=optax.adam(_LR))


def _entries() -> list[Entry]:
  small = dict(learning_rate=_LR, **_SMALL)
  continual = so.continual
  return [
      # The pipeline with different inners, bases, refresh handling, residual.
      Entry('low_rank_adam', so.low_rank,
            dict(inner=optax.scale_by_adam(), basis='randomized', **_SMALL)),
      Entry('low_rank_lion_svd_transport', so.low_rank,
            dict(inner=optax.scale_by_lion(), basis='svd',
                 on_refresh='transport', **_SMALL)),
      Entry('low_rank_momentum_reset_reference', so.low_rank,
            dict(inner=optax.trace(0.9), basis='svd', on_refresh='reset',
                 side='reference', **_SMALL)),
      Entry('low_rank_sign_residual', so.low_rank,
            dict(inner=so.transforms.scale_by_torch_adam(),
                 residual=optax.scale_by_sign(), basis='svd', **_SMALL)),
      # Named methods.
      Entry('galore', so.galore, small),
      Entry('galore_reference_reset', so.galore,
            dict(side='reference', on_refresh='reset',
                 eps_before_bias_correction=False, weight_decay=0.1, **small)),
      Entry('galore_bf16_state', so.galore,
            dict(mu_dtype=jnp.bfloat16, basis_dtype=jnp.bfloat16,
                 precision='highest', on_refresh='transport', **small)),
      # Compact side: on the sharding test's 8-device mesh the reference side
      # puts the DCT's FFT axis on a sharded dimension of 8 entries (1 per
      # device), and XLA's SPMD partitioner aborts the process on such FFTs
      # (fft_handler: size_per_partition % num_partitions). Real layers
      # (k >= 64 entries per device) are not affected.
      Entry('dct_adamw', so.dct_adamw, dict(side='compact', **small)),
      Entry('i3s', so.i3s, small),
      Entry('golore', so.golore, small),
      Entry('online_subspace_descent', so.online_subspace_descent,
            dict(learning_rate=_LR, rank=RANK, initial='svd',
                 dimension_numbers=so.last_two_axes)),
      Entry('online_subspace_descent_lagged_lion', so.online_subspace_descent,
            dict(learning_rate=_LR, rank=RANK, inner='lion', lagged=True,
                 initial='svd', dimension_numbers=so.last_two_axes)),
      Entry('apollo', so.apollo, small),
      Entry('apollo_mini', so.apollo_mini,
            dict(learning_rate=_LR, refresh=REFRESH,
                 dimension_numbers=so.last_two_axes)),
      Entry('fira', so.fira, small),
      Entry('frugal', so.frugal, small),
      Entry('q_galore', so.q_galore, dict(group_size=4, window=2, **small)),
      Entry('auon', so.auon, dict(learning_rate=_LR)),
      Entry('adamp', so.adamp, dict(learning_rate=_LR, weight_decay=0.1)),
      Entry('sgdp', so.sgdp, dict(learning_rate=_LR, momentum=0.9)),
      Entry('reset_moments_every', so.reset_moments_every,
            dict(inner=optax.adam(_LR), period=REFRESH)),
      Entry('project_radial', so.project_radial,
            dict(inner=optax.scale_by_adam(), weight_decay=0.1)),
      # Fine-tuning a pre-trained model (exact reparameterisation).
      Entry('reparameterize', so.reparameterize,
            dict(factorization=_column_scale(), inner=optax.adam(_LR),
                 others=optax.adam(_LR))),
      Entry('svfit', so.svfit, _FINETUNE),
      Entry('salt', so.salt, dict(lora_rank=2, **_FINETUNE)),
      Entry('effort', so.effort, _FINETUNE),
      Entry('effort_orthogonal', so.effort,
            dict(constraint='orthogonal', **_FINETUNE)),
      Entry('milora', so.milora, _FINETUNE),
      Entry('pissa', so.pissa, _FINETUNE),
      Entry('lora', so.lora, dict(alpha=4.0, **_FINETUNE)),
      # Continual learning.
      Entry('orthogonal_to', continual.orthogonal_to,
            dict(dimension_numbers=so.last_two_axes),
            params_kwargs=lambda p: dict(memory=_memory(p))),
      Entry('orthogonal_to_wrapping_adam', continual.orthogonal_to,
            dict(dimension_numbers=so.last_two_axes, inner=optax.adam(_LR),
                 unprotected='freeze'),
            params_kwargs=lambda p: dict(memory=_memory(p))),
      Entry('gpm', continual.gpm, dict(learning_rate=_LR, momentum=0.9)),
      Entry('gpm_ewc', continual.gpm_ewc,
            dict(learning_rate=_LR, strength=0.5,
                 dimension_numbers=so.last_two_axes),
            params_kwargs=lambda p: dict(memory=_memory(p, 'left'))),
      Entry('sculpt', continual.sculpt, dict(learning_rate=_LR)),
      Entry('ewc', continual.ewc, dict(strength=0.5),
            params_kwargs=lambda p: dict(
                anchor=jax.tree.map(jnp.zeros_like, p),
                fisher=jax.tree.map(jnp.ones_like, p))),
      Entry('l2_to_anchor', continual.l2_to_anchor, dict(strength=0.5),
            params_kwargs=lambda p: dict(
                anchor=jax.tree.map(jnp.zeros_like, p))),
  ]


REGISTRY: dict[str, Entry] = {e.name: e for e in _entries()}
NAMES = sorted(REGISTRY)

# Public callables of subspace_optax (top level and ``continual``) that are not
# optimizer methods: functions on arrays, states, memories and metrics,
# schedules, and the stages the registered methods are built from (tested
# through them; residual stages need the pipeline's extra args).
NOT_METHODS = frozenset({
    # Layout, memory and tools on states.
    'last_two_axes', 'conv_kernels', 'summary', 'accuracy_summary', 'FullSizeWarning',
    'state_bytes', 'check_compatible', 'state_shardings', 'static_args',
    # Functions on arrays, states and schedules.
    'dequantize', 'quantize', 'stochastic_round', 'refactorize',
    'reset_moments', 'subspace_norm_ratio',
    # Stages of the registered methods.
    'scale_by_auon', 'scale_by_aspect_ratio', 'clip_norm_growth',
    'apollo_scaling', 'scale_gradient_by_subspace', 'fira_residual',
    'scale_residual_by_subspace',
    # Wrappers around any optimizer, tested in their own files (q_galore
    # above keeps its moments through quantize_moments by default).
    'quantize_moments', 'master_weights', 'stochastic_rounding',
    # continual: memories, schedules and metrics.
    'activation_importance', 'add_directions', 'consolidate_ewc',
    'empty_memory', 'fisher_diagonal', 'get_memory', 'gpm_memory',
    'gradient_memory', 'project_out', 'protected_fraction', 'rewarm_schedule',
    'sculpt_capacity', 'sculpt_memory', 'set_memory', 'accuracy_matrix',
    'average_accuracy', 'backward_transfer', 'forgetting', 'forward_transfer',
    'record', 'summary', 'layer_inputs', 'released_rank',
    # continual: a memory from the weights' singular vectors (for orthogonal_to).
    'weight_subspace_basis',
    # low_rank with a fixed basis from the weights' values (init needs concrete
    # params): tests/weight_subspace_test.py.
    'weight_subspace',
    # Checkpoints (tests/checkpoint_test.py, tests/checkpoint_faults_test.py).
    'check_config', 'save_checkpoint', 'restore_checkpoint', 'restore_latest',
    # A train step, not a transform (tests/per_layer_test.py runs the registry
    # through it).
    'per_layer_train_step',
})


def public_callables() -> set[str]:
  """Every public non-class callable of subspace_optax and its continual."""
  names = set()
  for module in (so, so.continual):
    for name in module.__all__:
      value = getattr(module, name)
      if callable(value) and not inspect.isclass(value):
        names.add(name)
  return names


def subspace_states(state) -> list:
  """Every :class:`SubspaceState` inside an optimizer state."""
  is_subspace = lambda x: isinstance(x, so.SubspaceState)
  return [s for s in jax.tree.leaves(state, is_leaf=is_subspace)
          if is_subspace(s)]


def protected_states(state) -> list:
  """Every ``OrthogonalState`` (protected memory) inside an optimizer state."""
  kind = so.continual.OrthogonalState
  is_memory = lambda x: isinstance(x, kind)
  return [s for s in jax.tree.leaves(state, is_leaf=is_memory) if is_memory(s)]


# Methods that hold no basis and no protected memory (plain full-rank
# optimizers and regularisers): the NaN-refresh contract does not apply to them.
# Listed, so that a method that loses its basis fails a test instead of being
# skipped.
WITHOUT_BASIS = frozenset({
    'adamp', 'auon', 'ewc', 'l2_to_anchor', 'project_radial',
    'reset_moments_every', 'sgdp',
    # Reparameterised fine-tuning: the singular vectors are computed once at
    # init from the weights and never refreshed from a gradient.
    'reparameterize', 'svfit', 'salt', 'effort', 'effort_orthogonal',
    'milora', 'pissa', 'lora'})


def basis_and_memory(state) -> list:
  """The parts of a state that must never hold a NaN: bases and memories."""
  return ([s.basis for s in subspace_states(state)]
          + [s.memory for s in protected_states(state)])
