"""The library's warnings name the caller's line, not library code.

Each warning is raised through ``utils.warn_at_caller``, which attributes it to
the first frame outside subspace_optax, jax, optax, flax and chex: here, this
file, whether the library is reached directly, through ``optax.chain``,
``jax.jit`` or ``flax.nnx.Optimizer``.
"""

import warnings

import jax
import jax.numpy as jnp
import optax
import pytest

import subspace_optax as so
from subspace_optax import continual as cl

# A (6, 4) matrix at rank 4 keeps a state no smaller than Adam's.
_PARAMS = {'w': jnp.ones((6, 4))}


def _caught(fn, category):
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter('always')
    fn()
  found = [w for w in caught if issubclass(w.category, category)]
  assert found, f'no {category.__name__} raised'
  return found


@pytest.mark.parametrize('how', ['direct', 'chain', 'jit'])
def test_full_size_warning_points_at_the_caller(how):
  tx = so.galore(1e-3, rank=4)
  init = {
      'direct': lambda: tx.init(_PARAMS),
      'chain': lambda: optax.chain(optax.clip(1.0), tx).init(_PARAMS),
      'jit': lambda: jax.jit(tx.init)(_PARAMS),
  }[how]
  for w in _caught(init, so.FullSizeWarning):
    assert w.filename == __file__, (w.filename, w.lineno)


def test_full_size_warning_through_nnx_optimizer_points_at_the_caller():
  nnx = pytest.importorskip('flax.nnx')
  model = nnx.Linear(6, 4, rngs=nnx.Rngs(0))
  tx = so.galore(1e-3, rank=4)
  found = _caught(lambda: nnx.Optimizer(model, tx, wrt=nnx.Param),
                  so.FullSizeWarning)
  assert all(w.filename == __file__ for w in found), [
      (w.filename, w.lineno) for w in found]


def test_rank_clamped_warning_points_at_the_caller():
  params = {'head': jnp.ones((64, 10)) + jnp.eye(64, 10)}
  found = _caught(
      lambda: cl.sculpt_memory(params, rule='released', task=3,
                               max_fraction=1.0),
      cl.RankClampedWarning)
  assert all(w.filename == __file__ for w in found)


def test_overflow_warning_points_at_the_caller():
  memory = cl.empty_memory({'w': jnp.zeros((6, 4))}, mode='left', capacity=2)
  new = {'w': cl.ProtectedSubspace(jnp.eye(6)[:, :3], optax.MaskedNode(),
                                   jnp.array(3), optax.MaskedNode())}
  found = _caught(lambda: cl.add_directions(memory, new, on_overflow='warn'),
                  RuntimeWarning)
  assert all(w.filename == __file__ for w in found)


def test_deprecated_name_points_at_the_caller():
  found = _caught(lambda: so.memory, DeprecationWarning)
  assert all(w.filename == __file__ for w in found)


def test_warn_at_caller_skips_library_frames_only():
  from subspace_optax._src import utils  # pylint: disable=g-import-not-at-top
  found = _caught(lambda: utils.warn_at_caller('x', UserWarning), UserWarning)
  assert found[0].filename == __file__
