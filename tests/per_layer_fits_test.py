"""benchmarks/per_layer_fits.py: the bisection and a smoke search."""

import pytest

from benchmarks import per_layer_fits


def test_largest_fitting_is_the_last_shape_within_the_budget():
  peaks = {'a': 1, 'b': 3, 'c': 7, 'd': 9, 'e': 20}
  compiled = []

  def peak_of(name):
    compiled.append(name)
    return peaks[name]

  shapes = list(peaks)
  assert per_layer_fits.largest_fitting(peak_of, shapes, 8) == 'c'
  assert per_layer_fits.largest_fitting(peak_of, shapes, 9) == 'd'
  assert per_layer_fits.largest_fitting(peak_of, shapes, 100) == 'e'
  assert per_layer_fits.largest_fitting(peak_of, shapes, 0.5) is None
  assert len(set(compiled)) < len(compiled)  # a bisection, not a scan


@pytest.mark.slow
def test_smoke_search_finds_the_boundary():
  result = per_layer_fits.main(
      ['--smoke', '--cases', 'adamw:per_layer,galore_randomized_8bit:per_layer'])
  order = list(result['shapes'])
  for method in ('adamw', 'galore_randomized_8bit'):
    peaks = {r['shape']: r['peak_bytes'] for r in result['rows']
             if r['method'] == method}
    for budget, name in result['fits'][method]['per_layer'].items():
      limit = result['budgets_bytes'][budget]
      if name is not None:
        assert peaks[name] <= limit
      following = order[order.index(name) + 1:] if name else order
      if following and following[0] in peaks:
        assert peaks[following[0]] > limit, (budget, method, following[0])
