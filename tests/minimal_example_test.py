"""examples/minimal.py runs and GaLore's state is smaller than AdamW's."""

import pytest

from examples import minimal


@pytest.mark.slow
def test_minimal_example_trains_with_less_state():
  results = minimal.main(steps=60)
  (adamw_loss, adamw_state), (galore_loss, galore_state) = (
      results['adamw'], results['galore'])
  first_loss, _ = minimal.train(minimal.so.galore(3e-2, rank=0.25), steps=1)
  assert galore_loss < 0.5 * first_loss  # it trains
  assert galore_state < 0.5 * adamw_state
