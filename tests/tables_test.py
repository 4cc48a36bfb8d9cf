"""The figures in README.md and the docs are the generated ones.

Every table of benchmark figures sits between markers and is produced by
``benchmarks/tables.py`` from ``benchmarks/results/*.json``; a page edited by
hand, or a result file re-run without regenerating the pages, fails here.
Fix: ``python -m benchmarks.tables``.
"""

import re

import pytest

from benchmarks import tables


def test_pages_match_the_result_json():
  problems = tables.check()
  assert not problems, '\n'.join(problems)


@pytest.mark.parametrize('name', sorted(tables.TABLES))
def test_every_table_names_its_source_and_provenance(name):
  text = tables.TABLES[name]()
  assert 'benchmarks/results/' in text
  assert re.search(r'CPU run|GPU run|ahead-of-time|projection', text), text


def test_every_registered_table_is_used_and_every_page_exists():
  used = {name for names in tables.PAGES.values() for name in names}
  assert used == set(tables.TABLES)
  for page in tables.PAGES:
    assert (tables.ROOT / page).exists(), page


def test_drift_is_detected(tmp_path):
  for page in tables.PAGES:
    target = tmp_path / page
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text((tables.ROOT / page).read_text())
  assert tables.check(tmp_path) == []
  readme = tmp_path / 'README.md'
  text = readme.read_text()
  edited = text.replace('| fira | 26 | 0.952 |', '| fira | 26 | 0.950 |', 1)
  assert edited != text
  readme.write_text(edited)
  problems = tables.check(tmp_path)
  assert any('readme_quality' in p for p in problems), problems


def test_gpu_and_aot_figures_say_so():
  assert 'GPU run, NVIDIA H100' in tables.readme_h100()
  assert ('ahead-of-time XLA:GPU compile for an NVIDIA H100' in
          tables.readme_peak_memory())
  assert 'ahead-of-time XLA:CPU compile' in tables.peak_memory_7b()
  assert 'not run on a GPU' in tables.readme_fits() or 'nothing was run on a GPU' in tables.readme_fits()
  # Like-for-like comparison with galore-torch: the SVD row.
  assert 'like-for-like' in tables.readme_h100()
