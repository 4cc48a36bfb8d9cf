"""The notebooks run, and each .ipynb holds exactly the cells of its .py.

The jupytext ``py:percent`` file ``notebooks/NN_name.py`` is the source of
truth; ``notebooks/NN_name.ipynb`` is generated from it with

  jupytext --to ipynb notebooks/NN_name.py

and kept without outputs. The run test executes each ``.py`` as a script (the
same code as the notebook's cells, in order) with ``SUBSPACE_OPTAX_SMOKE=1``
(small sizes) and the Agg matplotlib backend. All notebooks start at once, in
separate processes, so the test costs about the slowest notebook, not their
sum. On two idle CPU cores the three smoke runs take about 35-50 s of CPU time
each; the timeout is generous so that a loaded machine does not fail the test.
"""

import os
import pathlib
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

NOTEBOOKS_DIR = pathlib.Path(__file__).resolve().parent.parent / 'notebooks'
NOTEBOOKS = sorted(p.stem for p in NOTEBOOKS_DIR.glob('[0-9][0-9]_*.py'))
TIMEOUT_S = 600


def test_every_notebook_is_found():
  assert len(NOTEBOOKS) >= 3, NOTEBOOKS
  for name in NOTEBOOKS:
    assert (NOTEBOOKS_DIR / f'{name}.ipynb').exists(), (
        f'{name}.ipynb is missing; run `jupytext --to ipynb notebooks/{name}.py`.')


def _cells(notebook):
  return [(cell.cell_type, cell.source.strip()) for cell in notebook.cells]


@pytest.mark.parametrize('name', NOTEBOOKS)
def test_ipynb_matches_py_and_has_no_outputs(name):
  jupytext = pytest.importorskip('jupytext')
  script = jupytext.read(NOTEBOOKS_DIR / f'{name}.py')
  notebook = jupytext.read(NOTEBOOKS_DIR / f'{name}.ipynb')
  fix = f'regenerate it: `jupytext --to ipynb notebooks/{name}.py`'
  assert _cells(script), f'{name}.py has no cells'
  assert _cells(notebook) == _cells(script), f'{name}.ipynb is out of date; {fix}.'
  for cell in notebook.cells:
    if cell.cell_type == 'code':
      assert not cell.get('outputs') and cell.get('execution_count') is None, (
          f'{name}.ipynb holds outputs; {fix} (outputs are not kept).')


@pytest.fixture(scope='module')
def running_notebooks():
  """Start every notebook at once; yield {name: Popen}."""
  env = dict(os.environ)
  # The test suite simulates 8 CPU devices (conftest.py); notebooks use one.
  env.pop('XLA_FLAGS', None)
  env.update(
      SUBSPACE_OPTAX_SMOKE='1', MPLBACKEND='Agg', JAX_PLATFORMS='cpu',
      PYTHONWARNINGS='ignore', OPENBLAS_NUM_THREADS='1', OMP_NUM_THREADS='1',
      MKL_NUM_THREADS='1')
  processes = {
      name: subprocess.Popen(
          [sys.executable, f'{name}.py'], cwd=NOTEBOOKS_DIR, env=env,
          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
      for name in NOTEBOOKS
  }
  yield processes
  for process in processes.values():
    if process.poll() is None:
      process.kill()
      process.wait()


@pytest.mark.parametrize('name', NOTEBOOKS)
def test_notebook_runs(name, running_notebooks):
  process = running_notebooks[name]
  try:
    output, _ = process.communicate(timeout=TIMEOUT_S)
  except subprocess.TimeoutExpired:
    process.kill()
    output, _ = process.communicate()
    pytest.fail(f'{name} ran past {TIMEOUT_S} s with SUBSPACE_OPTAX_SMOKE=1.\n'
                f'{output[-3000:]}')
  assert process.returncode == 0, f'{name} failed:\n{output[-5000:]}'
