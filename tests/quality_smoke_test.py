"""Smoke test of benchmarks/quality.py: the --quick run and its JSON.

Not a quality check (10 steps of a dim-32 model say nothing about the
methods); the numbers live in benchmarks/results/quality_cpu.json.
"""

import json
import math
import pathlib

import jax
import pytest

from benchmarks import quality

pytestmark = pytest.mark.slow


@pytest.fixture(scope='module')
def quick(tmp_path_factory):
  directory = tmp_path_factory.mktemp('quality')
  out, table = directory / 'quality.json', directory / 'quality.md'
  result = quality.main(['--quick', '--out', str(out), '--markdown', str(table)])
  return result, out, table


def test_quick_run_writes_json_with_the_documented_keys(quick):
  result, out, table = quick
  assert json.loads(out.read_text()) == json.loads(json.dumps(result))
  for key in ('benchmark', 'date', 'machine', 'command', 'versions', 'setup',
              'rows', 'bars', 'wall_seconds', 'cpu_seconds'):
    assert key in result, key
  assert result['command'].startswith('python -m benchmarks.quality --quick')
  assert result['setup']['steps'] == 10
  assert [r['method'] for r in result['rows']] == ['adamw', 'galore']
  for row in result['rows']:
    for key in ('rank', 'learning_rate', 'lr_ratio_to_adamw', 'val_loss',
                'val_loss_ratio_to_adamw', 'opt_state_bytes',
                'state_ratio_to_adamw', 'state_ratio_to_galore', 'runs'):
      assert key in row, (row['method'], key)
    assert math.isfinite(row['val_loss']) and row['runs'][0]['finite']
  assert 'galore_within_3pct_of_adamw' in result['bars']
  assert '| galore |' in table.read_text()


def test_ratios_are_relative_to_adamw_and_galore_saves_state(quick):
  result, _, _ = quick
  adamw, galore = result['rows']
  assert adamw['val_loss_ratio_to_adamw'] == 1.0
  assert adamw['state_ratio_to_adamw'] == 1.0
  assert galore['val_loss_ratio_to_adamw'] == pytest.approx(
      galore['val_loss'] / adamw['val_loss'])
  assert galore['rank'] == result['setup']['model']['dim'] // 4
  assert galore['opt_state_bytes'] == result['setup']['state_budget_bytes']
  assert galore['state_ratio_to_adamw'] < 0.9
  assert galore['lr_ratio_to_adamw'] == 10.0


def test_budget_rank_is_the_largest_rank_within_the_budget():
  params = {'w': jax.ShapeDtypeStruct((40, 24), 'float32')}
  build = lambda rank: quality.so.galore(1e-3, rank=rank, side='reference')
  bytes_of = lambda rank: quality.state_bytes_of(build(rank), params)
  assert bytes_of(7) < bytes_of(8) < bytes_of(9)
  budget = (bytes_of(8) + 3 * bytes_of(9)) // 4  # nearer to rank 9's bytes
  assert quality.budget_rank(build, params, budget, 24) == (8, bytes_of(8))
  assert quality.budget_rank(build, params, bytes_of(8), 24) == (8, bytes_of(8))
  assert quality.budget_rank(build, params, 10**9, 24) == (24, bytes_of(24))


def test_every_row_resolves_its_rank_and_takes_a_finite_step():
  """Each row's recipe builds, gets its rank rule and makes one finite update
  on the quick model (what the table needs before any training)."""
  setup = quality.make_setup(quality.parse_args(['--quick']))
  _, params = quality.init_params(setup, 0)
  names = list(quality.METHODS)
  ranks, budget = quality.resolve_ranks(names, setup, params)
  schedule = lambda step: 1e-3
  grads = jax.tree.map(lambda p: 1e-2 * jax.numpy.ones_like(p), params)
  for name in names:
    method = quality.METHODS[name]
    tx = quality.make_tx(name, schedule, ranks[name], setup.refresh, 0)
    state = tx.init(params)
    if method.rank == 'match_budget':
      assert quality.state_bytes_of(tx, params) <= budget, name
    updates, _ = jax.jit(tx.update)(grads, state, params)
    assert all(bool(jax.numpy.isfinite(u).all())
               for u in jax.tree.leaves(updates)), name


def test_an_unknown_method_is_an_error_naming_it():
  with pytest.raises(SystemExit, match='nope'):
    quality.main(['--quick', '--methods', 'adamw,nope'])


def test_rows_are_those_of_the_committed_table():
  """The shared table (benchmarks.methods) gives each committed row the
  description, learning-rate ratio and rank rule it ran with."""
  path = (pathlib.Path(__file__).parents[1] / 'benchmarks' / 'results'
          / 'quality_cpu.json')
  committed = json.loads(path.read_text())
  quarter = committed['setup']['model']['dim'] // 4
  assert [r['method'] for r in committed['rows']] == list(quality.METHODS)
  for row in committed['rows']:
    method = quality.METHODS[row['method']]
    assert method.description == row['description'], row['method']
    assert method.lr_ratio * row['lr_multiplier'] == pytest.approx(
        row['lr_ratio_to_adamw']), row['method']
    if method.rank == 'quarter':
      assert row['rank'] == quarter
    elif method.rank != 'match_budget':
      assert row['rank'] == method.rank, row['method']
