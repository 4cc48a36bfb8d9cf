"""benchmarks/per_layer_memory.py: the CPU-only buffer count and a smoke row."""

import pytest

from benchmarks import per_layer_memory

# A buffer assignment in XLA's dump format: a 100-byte temporary allocation
# holding a float32 convert at [0, 40), a bfloat16 value at [30, 60) and a
# float32 dot at [60, 100); values of other allocations do not count.
ASSIGNMENT = """BufferAssignment:
allocation 0: size 64, parameter 0, shape |bf16[32]| at ShapeIndex {}:
 value: <1 convert.9 @0> (size=64,offset=0): f32[16]{0}
allocation 1: size 100, preallocated-temp:
 value: <2 convert.1 @0> (size=40,offset=0): f32[10]{0}
 value: <3 add.2 @0> (size=30,offset=30): bf16[15]{0}
 value: <4 dot.3 @0> (size=40,offset=60): f32[10]{0}
"""
VALUES = """<2 convert.1 @0>
 from instruction: %convert.1 = f32[10]{0} convert(%p.1)
<3 add.2 @0>
 from instruction: %add.2 = bf16[15]{0} add(%a, %b)
<4 dot.3 @0>
 from instruction: %dot.3 = f32[10]{0} dot(%a, %b)
"""


def test_cpu_only_bytes_are_the_range_only_converts_use(tmp_path):
  path = tmp_path / 'm.cpu_after_optimizations-buffer-assignment.txt'
  path.write_text(ASSIGNMENT)
  (tmp_path / 'm.cpu_after_optimizations-buffer-assignment-values.txt'
   ).write_text(VALUES)
  found = per_layer_memory.cpu_only(str(path))
  # [0, 40) is the convert's, but [30, 40) is shared with the bf16 add.
  assert found['cpu_only_bytes'] == 30
  assert [b['value'] for b in found['cpu_only_buffers']] == ['convert.1']


@pytest.mark.slow
def test_smoke_rows_have_the_issue_keys():
  result = per_layer_memory.main(['--smoke', '--methods', 'adamw'])
  keys = {'shape', 'method', 'param_dtype', 'per_layer', 'batch', 'seq_len',
          'peak_bytes', 'cpu_only_bytes', 'optimizer_temp_bytes',
          'largest_matrix_bytes'}
  rows = result['rows']
  assert {r['per_layer'] for r in rows} == {False, True}
  for row in rows:
    assert keys <= set(row)
    assert row['checks']['alias_is_params_state']


@pytest.mark.slow
def test_gpu_check_per_layer_runs_on_cpu(tmp_path):
  from benchmarks import gpu_check  # pylint: disable=import-outside-toplevel
  out = tmp_path / 'gpu.json'
  result = gpu_check.main(['--per-layer', '--smoke', '--methods', 'adamw',
                           '--out', str(out)])
  assert out.exists()
  per_layer, whole_tree = result['rows']
  for row in (per_layer, whole_tree):
    assert 'error' not in row, row.get('error')
    assert row['aot_memory']['peak'] > 0 and len(row['step_ms']) == 3
  assert per_layer['per_layer'] and not whole_tree['per_layer']
