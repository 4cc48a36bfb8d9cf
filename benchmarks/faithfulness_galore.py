"""Faithfulness of ``subspace_optax.galore`` to the PyTorch reference.

Feeds one seeded gradient stream to galore-torch's ``GaLoreAdamW`` (PyPI
``galore-torch==1.0``, ``proj_type='std'``) and to ``subspace_optax.galore``
configured like it (``side='reference'``, ``basis='svd'``, ``stagger=False``,
the PyTorch Adam formula with ``eps=1e-6`` added before the bias correction),
and compares the per-step updates (parameter changes) and the projectors.

What is measured (one JSON object on stdout):

* ``first_period_max_rel_update_diff``: steps ``0..T-1`` (the first basis; no
  moment has crossed a refresh yet), ``max |u_ours - u_ref| / max |u_ref|``.
* ``refresh_subspace_distance``: at every refresh, ``max |PPᵀ - QQᵀ|`` between
  the reference's projector and the basis in our optimizer state.
* ``after_refresh``: steps ``T..N-1``. The singular vectors' signs are
  arbitrary and GaLore keeps its moments across a refresh, so a column whose
  sign flips silently negates its first moment. Each run is repeated under
  other, equally valid sign conventions of the same SVD (``transpose``: the SVD
  of ``Gᵀ``, as another backend may compute it; ``svd_flip``: largest entry
  positive, scikit-learn's choice), which shows that (i) the reference's
  updates depend on the convention, (ii) ours with ``align_signs=True`` do not,
  (iii) ours with ``align_signs=False`` equal the reference whenever both store
  the same vectors (``svd_flip``), and (iv) ours with ``align_signs=True`` equal the
  reference with the same sign alignment added to its projector.
* ``state_bytes``: optimizer state of the reference side vs the default
  ``side='compact'`` (the basis on the larger side: smaller moments).
* ``conditioning``: each float32 implementation against GaLore in float64, on
  the well-conditioned ``flat`` stream and on a ``gaussian`` one, where the
  reference's own float32 error exceeds 1e-5 (Adam's ``m / (sqrt(v) + eps)``
  is ill-conditioned for coefficients near zero).

Run: ``python -m benchmarks.faithfulness_galore [--out FILE]`` (needs the
``reference`` extra; see benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import platform
import sys
import time
from typing import Any, Sequence

if __package__ in (None, ''):  # run as a script: make the repo importable
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp
import numpy as np
import optax

import subspace_optax as so
from benchmarks.reference import galore_torch_runner as reference

CONVENTIONS = reference.CONVENTIONS
# Conventions that depend only on the singular vectors, not on how they were
# computed: under these both implementations store the very same vectors.
# ('lapack' and 'transpose' depend on the matrix handed to LAPACK, which is G
# for the reference but our oriented view, Gᵀ for an m >= n matrix.)
INTRINSIC = ('svd_flip',)
BOUND = 1e-5  # relative update difference and subspace distance


@dataclasses.dataclass(frozen=True)
class Config:
  shapes: tuple[tuple[int, int], ...] = ((64, 48), (32, 80))
  rank: int = 8
  refresh: int = 5
  steps: int = 13  # refreshes at 0, 5, 10: about 2.5 periods
  learning_rate: float = 0.01
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-6
  scale: float = 0.25
  noise: float = 0.02  # spectral norm of the per-step noise, relative to s_0 = 1
  seed: int = 0
  stream: str = 'flat'  # 'flat' (well conditioned) or 'gaussian'
  # Conventions to repeat the runs under (the first is the reference's own).
  conventions: tuple[str, ...] = CONVENTIONS


SMALL = Config(
    shapes=((16, 12), (8, 20)), rank=4, refresh=3, steps=8,
    conventions=('lapack', 'svd_flip'),
)


# ------------------------------------------------------------ gradient stream


def _flat_singular_vectors(rng, dim: int, rank: int) -> np.ndarray:
  """``dim x min(dim, ...)`` orthogonal matrix whose first ``rank`` columns have
  entries ``±1/sqrt(dim)`` (tiled Hadamard columns, random row signs and
  order); the other columns are random."""
  order = 1 << max(rank - 1, 0).bit_length()
  if dim % order:
    raise ValueError(f'dimension {dim} must be a multiple of {order}')
  hadamard = np.ones((1, 1))
  while hadamard.shape[0] < order:
    hadamard = np.block([[hadamard, hadamard], [hadamard, -hadamard]])
  flat = np.tile(hadamard[:, :rank], (dim // order, 1)) / np.sqrt(dim)
  flat = (rng.choice([-1.0, 1.0], size=(dim, 1)) * flat)[rng.permutation(dim)]
  completed, _ = np.linalg.qr(
      np.concatenate([flat, rng.standard_normal((dim, dim - rank))], axis=1))
  return completed


def gradient_stream(config: Config) -> list[list[np.ndarray]]:
  """``gradients[step][leaf]``: a fixed low-rank-dominated signal plus noise.

  Each matrix is ``U diag(s) Vᵀ (1 + 0.3 sin t) + noise_t`` with
  ``s_j = 0.8^j``: every singular value is 20 % above the next, so the top-r
  singular vectors are well defined (both SVDs agree to float32 accuracy),
  while the noise moves the subspace a little between refreshes.

  ``stream='flat'``: the top-``rank`` singular vectors have entries
  ``±1/sqrt(dim)``, so no projected coefficient is near zero and Adam's
  ``m / (sqrt(v) + eps)`` is well conditioned: a 1e-5 bound then tests the
  algorithm, not float32 rounding. ``stream='gaussian'``: random singular
  vectors, so some coefficients are tiny and their ratio ``m / sqrt(v)`` is
  set by rounding (see ``conditioning`` in the report).
  """
  rng = np.random.default_rng(config.seed)
  signals = []
  for m, n in config.shapes:
    k = min(m, n)
    if config.stream == 'flat':
      u = _flat_singular_vectors(rng, m, config.rank)[:, :k]
      v = _flat_singular_vectors(rng, n, config.rank)[:, :k]
    elif config.stream == 'gaussian':
      u, _ = np.linalg.qr(rng.standard_normal((m, k)))
      v, _ = np.linalg.qr(rng.standard_normal((n, k)))
    else:
      raise ValueError(f'unknown stream {config.stream!r}')
    signals.append((u * 0.8 ** np.arange(k)) @ v.T)
  stream = []
  for t in range(config.steps):
    step = []
    for (m, n), signal in zip(config.shapes, signals):
      sigma = config.noise / (np.sqrt(m) + np.sqrt(n))
      noise = sigma * rng.standard_normal((m, n))
      step.append((signal * (1 + 0.3 * np.sin(t)) + noise).astype(np.float32))
    stream.append(step)
  return stream


# ---------------------------------------------------------------- our side


def _max_abs_positive(vectors: jax.Array) -> jax.Array:
  index = jnp.argmax(jnp.abs(vectors), axis=0)
  signs = jnp.sign(vectors[index, jnp.arange(vectors.shape[1])])
  return vectors * jnp.where(signs == 0, 1.0, signs)


def convention_basis(convention: str) -> str | so.bases.BasisMethod:
  """The exact-SVD basis under a given sign convention ('lapack': the library's)."""
  if convention == 'lapack':
    return 'svd'
  if convention not in CONVENTIONS:
    raise ValueError(f'convention must be one of {CONVENTIONS}')

  def refresh(g, old, key, align):
    del key
    g = g.astype(jnp.float32)
    if convention == 'transpose':
      _, _, vh = jnp.linalg.svd(g.T, full_matrices=False)
      vectors = vh.T
    else:
      vectors, _, _ = jnp.linalg.svd(g, full_matrices=False)
    vectors = vectors[:, : old.shape[1]]
    if convention == 'svd_flip':
      vectors = _max_abs_positive(vectors)
    return so.bases.align_signs(vectors, old) if align else vectors

  return so.bases.svd()._replace(name=f'svd_{convention}', refresh=refresh)


def _subspace_state(opt_state) -> so.SubspaceState:
  found = [
      s for s in jax.tree.leaves(
          opt_state, is_leaf=lambda x: isinstance(x, so.SubspaceState))
      if isinstance(s, so.SubspaceState)
  ]
  if len(found) != 1:
    raise ValueError(f'expected one SubspaceState, found {len(found)}')
  return found[0]


def run_subspace_optax(
    gradients: Sequence[Sequence[np.ndarray]],
    config: Config,
    *,
    side: str = 'reference',
    align_signs: bool = True,
    convention: str = 'lapack',
) -> dict[str, Any]:
  """Our ``galore`` on the stream: updates, refresh-step bases, state bytes."""
  tx = so.galore(
      config.learning_rate, rank=config.rank,
      refresh=config.refresh, scale=config.scale, b1=config.b1,
      b2=config.b2, eps=config.eps, eps_before_bias_correction=True,
      weight_decay=0.0, side=side, basis=convention_basis(convention),
      stagger=False, align_signs=align_signs,
  )
  params = [jnp.zeros(g.shape, jnp.float32) for g in gradients[0]]
  state = tx.init(params)
  update = jax.jit(tx.update)
  updates, bases = [], {}
  for step, step_gradients in enumerate(gradients):
    grads = [jnp.asarray(g) for g in step_gradients]
    out, state = update(grads, state, params)
    updates.append([np.asarray(u) for u in out])
    if step % config.refresh == 0:
      bases[step] = [np.asarray(b) for b in _subspace_state(state).basis]
  return {'updates': updates, 'bases': bases,
          'state_bytes': so.state_bytes(state)}


def run_reference(gradients, config: Config, *, convention=None,
                  align_signs=False, dtype='float32') -> dict[str, Any]:
  return reference.run_galore_adamw(
      gradients, rank=config.rank, refresh=config.refresh,
      scale=config.scale, learning_rate=config.learning_rate,
      betas=(config.b1, config.b2), eps=config.eps, convention=convention,
      align_signs=align_signs, dtype=dtype,
  )


# ----------------------------------------------------------------- metrics


def max_relative_difference(ours, ref, steps: Sequence[int]) -> float:
  """``max`` over steps and leaves of ``max |a - b| / max |b|``."""
  worst = 0.0
  for s in steps:
    for a, b in zip(ours[s], ref[s]):
      a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
      worst = max(worst, float(np.max(np.abs(a - b)) / np.max(np.abs(b))))
  return worst


def frobenius_relative_difference(ours, ref, steps: Sequence[int]) -> float:
  """``max`` over steps and leaves of ``|a - b|_F / |b|_F``."""
  worst = 0.0
  for s in steps:
    for a, b in zip(ours[s], ref[s]):
      a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
      worst = max(worst, float(np.linalg.norm(a - b) / np.linalg.norm(b)))
  return worst


def conditioning(config: Config) -> dict[str, Any]:
  """How far each float32 implementation is from GaLore in float64.

  The "exact" run is the reference with its sign-aligned projector in float64
  throughout (SVD included). Over all steps, it is compared with ours (aligned,
  float32) and with the reference (sign-aligned, float32 as published), so
  ours can be judged against the reference's own float32 error.
  """
  gradients = gradient_stream(config)
  steps = range(config.steps)
  runs = {
      'ours': run_subspace_optax(gradients, config),
      'reference': run_reference(
          gradients, config, convention='lapack', align_signs=True),
  }
  exact = run_reference(gradients, config, convention='lapack',
                        align_signs=True, dtype='float64')
  u = lambda run: run['updates']
  return {
      'stream': config.stream,
      'max_rel_vs_float64': {
          name: max_relative_difference(u(run), u(exact), steps)
          for name, run in runs.items()},
      'frobenius_rel_vs_float64': {
          name: frobenius_relative_difference(u(run), u(exact), steps)
          for name, run in runs.items()},
      'ours_vs_reference_max_rel': max_relative_difference(
          u(runs['ours']), u(runs['reference']), steps),
  }


def subspace_distance(p: np.ndarray, q: np.ndarray) -> float:
  """``max |PPᵀ - QQᵀ|`` for bases with orthonormal columns."""
  p, q = p.astype(np.float64), q.astype(np.float64)
  return float(np.max(np.abs(p @ p.T - q @ q.T)))


def flipped_fraction(bases: dict[int, list[np.ndarray]]) -> float:
  """Fraction of basis columns at refreshes after the first whose sign
  disagrees with the previous basis's (negative dot product)."""
  steps = sorted(bases)
  flipped = total = 0
  for before, after in zip(steps, steps[1:]):
    for old, new in zip(bases[before], bases[after]):
      dots = np.sum(old * new, axis=0)
      flipped += int(np.sum(dots < 0))
      total += dots.size
  return flipped / max(total, 1)


def _state_bytes_at_scale(shape, rank) -> dict[str, int]:
  params = [jax.ShapeDtypeStruct(shape, jnp.float32)]
  out = {}
  for side in ('reference', 'compact'):
    tx = so.galore(1e-3, rank=rank, side=side, stagger=False)
    out[side] = so.state_bytes(jax.eval_shape(tx.init, params))
  return out


def measure(
    config: Config = Config(),
    conditioning_streams: Sequence[str] = ('flat', 'gaussian'),
) -> dict[str, Any]:
  """Run every comparison and return the report (see the module docstring)."""
  start = time.perf_counter()
  gradients = gradient_stream(config)
  period = config.refresh
  first_period = range(min(period, config.steps))
  after = range(period, config.steps)
  everything = range(config.steps)
  refresh_steps = list(range(0, config.steps, period))

  ref = run_reference(gradients, config)
  ref_by = {c: run_reference(gradients, config, convention=c)
            for c in config.conventions}
  ref_aligned = run_reference(gradients, config, convention='lapack',
                              align_signs=True)
  ours_by = {
      (c, a): run_subspace_optax(gradients, config, align_signs=a, convention=c)
      for c in config.conventions for a in (False, True)
  }
  ours = ours_by[('lapack', True)]  # the library's defaults on this side
  compact = run_subspace_optax(gradients, config, side='compact')

  u = lambda run: run['updates']
  distances = {
      str(s): max(subspace_distance(p, q)
                  for p, q in zip(ref['bases'][s], ours['bases'][s]))
      for s in refresh_steps
  }
  if config.conventions[0] != 'lapack':
    raise ValueError("conventions must start with 'lapack'")
  base = 'lapack'
  others = config.conventions[1:]
  sensitivity = {
      'reference': {c: max_relative_difference(u(ref_by[c]), u(ref_by[base]), after)
                    for c in others},
      'ours_align_signs_false': {
          c: max_relative_difference(u(ours_by[(c, False)]),
                                     u(ours_by[(base, False)]), after)
          for c in others},
      'ours_align_signs_true': {
          c: max_relative_difference(u(ours_by[(c, True)]),
                                     u(ours_by[(base, True)]), after)
          for c in others},
  }
  after_refresh = {
      'steps': [after.start, after.stop - 1],
      'ours_align_signs_false_vs_reference': max_relative_difference(
          u(ours_by[('lapack', False)]), u(ref), after),
      'ours_align_signs_true_vs_reference': max_relative_difference(
          u(ours), u(ref), after),
      'ours_align_signs_false_vs_reference_same_convention': {
          c: max_relative_difference(u(ours_by[(c, False)]), u(ref_by[c]), after)
          for c in config.conventions if c in INTRINSIC},
      'ours_align_signs_true_vs_sign_aligned_reference_all_steps':
          max_relative_difference(u(ours), u(ref_aligned), everything),
      'sign_convention_sensitivity': sensitivity,
      'flipped_column_fraction_at_refresh': {
          'reference': flipped_fraction(ref['bases']),
          'ours_align_signs_false': flipped_fraction(
              ours_by[('lapack', False)]['bases']),
          'ours_align_signs_true': flipped_fraction(ours['bases']),
      },
  }
  scale_shape, scale_rank = (4096, 11008), 512
  at_scale = _state_bytes_at_scale(scale_shape, scale_rank)
  state = {
      'benchmark_shapes': {
          'reference_side': ours['state_bytes'],
          'compact_side': compact['state_bytes'],
          'galore_torch': ref['state_bytes'],
      },
      f'{scale_shape[0]}x{scale_shape[1]}_rank_{scale_rank}': {
          'reference_side': at_scale['reference'],
          'compact_side': at_scale['compact'],
          'compact_over_reference': at_scale['compact'] / at_scale['reference'],
      },
  }
  first = max_relative_difference(u(ours), u(ref), first_period)
  first_unaligned = max_relative_difference(
      u(ours_by[('lapack', False)]), u(ref), first_period)
  checks = {
      'first_period_max_rel_update_diff <= 1e-5': max(first, first_unaligned) <= BOUND,
      'refresh_subspace_distance <= 1e-5': max(distances.values()) <= BOUND,
      'the convention projector reproduces the reference exactly (lapack)':
          max_relative_difference(u(ref_by['lapack']), u(ref), everything) == 0.0,
      'ours aligned == sign-aligned reference (<= 1e-5)':
          after_refresh['ours_align_signs_true_vs_sign_aligned_reference_all_steps']
          <= BOUND,
      'ours unaligned == reference under the same convention (<= 1e-5)': max(
          after_refresh['ours_align_signs_false_vs_reference_same_convention']
          .values(), default=0.0) <= BOUND,
      'ours aligned is convention-independent (<= 1e-5)': max(
          sensitivity['ours_align_signs_true'].values(), default=0.0) <= BOUND,
      'reference is convention-dependent (> 1e-2)': min(
          sensitivity['reference'].values(), default=1.0) > 1e-2,
  }
  return {
      'benchmark': 'faithfulness_galore',
      'versions': {
          'python': platform.python_version(), 'jax': jax.__version__,
          'optax': optax.__version__, 'subspace_optax': so.__version__,
          **reference.versions(),
      },
      'config': dataclasses.asdict(config),
      'update_max_abs': max(float(np.max(np.abs(x))) for s in u(ref) for x in s),
      'first_period_max_rel_update_diff': first,
      'first_period_max_rel_update_diff_align_signs_false': first_unaligned,
      'first_period_frobenius_rel_update_diff': frobenius_relative_difference(
          u(ours), u(ref), first_period),
      'refresh_subspace_distance': distances,
      'after_refresh': after_refresh,
      'state_bytes': state,
      'conditioning': [
          conditioning(dataclasses.replace(config, stream=stream))
          for stream in conditioning_streams
      ],
      'checks': checks,
      'pass': all(checks.values()),
      'seconds': round(time.perf_counter() - start, 2),
  }


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--out', type=pathlib.Path, help='also write the JSON here')
  parser.add_argument('--small', action='store_true',
                      help='the tiny configuration of tests/faithfulness_test.py')
  parser.add_argument('--seed', type=int, default=0)
  args = parser.parse_args(argv)
  config = dataclasses.replace(SMALL if args.small else Config(), seed=args.seed)
  report = measure(config)
  text = json.dumps(report, indent=2)
  print(text)
  if args.out:
    args.out.write_text(text + '\n')
  return 0 if report['pass'] else 1


if __name__ == '__main__':
  sys.exit(main())
