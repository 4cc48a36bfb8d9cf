"""Step-time summaries shared by the JAX and PyTorch sides of the speed
benchmark (no JAX or torch import, so either process can use it)."""

from __future__ import annotations

import statistics
from typing import Any, Sequence


def gradient_count(refresh: int) -> int:
  """How many distinct gradients to cycle: not a divisor of the period, so a
  leaf's consecutive refreshes see different gradients."""
  return next(n for n in (3, 4, 5, 7, 11) if refresh % n)


def summary(times: Sequence[float], refreshed: Sequence[bool]) -> dict[str, Any]:
  """Medians of steady and refresh steps, max and mean, in milliseconds."""
  steady = [t for t, r in zip(times, refreshed) if not r]
  spikes = [t for t, r in zip(times, refreshed) if r]
  return {
      'median_ms': statistics.median(times),
      'steady_median_ms': statistics.median(steady) if steady else None,
      'refresh_median_ms': statistics.median(spikes) if spikes else None,
      'refresh_max_ms': max(spikes) if spikes else None,
      'max_ms': max(times),
      'mean_ms': statistics.fmean(times),
      'timed_steps': len(times),
      'refresh_steps': len(spikes),
  }
