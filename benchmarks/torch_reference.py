"""The PyTorch reference of the speed benchmark: galore-torch's
``GaLoreAdamW`` and ``torch.optim.AdamW`` on the same shapes, rank and
refresh period, in their own process
(``benchmarks/reference/galore_torch_speed.py``)."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys
from typing import Any

import jax
import numpy as np

from benchmarks import harness
from benchmarks import speed
from benchmarks import methods as lm_optimizers


def split_shapes(params) -> dict[str, list[list[int]]]:
  """Leaf shapes, the projected ones (GaLore's parameter group) first; a
  stacked ``(layers, m, n)`` leaf is ``layers`` tensors for PyTorch."""
  projected, other = [], []
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    if lm_optimizers.is_block_matrix(path, leaf):
      projected += [list(leaf.shape[-2:])] * int(np.prod(leaf.shape[:-2]))
    else:
      other.append(list(leaf.shape))
  return {'projected': projected, 'other': other}


def run(setup: speed.Setup, model_params, timeout: float,
                    with_shapes: bool = True) -> dict[str, Any]:
  """``benchmarks/reference/galore_torch_speed.py`` in its own process, on the
  model's parameter shapes and (``with_shapes``) on every shape set."""
  tables = {'model': split_shapes(model_params)}
  ranks = {'model': setup.rank}
  for set_name, (dim, ffn_dim, rank) in (
      setup.shape_sets.items() if with_shapes else ()):
    tables[set_name] = split_shapes(speed.block_shapes(dim, ffn_dim,
                                                  setup.shape_layers,
                                                  setup.stacked))
    ranks[set_name] = rank
  config = {'tables': tables, 'rank': ranks,
            'refresh': setup.refresh,
            'warmup': setup.warmup_steps, 'timed': setup.timed_steps, 'seed': 0}
  try:
    done = subprocess.run(
        [sys.executable, '-m', 'benchmarks.reference.galore_torch_speed'],
        input=json.dumps(config), capture_output=True, text=True, check=False,
        timeout=timeout, cwd=pathlib.Path(__file__).resolve().parents[1])
  except subprocess.TimeoutExpired:
    return {'error': f'timed out after {timeout:.0f} s'}
  if done.returncode != 0:
    return {'error': done.stderr[-2000:]}
  return json.loads(done.stdout)


def jax_rows(result: dict[str, Any], table: str) -> dict[str, Any]:
  """The JAX rows measured on the shapes of torch table ``table``."""
  return (result['model'] if table == 'model'
          else result['shapes'].get(table, {}))


def add_ratios(result: dict[str, Any]) -> None:
  """``vs_galore_torch``: each JAX row's optimizer-only times over
  galore-torch's on the same shapes (and ``torch_adamw``'s over it)."""
  reference = result.get('torch_reference') or {}
  for table, torch_rows in (reference.get('tables') or {}).items():
    galore = torch_rows['galore_torch']
    for row in list(jax_rows(result, table).values()) + [
        torch_rows['torch_adamw']]:
      if 'error' in row:
        continue
      timing = row.get('optimizer_only', row)
      row['vs_galore_torch'] = harness.timing_ratios(
          {'optimizer_only': timing}, {'optimizer_only': galore},
          'optimizer_only')
