"""Shared helpers of the speed and memory benchmarks: timing a jitted step,
telling refresh steps from steady ones, XLA's and the device's memory figures,
the HBM roofline, and the environment a result was measured in."""

from __future__ import annotations

import contextlib
import os
import platform
import time
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

import subspace_optax as so

# HBM bandwidth in GB/s by device kind (vendor figures, SXM parts).
HBM_BANDWIDTH_GBS = {'H100': 3350.0, 'H200': 4800.0, 'A100': 2039.0}


# ----------------------------------------------------------------------------
# Timing.


_BASIS_FIELDS = ('basis', 'refresh', 'projector')


def _is_basis_holder(x) -> bool:
  return any(f in getattr(x, '_fields', ()) for f in _BASIS_FIELDS)


@jax.jit
def basis_fingerprint(opt_state) -> jax.Array:
  """One number per basis leaf and refresh-schedule leaf.

  Covers subspace_optax states (``basis`` and the refresh policy's state, which
  changes exactly when a leaf refreshes) and optax.contrib's ``projector``.
  Computed between timed steps, never inside them.
  """
  sums = [jnp.zeros([], jnp.float32)]
  for node in jax.tree.leaves(opt_state, is_leaf=_is_basis_holder):
    if _is_basis_holder(node):
      for field in _BASIS_FIELDS:
        if field in node._fields:
          sums += [jnp.sum(jnp.abs(x.astype(jnp.float32)))
                   for x in jax.tree.leaves(getattr(node, field))
                   if hasattr(x, 'dtype')]
  return jnp.stack(sums)


def overdue_refreshes(opt_state) -> int:
  """Leaves whose scheduled refresh is overdue after the run.

  A refresh whose result is not finite is discarded and stays due (the old
  basis is kept), so a leaf that stays overdue runs its refresh on every step
  and never gets a new basis. Counts ``refresh.every`` schedules
  (``next_refresh``) of every ``SubspaceState`` in ``opt_state``.
  """
  overdue = 0
  holders = [x for x in jax.tree.leaves(
      opt_state, is_leaf=lambda x: isinstance(x, so.SubspaceState))
             if isinstance(x, so.SubspaceState)]
  for state in holders:
    last = int(state.count) - 1  # the count of the last update
    for schedule in jax.tree.leaves(
        state.refresh, is_leaf=lambda x: hasattr(x, 'next_refresh')):
      if hasattr(schedule, 'next_refresh') and int(schedule.next_refresh) <= last:
        overdue += 1
  return overdue


def timed_loop(step, carry, inputs_at, opt_state_of, warmup, timed):
  """Run ``warmup + timed`` steps; per timed step: (ms, basis changed?)."""
  times, refreshed = [], []
  previous = np.asarray(basis_fingerprint(opt_state_of(carry)))
  for i in range(warmup + timed):
    args = inputs_at(i)
    start = time.perf_counter()
    carry = jax.block_until_ready(step(*carry, *args))
    elapsed = 1e3 * (time.perf_counter() - start)
    current = np.asarray(basis_fingerprint(opt_state_of(carry)))
    if i >= warmup:
      times.append(elapsed)
      refreshed.append(bool(np.any(current != previous)))
    previous = current
  return times, refreshed, carry


def compiled_memory(compiled) -> Optional[dict[str, int]]:
  try:
    analysis = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except
    return None
  if analysis is None:
    return None
  fields = ('argument_size_in_bytes', 'output_size_in_bytes',
            'temp_size_in_bytes', 'alias_size_in_bytes')
  out = {f: int(getattr(analysis, f, 0) or 0) for f in fields}
  out['estimated_peak_bytes'] = (
      out['argument_size_in_bytes'] + out['output_size_in_bytes']
      + out['temp_size_in_bytes'] - out['alias_size_in_bytes'])
  return out


def peak_device_bytes() -> Optional[int]:
  try:
    stats = jax.local_devices()[0].memory_stats()
  except Exception:  # pylint: disable=broad-except
    return None
  return int(stats['peak_bytes_in_use']) if stats and (
      'peak_bytes_in_use' in stats) else None


def tree_bytes(tree) -> int:
  return int(so.state_bytes(tree))


def roofline(state_size: int, param_size: int, measured_ms: Optional[float],
              bandwidth_gbs: Optional[float]) -> Optional[dict[str, Any]]:
  if not bandwidth_gbs:
    return None
  moved = 2 * state_size + 3 * param_size
  roofline_ms = 1e3 * moved / (bandwidth_gbs * 1e9)
  return {'bytes_moved': moved, 'bandwidth_gbs': bandwidth_gbs,
          'roofline_ms': roofline_ms,
          'ratio': None if measured_ms is None else measured_ms / roofline_ms}


def hbm_bandwidth(override: Optional[float] = None) -> Optional[float]:
  """``override``, else the first device's HBM bandwidth (None on CPU)."""
  if override:
    return override
  kind = jax.devices()[0].device_kind
  for name, gbs in HBM_BANDWIDTH_GBS.items():
    if name in kind:
      return gbs
  return None


def ratio(a, b):
  """``a / b``, None when either is missing or ``b`` is 0."""
  return None if a is None or b is None or b == 0 else a / b


def timing_ratios(row, reference, key) -> dict[str, Any]:
  """Ratios of the step times ``row[key]`` to ``reference[key]``."""
  mine, theirs = row.get(key), reference.get(key)
  if not mine or not theirs:
    return {}
  steady = lambda t: t['steady_median_ms'] or t['median_ms']
  return {
      'median': ratio(mine['median_ms'], theirs['median_ms']),
      'steady': ratio(steady(mine), steady(theirs)),
      'amortised_mean': ratio(mine['mean_ms'], theirs['mean_ms']),
      'refresh_max': ratio(mine['refresh_max_ms'] or mine['max_ms'],
                           theirs['refresh_max_ms'] or theirs['max_ms']),
  }


# ----------------------------------------------------------------------------
# Environment.


def load_average() -> Optional[list[float]]:
  return [round(x, 2) for x in os.getloadavg()] if hasattr(
      os, 'getloadavg') else None


def versions() -> dict[str, Any]:
  return {'python': platform.python_version(), 'jax': jax.__version__,
          'optax': optax.__version__,
          'flax': getattr(__import__('flax'), '__version__', None)}


def blas_threads(threads: int):
  """A context limiting OpenBLAS threads (no-op if 0 or no threadpoolctl)."""
  try:
    import scipy.linalg  # pylint: disable=import-outside-toplevel,unused-import
    import threadpoolctl  # pylint: disable=import-outside-toplevel
  except ImportError:
    threads = 0
  if threads <= 0:
    return contextlib.nullcontext()
  return threadpoolctl.threadpool_limits(limits=threads, user_api='blas')
