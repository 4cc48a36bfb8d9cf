"""Loss curves and optimizer-state memory per method, from a metrics JSONL.

  python -m examples.lm.plot runs/lm/run-1/metrics.jsonl [--out DIR]

writes ``loss.png`` (training loss, smoothed, and validation loss against
steps, on a log scale: the first steps fall from ~5.5 nats, the methods then
differ by a few hundredths) and ``memory.png`` (optimizer-state MiB per
method) next to the JSONL file or into ``--out``.
"""

from __future__ import annotations

import argparse
import collections
import json
import pathlib
from typing import Sequence

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position
from matplotlib import ticker  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np


def read_runs(path: str | pathlib.Path) -> dict[str, list[dict]]:
  """Records of a metrics JSONL grouped by optimizer, sorted by step."""
  runs = collections.OrderedDict()
  for line in pathlib.Path(path).read_text().splitlines():
    if line.strip():
      record = json.loads(line)
      runs.setdefault(record['optimizer'], []).append(record)
  if not runs:
    raise ValueError(f'{path} holds no metrics records.')
  return {k: sorted(v, key=lambda r: r['step']) for k, v in runs.items()}


def _smooth(values: np.ndarray, window: int) -> np.ndarray:
  if len(values) < window or window <= 1:
    return values
  kernel = np.ones(window) / window
  return np.convolve(values, kernel, mode='valid')


def plot_metrics(path: str | pathlib.Path,
                 out_dir: str | pathlib.Path | None = None) -> list[pathlib.Path]:
  """Write ``loss.png`` and ``memory.png``; returns their paths."""
  runs = read_runs(path)
  out_dir = pathlib.Path(out_dir) if out_dir else pathlib.Path(path).parent
  out_dir.mkdir(parents=True, exist_ok=True)
  colors = plt.rcParams['axes.prop_cycle'].by_key()['color']

  figure, axis = plt.subplots(figsize=(7, 4.5))
  for i, (name, records) in enumerate(runs.items()):
    color = colors[i % len(colors)]
    steps = np.array([r['step'] for r in records])
    losses = np.array([r['loss'] for r in records])
    window = max(1, len(records) // 30)
    smooth = _smooth(losses, window)
    axis.plot(steps[len(steps) - len(smooth):], smooth, color=color, alpha=0.6,
              label=f'{name} train')
    val = [(r['step'], r['val_loss']) for r in records
           if r.get('val_loss') is not None]
    if val:
      axis.plot(*zip(*val), 'o-', color=color, label=f'{name} val')
  axis.set_yscale('log')
  for set_formatter in (axis.yaxis.set_major_formatter,
                        axis.yaxis.set_minor_formatter):
    set_formatter(ticker.FormatStrFormatter('%g'))  # 2, 3, not 2x10^0
  axis.set_xlabel('step')
  axis.set_ylabel('cross entropy (nats / byte, log scale)')
  axis.set_title('Byte-level LM loss')
  axis.grid(alpha=0.3)
  axis.legend()
  figure.tight_layout()
  loss_path = out_dir / 'loss.png'
  figure.savefig(loss_path, dpi=120)
  plt.close(figure)

  figure, axis = plt.subplots(figsize=(6, 3.5))
  names = list(runs)
  mib = [runs[n][-1]['opt_state_bytes'] / 2**20 for n in names]
  bars = axis.bar(names, mib, color=[colors[i % len(colors)]
                                     for i in range(len(names))])
  axis.bar_label(bars, fmt='%.2f')
  axis.set_ylabel('optimizer state (MiB)')
  axis.set_title('Optimizer-state memory')
  figure.tight_layout()
  memory_path = out_dir / 'memory.png'
  figure.savefig(memory_path, dpi=120)
  plt.close(figure)
  return [loss_path, memory_path]


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(prog='python -m examples.lm.plot')
  parser.add_argument('metrics', help='metrics.jsonl written by train.py')
  parser.add_argument('--out', default=None, help='output directory')
  args = parser.parse_args(argv)
  for written in plot_metrics(args.metrics, args.out):
    print(written)


if __name__ == '__main__':
  main()
