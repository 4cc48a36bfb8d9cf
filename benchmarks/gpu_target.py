"""Ahead-of-time compiles for a GPU on a machine without one.

XLA's GPU compiler runs without a device when it is given a description of
the target (a ``stream_executor.GpuTargetConfigProto``): JAX exposes it as a
compile-only topology (``jax.experimental.topologies.get_topology_desc``).
Programs lowered onto that topology's device go through the GPU pipeline
(layout assignment, fusion, scheduling, buffer assignment) and their
``memory_analysis()`` is the GPU's, with none of XLA:CPU's float32 copies of
bfloat16 arrays. Autotuning needs a device, so kernel choices (and their
workspaces) are the compiler's defaults.

Needs the CUDA plugin, not a GPU, beside the CPU jaxlib::

  pip install "jax[cuda12]==$(python -c 'import jax; print(jax.__version__)')"

The plugin's start-up check (``cuInit``) fails without a GPU;
:func:`compile_only_device` skips it (``JAX_SKIP_CUDA_CONSTRAINTS_CHECK``) and
keeps JAX's own backend on the CPU, so it must run before the first JAX
computation of the process.

The target below is an H100 SXM 80GB (compute capability 9.0, 132 SMs,
50 MiB of L2), from NVIDIA's published specifications.
"""

from __future__ import annotations

import os

import jax

H100_SXM = '''
gpu_device_info {
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: 233472
  shared_memory_per_block_optin: 232448
  threads_per_core_limit: 2048
  core_count: 132
  fpus_per_core: 128
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: 3352320000000
  l2_cache_size: 52428800
  clock_rate_ghz: 1.98
  device_memory_size: 84942979072
  cuda_compute_capability { major: 9 minor: 0 }
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}
platform_name: "CUDA"
dnn_version_info { major: 9 minor: 8 }
device_description_str: "NVIDIA H100 80GB HBM3"
'''
TARGETS = {'h100': H100_SXM}


def add_target_argument(parser) -> None:
  """The ``--target`` option of the memory benchmarks: ``cpu`` or a GPU."""
  parser.add_argument('--target', default='cpu', choices=['cpu', *TARGETS],
                      help='compile for this device (a GPU: ahead of time, '
                      'no GPU needed; see benchmarks/gpu_target.py)')


def compile_only_device(name: str) -> jax.Device:
  """A compile-only device of the GPU ``name`` (a key of ``TARGETS``).

  Raises:
    ValueError: for an unknown ``name``.
    RuntimeError: when the CUDA plugin is not installed, with the command
      that installs it.
  """
  if name not in TARGETS:
    raise ValueError(f'Unknown GPU target {name!r}; known: {sorted(TARGETS)}.')
  os.environ.setdefault('JAX_SKIP_CUDA_CONSTRAINTS_CHECK', '1')
  jax.config.update('jax_platforms', 'cpu')
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  try:
    topology = topologies.get_topology_desc(
        'aot', 'cuda', target_config=TARGETS[name], topology='1x1x1')
  except NotImplementedError as error:
    raise RuntimeError(
        'A GPU ahead-of-time compile needs the CUDA plugin (no GPU): '
        f'pip install "jax[cuda12]=={jax.__version__}"') from error
  return topology.devices[0]
