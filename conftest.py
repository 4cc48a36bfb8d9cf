"""pytest set-up for the whole repository: devices, and the documentation's code.

The code blocks of README.md and docs/*.md are tests, collected by Sybil, one
item per block:

* ```python blocks run, those of one file in order in one namespace (a block
  may continue the one before it). A block that cannot run here (a GPU, a
  cluster, a large download) is preceded by ``<!-- skip: next -->`` and a
  sentence saying why; hidden set-up goes in ``<!-- invisible-code-block:
  python ... -->``.
* ```bash blocks are not run (the main job trains for 150 steps;
  tests/examples_lm_test.py runs it with tiny flags), but every
  ``python -m examples...`` command in them must parse: its module's
  ``parse_args`` accepts the flags shown.

The library's docstring examples run through pytest's own
``--doctest-modules`` (pyproject.toml).
"""

import atexit
import importlib
import os
import re
import shlex
import shutil
import tempfile

# XLA reads its flags when jax creates its backend, so they are set before any
# test or document imports jax; the fresh processes some tests start inherit
# them. 8 simulated CPU devices: the sharding tests and docs/multi_device.md.
# Most of the suite's time is XLA:CPU compiling small programs. Two code
# generation flags halve it or better: LLVM optimisation level 0, and XLA's
# older elemental emitters for fusions instead of its MLIR fusion emitters
# (the HLO passes, fusion decisions and buffer assignment are unchanged). The
# results differ from the default flags' in the last bits (FMA contraction,
# vectorised math), so every figure the tests compare is computed under the
# same flags; the benchmarks run with XLA's defaults.
_FLAGS = {'--xla_force_host_platform_device_count': '8',
          '--xla_backend_optimization_level': '0',
          '--xla_cpu_use_fusion_emitters': 'false'}
_given = os.environ.get('XLA_FLAGS', '')
os.environ['XLA_FLAGS'] = ' '.join([_given] + [
    f'{flag}={value}' for flag, value in _FLAGS.items()
    if flag not in _given]).strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

# One persistent compilation cache for the whole run, shared by the xdist
# workers and by the fresh processes some tests start (resume, examples): the
# registry's methods are compiled at the same shapes by many test files. Set
# here, in the controller, before the workers start; removed at exit. A cache
# the user configured is used as it is.
if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
  _CACHE = tempfile.mkdtemp(prefix='subspace-optax-jax-cache-')
  os.environ['JAX_COMPILATION_CACHE_DIR'] = _CACHE
  os.environ['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '0'
  os.environ['JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES'] = '-1'
  atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)

# pylint: disable=g-import-not-at-top,wrong-import-position
import pytest
from sybil import Sybil
from sybil.parsers.markdown import CodeBlockParser
from sybil.parsers.markdown import PythonCodeBlockParser
from sybil.parsers.markdown import SkipParser

# docs/conf.py is Sphinx's configuration, not a module to import for doctests.
collect_ignore = ['docs/conf.py']
collect_ignore_glob = ['docs/_build/*', 'docs/_generated/*']


def check_commands(example):
  """Parses the flags of each ``python -m examples.*`` command of a block."""
  text = example.parsed.replace('\\\n', ' ')  # continued lines
  for line in text.splitlines():
    for command in re.split(r'&&|\|\||;|\|', line):
      words = shlex.split(command, comments=True)
      while words and re.fullmatch(r'[A-Za-z_]\w*=.*', words[0]):
        words = words[1:]  # VAR=value before the command
      if words[:2] != ['python', '-m'] or not words[2].startswith('examples.'):
        continue
      try:
        importlib.import_module(words[2]).parse_args(words[3:])
      except SystemExit as exit_:  # argparse's error, already printed
        raise ValueError(f'{command.strip()!r} does not parse') from exit_


pytest_collect_file = Sybil(
    parsers=[
        PythonCodeBlockParser(),
        CodeBlockParser(language='bash', evaluator=check_commands),
        SkipParser(),
    ],
    patterns=['README.md', 'docs/*.md'],
).pytest()

# Documents whose blocks are in the slow set, as the marker's description in
# pyproject.toml has it: docs/multi_device.md shards over 8 simulated devices
# (about 12 s of CPU in all).
SLOW_DOCUMENTS = ('docs/multi_device.md',)


def pytest_collection_modifyitems(config, items):
  slow = {config.rootpath / name for name in SLOW_DOCUMENTS}
  for item in items:
    if item.path in slow:
      item.add_marker(pytest.mark.slow)
