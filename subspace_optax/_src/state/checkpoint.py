"""Checking that a saved optimizer state fits an optimizer before restoring it.

Orbax restores a state into a target built by ``jax.eval_shape(tx.init,
params)``. When the checkpoint was written by another configuration (another
rank, side, dimension numbers, method or chain order) its errors name neither
the leaf nor the cause, and one of them suggests disabling the shape check,
which would silently truncate a basis. :func:`check_compatible` compares the
two trees first and names every leaf that differs.

:func:`save_checkpoint`, :func:`restore_checkpoint` and :func:`restore_latest`
wrap an orbax ``CheckpointManager`` for long runs: a step that cannot be read
raises :class:`CheckpointCorruptError` naming it, and :func:`restore_latest`
falls back to the previous readable step with a warning; a step saved with
another config or state structure raises :class:`CheckpointMismatchError`
naming what differs.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any, Mapping, Optional

import jax
from jax.experimental import multihost_utils
import numpy as np

from subspace_optax._src import utils


STATE, PROGRESS, CONFIG = 'state', 'progress', 'config'


class CheckpointMismatchError(ValueError):
  """A checkpoint was written by another configuration: other shapes, another
  state structure (rank, method, chain order, params) or another run config.
  Every step of the run would differ the same way, so no earlier step is
  tried."""


class CheckpointCorruptError(ValueError):
  """A checkpoint step cannot be read (truncated, corrupted or missing files).
  Earlier steps may still be good: :func:`restore_latest` falls back to them.

  Attributes:
    step: the unreadable step (None when it names several).
    directory: its directory.
    reason: the reader's error, in one line.
  """

  def __init__(self, message: str, step: Optional[int] = None,
               directory: Optional[pathlib.Path] = None, reason: str = ''):
    super().__init__(message)
    self.step, self.directory, self.reason = step, directory, reason


class CheckpointSkippedWarning(UserWarning):
  """:func:`restore_latest` skipped an unreadable step for an earlier one."""


def _key_name(entry) -> str:
  for attribute in ('name', 'key', 'idx'):
    if hasattr(entry, attribute):
      return str(getattr(entry, attribute))
  return str(entry)


def _has_shape(x) -> bool:
  return hasattr(x, 'shape') and hasattr(x, 'dtype')


def _is_array(x) -> bool:
  """An array-like leaf. Containers that expose their value's shape (flax
  ``nnx.Variable``) are pytree nodes: they are walked into, as orbax does."""
  return _has_shape(x) and jax.tree_util.treedef_is_leaf(
      jax.tree.structure(x, is_leaf=lambda y: y is not x))


def _flat(tree) -> dict[str, tuple[tuple[int, ...], str]]:
  """``{'0/basis/w': (shape, dtype name)}`` for every array-like leaf."""
  leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_array)[0]
  return {
      '/'.join(_key_name(k) for k in path): (
          tuple(leaf.shape), np.dtype(leaf.dtype).name)
      for path, leaf in leaves if _has_shape(leaf)
  }


def check_compatible(abstract_state: Any, saved: Any) -> None:
  """Raise a :class:`CheckpointMismatchError` (a ``ValueError``) naming
  every leaf where ``saved`` does not fit.

  Args:
    abstract_state: the state the optimizer expects, e.g.
      ``jax.eval_shape(tx.init, params)`` (what orbax restores into).
    saved: what the checkpoint holds: orbax metadata
      (``ocp.StandardCheckpointer().metadata(path)``, its ``item_metadata``
      or ``.tree``), a restored state, or any pytree whose leaves have
      ``shape`` and ``dtype``. Containers may differ in kind (orbax metadata
      turns NamedTuples into dicts); leaves are matched by key path.

  Example::

    abstract = jax.eval_shape(tx.init, params)
    so.check_compatible(abstract, checkpointer.metadata(path))
    state = checkpointer.restore(path, abstract)

  Returns:
    None; raises :class:`CheckpointMismatchError` listing each leaf that does
    not fit.

  Examples:
    >>> import jax
    >>> import jax.numpy as jnp
    >>> import subspace_optax as so
    >>> tx = so.galore(1e-3, rank=2)
    >>> abstract = jax.eval_shape(tx.init, {'w': jnp.ones((8, 6))})
    >>> so.check_compatible(abstract, abstract)  # fits: returns None
    >>> other = jax.eval_shape(tx.init, {'w': jnp.ones((8, 5))})
    >>> so.check_compatible(abstract, other)
    Traceback (most recent call last):
    ...
    subspace_optax._src.state.checkpoint.CheckpointMismatchError: ...
  """
  for attribute in ('item_metadata', 'tree'):
    if hasattr(saved, attribute) and not _has_shape(saved):
      saved = getattr(saved, attribute)
  expected, found = _flat(abstract_state), _flat(saved)
  problems = []
  for path in sorted(set(expected) | set(found)):
    if path not in found:
      problems.append(f'  {path}: missing from the checkpoint '
                      f'(this optimizer holds {expected[path]})')
    elif path not in expected:
      problems.append(f'  {path}: in the checkpoint {found[path]}, but not '
                      'in this optimizer\'s state')
    elif expected[path] != found[path]:
      problems.append(f'  {path}: checkpoint {found[path]}, this optimizer '
                      f'{expected[path]}')
  if problems:
    raise CheckpointMismatchError(
        'The checkpoint does not fit this optimizer state ((shape, dtype) per '
        'leaf):\n' + '\n'.join(problems) + '\nIt was saved with another '
        'configuration (rank, side, dimension_numbers, method, chain order or '
        'memory capacity) '
        'or other params. Restore it with the optimizer it was saved with, or '
        'start a fresh state with tx.init(params). Do not disable orbax\'s '
        'shape check: a truncated or padded basis is silently wrong.')


def check_config(saved: Mapping[str, Any], current: Mapping[str, Any], *,
                 where: str = 'the checkpoint') -> None:
  """Raise :class:`CheckpointMismatchError` naming every key that differs.

  Both configs are compared after a JSON round trip (tuples equal lists), as
  they are stored in a checkpoint.

  Args:
    saved: the config stored with the checkpoint.
    current: the config of this run.
    where: what ``saved`` came from, for the message (a path or step).

  Returns:
    None; raises :class:`CheckpointMismatchError` listing each key whose value
    differs, is missing here or is missing there.

  Examples:
    >>> import subspace_optax as so
    >>> so.check_config({'rank': 4, 'tasks': 3}, {'rank': 4, 'tasks': 3})
    >>> so.check_config({'rank': 4, 'tasks': 3}, {'rank': 8, 'tasks': 3})
    Traceback (most recent call last):
    ...
    subspace_optax._src.state.checkpoint.CheckpointMismatchError: the checkpoint was saved with another config: rank: saved 4, now 8. ...
  """
  saved = json.loads(json.dumps(dict(saved)))
  current = json.loads(json.dumps(dict(current)))
  missing = object()
  differing = sorted(k for k in set(saved) | set(current)
                     if saved.get(k, missing) != current.get(k, missing))
  if differing:
    show = lambda c, k: repr(c[k]) if k in c else '(absent)'
    details = '; '.join(f'{k}: saved {show(saved, k)}, now {show(current, k)}'
                        for k in differing)
    raise CheckpointMismatchError(
        f'{where} was saved with another config: {details}. Resume with the '
        'settings it was saved with, or start a new run in another directory.')


def _step_dir(manager, step: int) -> pathlib.Path:
  """The directory of a complete step: ``<step>``, or ``<prefix>_<step>`` and
  zero-padded under the manager's ``step_prefix`` and
  ``step_format_fixed_length`` options (orbax's temporary directories,
  ``<step>.orbax-checkpoint-tmp-<n>``, never match)."""
  root = pathlib.Path(manager.directory)
  for path in root.iterdir() if root.is_dir() else ():
    number = path.name.rsplit('_', 1)[-1]
    if path.is_dir() and number.isdigit() and int(number) == step:
      return path
  return root / str(step)


def save_checkpoint(manager, step: int, state: Any, *,
                    progress: Optional[Mapping[str, Any]] = None,
                    config: Optional[Mapping[str, Any]] = None) -> None:
  """Save ``state`` (any pytree) as checkpoint ``step`` and wait until it is
  complete, with an optional JSON ``progress`` record and run ``config``.

  Orbax writes a step into a temporary directory and renames it when every
  file is written, so a process killed during the save leaves no step behind:
  :func:`restore_latest` then finds the previous complete one.

  Args:
    manager: an ``orbax.checkpoint.CheckpointManager``.
    step: the step number.
    state: a pytree of arrays (e.g. ``{'params': ..., 'opt_state': ...}``).
    progress: JSON-serialisable record of where the run is (data position,
      tasks finished, ...); returned by :func:`restore_latest`.
    config: JSON-serialisable settings that fix the trajectory (rank, method,
      number of tasks ...); :func:`restore_latest` refuses another one.

  Returns:
    None.

  Examples:
    >>> import tempfile
    >>> import jax.numpy as jnp
    >>> import orbax.checkpoint as ocp
    >>> import subspace_optax as so
    >>> manager = ocp.CheckpointManager(tempfile.mkdtemp())
    >>> so.save_checkpoint(manager, 1, {'w': jnp.ones(3)},
    ...                    progress={'step': 1}, config={'rank': 2})
    >>> manager.all_steps()
    [1]
  """
  # Imported here: orbax takes seconds to import, and only these need it.
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel

  items = {STATE: ocp.args.StandardSave(state),
           PROGRESS: ocp.args.JsonSave(dict(progress or {}))}
  if config is not None:
    items[CONFIG] = ocp.args.JsonSave(json.loads(json.dumps(dict(config))))
  manager.save(step, args=ocp.args.Composite(**items), force=True)
  manager.wait_until_finished()


def restore_checkpoint(manager, step: int, target: Any, *,
                       config: Optional[Mapping[str, Any]] = None
                       ) -> tuple[Any, dict[str, Any]]:
  """``(state, progress)`` of checkpoint ``step`` written by
  :func:`save_checkpoint`, restored onto ``target``.

  Args:
    manager: the ``orbax.checkpoint.CheckpointManager`` that saved it.
    step: the step to restore.
    target: the abstract state, e.g. ``jax.eval_shape(init, params)`` (with
      ``sharding=`` on the ``ShapeDtypeStruct`` leaves to restore sharded).
    config: this run's config; None skips the comparison.

  Returns:
    The restored state (with ``target``'s structure) and the progress record.

  Raises:
    CheckpointMismatchError: the step was saved with another config, or its
      leaves do not fit ``target`` (each differing leaf is named).
    CheckpointCorruptError: the step's files cannot be read; the message names
      the step, its directory and the reader's error.

  Examples:
    >>> import tempfile
    >>> import jax, jax.numpy as jnp
    >>> import orbax.checkpoint as ocp
    >>> import subspace_optax as so
    >>> manager = ocp.CheckpointManager(tempfile.mkdtemp())
    >>> state = {'w': jnp.arange(3.0)}
    >>> so.save_checkpoint(manager, 5, state, progress={'step': 5})
    >>> restored, progress = so.restore_checkpoint(
    ...     manager, 5, jax.eval_shape(lambda: state))
    >>> restored['w'].tolist(), progress
    ([0.0, 1.0, 2.0], {'step': 5})
  """
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel

  directory = _step_dir(manager, step)
  if config is not None:
    if not (directory / CONFIG).exists():
      raise CheckpointMismatchError(
          f'Checkpoint step {step} ({directory}) holds no config to compare '
          'with this run\'s; it was saved without config=. Restore it without '
          'config= if you know it matches.')
    try:
      saved = manager.restore(step, args=ocp.args.Composite(
          **{CONFIG: ocp.args.JsonRestore()}))[CONFIG]
    except Exception as error:  # pylint: disable=broad-except
      raise _corrupt(step, directory, error) from error
    check_config(saved, config, where=f'Checkpoint step {step} ({directory})')
  try:
    metadata = ocp.StandardCheckpointHandler().metadata(directory / STATE)
  except Exception as error:  # pylint: disable=broad-except
    raise _corrupt(step, directory, error) from error
  try:
    check_compatible(target, metadata)
  except CheckpointMismatchError as error:
    raise CheckpointMismatchError(
        f'Checkpoint step {step} ({directory}): {error}') from None
  try:
    restored = manager.restore(step, args=ocp.args.Composite(**{
        STATE: ocp.args.StandardRestore(target),
        PROGRESS: ocp.args.JsonRestore()}))
  except Exception as error:  # pylint: disable=broad-except
    raise _corrupt(step, directory, error) from error
  return restored[STATE], dict(restored[PROGRESS] or {})


def _corrupt(step: int, directory: pathlib.Path,
             error: Exception) -> CheckpointCorruptError:
  reason = ' '.join(f'{type(error).__name__}: {error}'.split())[:300]
  return CheckpointCorruptError(
      f'Checkpoint step {step} ({directory}) cannot be read: it is truncated, '
      f'corrupted or incomplete ({reason}). Restore an earlier step '
      '(subspace_optax.restore_latest does so, with a warning), and delete '
      'or move this directory so later saves do not keep it as the latest.',
      step=step, directory=directory, reason=reason)


def _read_by_every_process(read: bool) -> bool:
  """Whether every process of a multi-process run could read the step."""
  if jax.process_count() == 1:
    return read
  return bool(np.all(multihost_utils.process_allgather(np.asarray(read))))


def restore_latest(manager, target: Any, *,
                   config: Optional[Mapping[str, Any]] = None
                   ) -> tuple[Optional[int], Any, Optional[dict[str, Any]]]:
  """``(step, state, progress)`` of the newest checkpoint that can be read.

  Steps are tried newest first. A step whose files cannot be read (a disk
  that filled up, a file truncated by a copy, bit rot) is skipped with a
  :class:`CheckpointSkippedWarning` naming it, and the next older one is
  tried. A process killed while saving leaves no step at all (orbax renames
  a step's directory into place only once it is complete). A configuration
  mismatch is raised at once: every step would have it. In a multi-process
  run every process reads its own shards, so the processes agree (one
  all-gather per step tried) and skip a step together when any of them
  cannot read it: all continue from the same step.

  Args:
    manager: the ``orbax.checkpoint.CheckpointManager`` of the run.
    target: the abstract state, e.g. ``jax.eval_shape(init, params)``.
    config: this run's config, compared with each step's (None: not checked).

  Returns:
    ``(None, None, None)`` when the manager holds no step; else the step
    restored, the state (``target``'s structure) and its progress record.

  Raises:
    CheckpointMismatchError: the newest readable step was saved with another
      config or state structure.
    CheckpointCorruptError: no step can be read (each one is named).

  Examples:
    >>> import tempfile
    >>> import jax, jax.numpy as jnp
    >>> import orbax.checkpoint as ocp
    >>> import subspace_optax as so
    >>> manager = ocp.CheckpointManager(tempfile.mkdtemp())
    >>> target = jax.eval_shape(lambda: {'w': jnp.zeros(2)})
    >>> so.restore_latest(manager, target)  # nothing saved yet
    (None, None, None)
    >>> for step in (10, 20):
    ...   so.save_checkpoint(manager, step, {'w': jnp.full(2, step / 10)},
    ...                      config={'rank': 2})
    >>> step, state, _ = so.restore_latest(manager, target, config={'rank': 2})
    >>> step, state['w'].tolist()
    (20, [2.0, 2.0])
  """
  failures = []
  for step in sorted(manager.all_steps(), reverse=True):
    error = None
    try:
      state, progress = restore_checkpoint(manager, step, target, config=config)
    except CheckpointCorruptError as raised:
      error = raised
    if not _read_by_every_process(error is None):
      # Each process reads its own shards: a file only one of them reads may
      # be the bad one. All skip the step together, or they would continue
      # from different steps.
      error = error or _corrupt(
          step, _step_dir(manager, step),
          RuntimeError('another process could not read its part of it'))
    if error is not None:
      failures.append(str(error))
      utils.warn_at_caller(
          f'Skipping checkpoint step {step} ({error.directory}): it cannot be '
          f'read ({error.reason}); trying the previous step. Delete or move '
          'that directory so later saves do not keep it as the latest.',
          CheckpointSkippedWarning)
      continue
    return step, state, progress
  if failures:
    raise CheckpointCorruptError(
        f'No checkpoint in {manager.directory} can be read:\n  '
        + '\n  '.join(failures) + '\nStart the run from step 0 in a new '
        'directory, or restore a copy of the checkpoints.')
  return None, None, None
