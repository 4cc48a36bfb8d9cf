"""Time galore-torch's ``GaLoreAdamW`` and ``torch.optim.AdamW`` on given shapes.

The PyTorch side of ``benchmarks/speed_memory.py --torch-reference``: it runs
in its own process (torch and JAX must not share the device's memory) and
imports no JAX. Input, as JSON on stdin::

  {"tables": {"<name>": {"projected": [[m, n], ...], "other": [[k], ...]}},
   "rank": {"<name>": r}, "refresh": T, "warmup": w, "timed": t,
   "seed": s}

``projected`` shapes go in GaLore's parameter group (``rank``,
``update_proj_gap=T``, ``scale=0.25``, ``proj_type='std'``, the GaLore
paper's settings); ``other`` shapes in a plain group, as the GaLore training
scripts do. Gradients have the decaying spectrum of
``speed.shape_gradients`` (same distribution, not the same values);
``step_times.gradient_count(T)`` of them are cycled so consecutive
refreshes see different gradients.

Output, as JSON on stdout: per table, one row per optimizer with the same
timing fields as ``speed.optimizer_only`` (milliseconds; a step is timed
from before ``optimizer.step()`` to after ``torch.cuda.synchronize()``) plus
``state_bytes`` and ``peak_device_bytes`` (``torch.cuda.max_memory_allocated``
over the run). galore-torch refreshes every projector on the steps whose count
is a multiple of ``T`` (no stagger), which marks its refresh steps.
"""

from __future__ import annotations

import json
import sys
import time
import types
from typing import Any

import torch

from benchmarks import step_times


def _import_galore_adamw():
  """``galore_torch.GaLoreAdamW``.

  galore-torch 1.0 imports bitsandbytes when imported, only for its 8-bit
  class. Where bitsandbytes is missing or cannot load (no wheel for the
  machine), a stand-in module lets the package import; ``GaLoreAdamW`` never
  touches it. The output says which happened.
  """
  try:
    from galore_torch import GaLoreAdamW  # pylint: disable=import-outside-toplevel
    return GaLoreAdamW, 'real'
  except Exception as error:  # pylint: disable=broad-except
    reason = f'{type(error).__name__}: {error}'[:300]
  for name in list(sys.modules):
    if name.startswith(('galore_torch', 'bitsandbytes')):
      del sys.modules[name]
  stand_in = types.ModuleType('bitsandbytes')
  optim = types.ModuleType('bitsandbytes.optim')
  optimizer = types.ModuleType('bitsandbytes.optim.optimizer')
  optimizer.Optimizer2State = type('Optimizer2State', (), {})
  functional = types.ModuleType('bitsandbytes.functional')
  stand_in.optim, stand_in.functional, optim.optimizer = optim, functional, optimizer
  sys.modules.update({'bitsandbytes': stand_in, 'bitsandbytes.optim': optim,
                      'bitsandbytes.optim.optimizer': optimizer,
                      'bitsandbytes.functional': functional})
  from galore_torch import GaLoreAdamW  # pylint: disable=import-outside-toplevel
  return GaLoreAdamW, f'stand-in (import failed: {reason})'


def _gradients(shapes, count, seed, device):
  generator = torch.Generator(device='cpu').manual_seed(seed)
  out = []
  for _ in range(count):
    grads = []
    for shape in shapes:
      if len(shape) < 2:
        grads.append(torch.randn(shape, generator=generator))
        continue
      m, n = shape
      k = min(m, n)
      decay = 0.9 ** torch.arange(k, dtype=torch.float32)
      left = torch.randn((m, k), generator=generator) * decay
      grads.append(left @ torch.randn((k, n), generator=generator) / k ** 0.5)
    out.append([g.to(device) for g in grads])
  return out


def time_optimizer(make, shapes, projected_count, config, device,
                   refreshes: bool):
  """Warm up, then time ``config['timed']`` steps of one optimizer
  (``refreshes``: it recomputes its projectors every ``refresh``)."""
  params = [torch.zeros(s, device=device, requires_grad=True) for s in shapes]
  optimizer = make(params[:projected_count], params[projected_count:])
  gradients = _gradients(
      shapes, step_times.gradient_count(config['refresh']),
      config['seed'], device)
  synchronize = (torch.cuda.synchronize if device == 'cuda' else lambda: None)
  if device == 'cuda':
    torch.cuda.reset_peak_memory_stats()
  times, refreshed = [], []
  for i in range(config['warmup'] + config['timed']):
    for p, g in zip(params, gradients[i % len(gradients)]):
      p.grad = g
    synchronize()
    start = time.perf_counter()
    optimizer.step()
    synchronize()
    if i >= config['warmup']:
      times.append(1e3 * (time.perf_counter() - start))
      refreshed.append(refreshes and i % config['refresh'] == 0)
  state_bytes = sum(
      v.numel() * v.element_size() for s in optimizer.state.values()
      for v in _tensors(s))
  return {**step_times.summary(times, refreshed),
          'state_bytes': int(state_bytes),
          'peak_device_bytes': (int(torch.cuda.max_memory_allocated())
                                if device == 'cuda' else None)}


def _tensors(state):
  """The tensors an optimizer keeps for one parameter (incl. the projector's)."""
  for value in state.values():
    if isinstance(value, torch.Tensor):
      yield value
    elif hasattr(value, 'ortho_matrix') and isinstance(value.ortho_matrix,
                                                       torch.Tensor):
      yield value.ortho_matrix


def run(config: dict[str, Any]) -> dict[str, Any]:
  galore_adamw, bitsandbytes = _import_galore_adamw()
  device = 'cuda' if torch.cuda.is_available() else 'cpu'
  lr = 1e-3
  out = {'versions': {'torch': torch.__version__},
         'device': (torch.cuda.get_device_name() if device == 'cuda' else 'cpu'),
         'galore_torch_bitsandbytes': bitsandbytes, 'tables': {}}
  for name, table in config['tables'].items():
    projected = [tuple(s) for s in table['projected']]
    shapes = projected + [tuple(s) for s in table['other']]
    rank = config['rank'][name]

    def adamw(projected_params, other_params):
      return torch.optim.AdamW(projected_params + other_params, lr=lr, eps=1e-8)

    def galore(projected_params, other_params, rank=rank):
      return galore_adamw(
          [{'params': other_params},
           {'params': projected_params, 'rank': rank,
            'update_proj_gap': config['refresh'], 'scale': 0.25,
            'proj_type': 'std'}], lr=lr, eps=1e-8)

    out['tables'][name] = {
        'torch_adamw': time_optimizer(adamw, shapes, len(projected), config,
                                      device, refreshes=False),
        'galore_torch': {'rank': rank, **time_optimizer(
            galore, shapes, len(projected), config, device, refreshes=True)},
    }
  return out


if __name__ == '__main__':
  print(json.dumps(run(json.load(sys.stdin))))
