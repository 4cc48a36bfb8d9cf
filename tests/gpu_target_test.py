"""benchmarks/gpu_target.py: compile-only GPU devices and their errors."""

import importlib.util

import jax
import jax.numpy as jnp
import pytest

from benchmarks import gpu_target
from benchmarks import peak_memory
from benchmarks import per_layer_memory


def test_an_unknown_target_is_named():
  with pytest.raises(ValueError, match="'a100'.*known: \\['h100'\\]"):
    gpu_target.compile_only_device('a100')


def _has_cuda_plugin() -> bool:
  return (importlib.util.find_spec('jax_plugins') is not None
          and importlib.util.find_spec('jax_plugins.xla_cuda12') is not None)


@pytest.mark.skipif(_has_cuda_plugin(), reason='the CUDA plugin is installed')
def test_without_the_cuda_plugin_the_error_gives_the_install_command():
  with pytest.raises(RuntimeError, match=r'pip install "jax\[cuda12\]=='
                     + jax.__version__):
    gpu_target.compile_only_device('h100')


def test_compile_program_places_the_arguments_on_the_compile_device(
    monkeypatch):
  device = jax.devices()[-1]
  monkeypatch.setattr(peak_memory, 'COMPILE_DEVICE', device)
  compiled, _ = peak_memory.compile_program(
      lambda a, b: a @ b, jax.ShapeDtypeStruct((4, 8), jnp.float32),
      jnp.ones((8, 2)))
  assert {s.device_set.pop() for s in compiled.input_shardings[0]} == {device}


def test_steps_are_not_run_on_a_compile_only_device():
  with pytest.raises(SystemExit, match='--time and --real-check'):
    per_layer_memory.main(['--smoke', '--target', 'h100', '--time', 'adamw'])
