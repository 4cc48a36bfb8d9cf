"""Checkpoints of an NNX model and optimizer with orbax, plus the run config.

Layout of a run directory::

  <run>/config.json          the settings that determine the trajectory
  <run>/checkpoints/<step>/  state (model + optimizer) and progress (JSON)

Saving is synchronous (``enable_async_checkpointing=False``) so a checkpoint is
complete when :func:`save` returns. Restoring goes into an abstract target
(``nnx.eval_shape`` of the model and optimizer, with shardings attached): that
keeps the optimizer state's NamedTuples and ``optax.MaskedNode`` leaves, which a
target-less restore would turn into dicts, lists and ``None``.
Optimizer states hold no PRNG keys and batches are a pure function of the step,
so resuming reproduces the uninterrupted run bit for bit.

Saving and restoring go through the library's ``so.save_checkpoint`` and
``so.restore_latest``: a process killed while saving leaves no step behind, and
a step that cannot be read (truncated, corrupted) is skipped with a warning
naming it, for the previous one.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import nnx

import subspace_optax as so

CONFIG_FILE = 'config.json'


class ConfigMismatchError(so.CheckpointMismatchError):
  """The checkpoint directory was written by a run with another config."""


def write_config(run_dir: str | pathlib.Path, config: dict[str, Any]) -> None:
  path = pathlib.Path(run_dir)
  path.mkdir(parents=True, exist_ok=True)
  (path / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True))


def read_config(run_dir: str | pathlib.Path) -> dict[str, Any] | None:
  path = pathlib.Path(run_dir) / CONFIG_FILE
  return json.loads(path.read_text()) if path.exists() else None


def check_config(run_dir: str | pathlib.Path, config: dict[str, Any]) -> None:
  """Raise :class:`ConfigMismatchError` naming every key that differs."""
  stored = read_config(run_dir)
  if stored is None:
    raise ConfigMismatchError(
        f'{pathlib.Path(run_dir) / CONFIG_FILE} is missing; cannot check that '
        'the checkpoint matches this run.')
  # Normalise through JSON so tuples compare equal to the stored lists.
  current = json.loads(json.dumps(config))
  differing = sorted(
      k for k in set(stored) | set(current) if stored.get(k) != current.get(k))
  if differing:
    details = '; '.join(
        f'{k}: checkpoint {stored.get(k)!r} vs now {current.get(k)!r}'
        for k in differing)
    raise ConfigMismatchError(
        f'Refusing to resume from {run_dir}: it was written with a different '
        f'config ({details}). Resume with the same settings or use another '
        '--out directory.')


def manager(run_dir: str | pathlib.Path, keep: int) -> ocp.CheckpointManager:
  """A synchronous CheckpointManager keeping the ``keep`` latest steps."""
  return ocp.CheckpointManager(
      pathlib.Path(run_dir).absolute() / 'checkpoints',
      options=ocp.CheckpointManagerOptions(
          preservation_policy=ocp.checkpoint_managers.LatestN(keep),
          enable_async_checkpointing=False,
          create=True))


def save(mngr: ocp.CheckpointManager, step: int, model: nnx.Module,
         optimizer: nnx.Optimizer, progress: dict[str, Any]) -> None:
  """Save model and optimizer state and a JSON ``progress`` record."""
  state = {'model': nnx.state(model), 'optimizer': nnx.state(optimizer)}
  so.save_checkpoint(mngr, step, state, progress=progress)


def abstract_state(model_and_optimizer, shardings=None):
  """The ``{'model', 'optimizer'}`` state of an abstract pair as restore target.

  Args:
    model_and_optimizer: ``(model, optimizer)`` from ``nnx.eval_shape``.
    shardings: optional pytree of ``jax.sharding.Sharding`` with the structure
      of the returned state; leaves are restored onto them.
  """
  model, optimizer = model_and_optimizer
  state = {'model': nnx.state(model), 'optimizer': nnx.state(optimizer)}
  if shardings is None:
    return state
  return jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
      state, shardings)


def restore(mngr: ocp.CheckpointManager, step: int, target):
  """``(state, progress)`` of checkpoint ``step``, restored onto ``target``;
  ``so.CheckpointCorruptError`` if it cannot be read."""
  return so.restore_checkpoint(mngr, step, target)


def restore_latest(mngr: ocp.CheckpointManager, target):
  """``(step, state, progress)`` of the newest readable checkpoint (an
  unreadable one is skipped with ``so.CheckpointSkippedWarning``), or
  ``(None, None, None)``."""
  return so.restore_latest(mngr, target)
