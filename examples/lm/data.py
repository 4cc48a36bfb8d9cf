"""Byte-level corpora and deterministic batches.

The default corpus is the source of the CPython standard library that runs this
script (``.py`` files under ``sysconfig.get_paths()['stdlib']``, sorted by path,
installed third-party packages excluded), so nothing is downloaded. Users can
pass their own text files or directories instead.

Tokens are bytes (vocabulary 256). The corpus is cut into chunks of
``split_chunk`` bytes; every ``val_every``-th chunk goes to validation, the
rest to training, so both splits sample the whole corpus.

Batches are a pure function of ``(seed, step)``: the window offsets come from
``numpy.random.default_rng([seed, step])``, so a resumed run sees exactly the
batches an uninterrupted run would have seen, with no data-loader state.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import pathlib
import sysconfig
from typing import Iterable, Sequence

import numpy as np

DEFAULT_MAX_BYTES = 3_000_000
_SKIPPED_DIRECTORIES = ('site-packages', 'dist-packages', '__pycache__')


class CorpusError(ValueError):
  """The corpus could not be built (missing path, empty, too short)."""


@dataclasses.dataclass(frozen=True)
class Corpus:
  """Byte tokens split into train and validation (uint8 arrays)."""

  train: np.ndarray
  val: np.ndarray
  description: str  # human readable origin
  fingerprint: str  # sha256 prefix of the bytes, stored in run configs

  def __post_init__(self):
    if self.train.dtype != np.uint8 or self.val.dtype != np.uint8:
      raise TypeError('Corpus arrays must be uint8 bytes.')


def stdlib_files() -> list[pathlib.Path]:
  """The standard library's ``.py`` files in sorted path order."""
  root = pathlib.Path(sysconfig.get_paths()['stdlib'])
  if not root.is_dir():
    raise CorpusError(f'Standard library directory {root} not found.')
  files = []
  for directory, subdirectories, names in os.walk(root):
    subdirectories[:] = [
        d for d in subdirectories if d not in _SKIPPED_DIRECTORIES]
    files.extend(
        pathlib.Path(directory, n) for n in names if n.endswith('.py'))
  return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _files_under(paths: Sequence[str | os.PathLike]) -> list[pathlib.Path]:
  files = []
  for raw in paths:
    path = pathlib.Path(raw)
    if path.is_file():
      files.append(path)
    elif path.is_dir():
      found = sorted(
          (p for p in path.rglob('*') if p.is_file()
           and not any(part.startswith('.') for part in p.relative_to(path).parts)),
          key=lambda p: p.relative_to(path).as_posix())
      if not found:
        raise CorpusError(f'Directory {path} contains no files.')
      files.extend(found)
    else:
      raise CorpusError(f'Data path {path} does not exist.')
  return files


def read_bytes(files: Iterable[pathlib.Path], max_bytes: int | None) -> bytes:
  """Concatenate files (each followed by a newline) up to ``max_bytes``."""
  parts, total = [], 0
  for f in files:
    try:
      content = f.read_bytes()
    except OSError as error:
      raise CorpusError(f'Cannot read {f}: {error}') from error
    if not content:
      continue
    parts.append(content + b'\n')
    total += len(content) + 1
    if max_bytes is not None and total >= max_bytes:
      break
  data = b''.join(parts)
  return data if max_bytes is None else data[:max_bytes]


def split(data: bytes, *, val_every: int = 20, split_chunk: int = 16_384):
  """Every ``val_every``-th chunk of ``split_chunk`` bytes is validation."""
  tokens = np.frombuffer(data, dtype=np.uint8)
  chunks = [tokens[i:i + split_chunk]
            for i in range(0, len(tokens), split_chunk)]
  if len(chunks) < 2:  # Too small to chunk: the last tenth is validation.
    cut = len(tokens) - max(1, len(tokens) // 10)
    return tokens[:cut].copy(), tokens[cut:].copy()
  val_idx = set(range(val_every - 1, len(chunks), val_every)) or {
      len(chunks) - 1}
  train = [c for i, c in enumerate(chunks) if i not in val_idx]
  val = [c for i, c in enumerate(chunks) if i in val_idx]
  return np.concatenate(train), np.concatenate(val)


def load_corpus(
    paths: Sequence[str | os.PathLike] | None = None,
    *,
    max_bytes: int | None = DEFAULT_MAX_BYTES,
    seq_len: int,
    val_every: int = 20,
) -> Corpus:
  """The stdlib corpus (``paths=None``) or the files/directories in ``paths``.

  Raises:
    CorpusError: a path is missing, the corpus is empty, or one of its splits
      is shorter than one training sequence (``seq_len + 1`` bytes).
  """
  if paths:
    files = _files_under(paths)
    description = ', '.join(str(p) for p in paths)
  else:
    files = stdlib_files()
    description = f'CPython {sysconfig.get_python_version()} stdlib sources'
  data = read_bytes(files, max_bytes)
  if not data:
    raise CorpusError(f'The corpus ({description}) is empty.')
  train, val = split(data, val_every=val_every)
  need = seq_len + 1
  for name, tokens in (('training', train), ('validation', val)):
    if len(tokens) < need:
      raise CorpusError(
          f'The {name} split of the corpus ({description}) holds {len(tokens)} '
          f'bytes, fewer than one sequence of seq_len + 1 = {need} bytes '
          f'(corpus: {len(data)} bytes). Add text or lower --seq-len.')
  return Corpus(
      train=train, val=val,
      description=f'{description}: {len(data):,} bytes',
      fingerprint=hashlib.sha256(data).hexdigest()[:16])


def batch_at(
    tokens: np.ndarray, *, seed: int, step: int, batch_size: int, seq_len: int
) -> tuple[np.ndarray, np.ndarray]:
  """The training batch of ``step``: (inputs, targets), int32 [batch, seq].

  Window offsets are drawn from ``default_rng([seed, step])``: a pure function
  of its arguments, so resuming at any step reproduces the batches.
  """
  rng = np.random.default_rng([seed, step])
  offsets = rng.integers(0, len(tokens) - seq_len, size=batch_size)
  windows = np.stack([tokens[o:o + seq_len + 1] for o in offsets])
  windows = windows.astype(np.int32)
  return windows[:, :-1], windows[:, 1:]


def eval_batches(
    tokens: np.ndarray, *, batches: int, batch_size: int, seq_len: int
) -> list[tuple[np.ndarray, np.ndarray]]:
  """Fixed validation batches: windows evenly spread over ``tokens``."""
  count = batches * batch_size
  last = len(tokens) - seq_len - 1
  offsets = np.linspace(0, last, num=count).astype(np.int64)
  windows = np.stack([tokens[o:o + seq_len + 1] for o in offsets])
  windows = windows.astype(np.int32).reshape(batches, batch_size, -1)
  return [(w[:, :-1], w[:, 1:]) for w in windows]
