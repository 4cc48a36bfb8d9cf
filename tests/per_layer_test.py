"""per_layer_train_step: the whole-tree step's result without the whole gradient.

A toy residual stack (``h + tanh(h U) D * s`` per layer, stacked under
``'blocks'`` with the kernel names ``benchmarks.methods.block_matrices``
projects) is trained for three steps (a basis refresh at step 2) by the
per-layer step and by ``jax.grad`` + ``tx.update`` on the whole tree; params
and state must agree to float tolerance.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import subspace_optax as so
from benchmarks import methods as bench_methods

L, D, H, V = 3, 128, 256, 8


def embed(rest, x):
  return x @ rest['embed']['kernel']


def layer(p, h):
  up = jnp.tanh(h @ p['mlp']['up']['kernel'])
  return h + (up @ p['mlp']['down']['kernel']) * p['norm']['scale']


def head_loss(rest, h, x):
  # 32 outputs: the last layer's gradient has full rank (<= min(batch,
  # outputs) = 32), so no basis column of a rank-32 method spans rounding
  # noise (whose direction differs between any two programs).
  return jnp.mean((h @ rest['lm_head']['kernel'] - jnp.tile(x, (1, 4))) ** 2)


def whole_loss(params, x):
  rest = {k: v for k, v in params.items() if k != 'blocks'}
  h, _ = jax.lax.scan(lambda h, p: (layer(p, h), None), embed(rest, x),
                      params['blocks'])
  return head_loss(rest, h, x)


def make_params():
  k = jax.random.split(jax.random.key(0), 4)
  return {
      'embed': {'kernel': jax.random.normal(k[0], (V, D)) * 0.3},
      'blocks': {
          'mlp': {'up': {'kernel': jax.random.normal(k[1], (L, D, H)) * 0.2},
                  'down': {'kernel': jax.random.normal(k[2], (L, H, D)) * 0.1}},
          'norm': {'scale': jnp.ones((L, D))}},
      'lm_head': {'kernel': jax.random.normal(k[3], (D, 32)) * 0.3},
  }


def batches(n=3):
  # 32 rows: each layer's gradient has full rank, so no subspace
  # coefficient is float noise that Adam's first step would blow up to ±lr.
  return [jax.random.normal(jax.random.key(10 + i), (32, V)) for i in range(n)]


def whole_step(tx):
  def step(params, state, x):
    loss, grads = jax.value_and_grad(whole_loss)(params, x)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss
  return jax.jit(step)


def run_both(tx, params=None, dtype=None, **options):
  params = make_params() if params is None else params
  if dtype is not None:
    params = jax.tree.map(lambda x: x.astype(dtype), params)
  state = tx.init(params)
  per_layer = jax.jit(so.per_layer_train_step(
      tx, embed=embed, layer=layer, head_loss=head_loss, check_shared=True,
      **options))
  whole = whole_step(tx)
  a, b, all_same = (params, state), (params, state), True
  for x in batches():
    x = x if dtype is None else x.astype(dtype)
    *a, loss_a, same = per_layer(*a, x)
    *b, loss_b = whole(*b, x)
    np.testing.assert_allclose(loss_a, loss_b, rtol=1e-5)
    all_same &= bool(same)
  return a, b, all_same


def assert_trees_close(a, b, atol=1e-5):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    tolerance = {'atol': atol, 'rtol': 1e-4}
    if x.dtype == jnp.bfloat16:
      # bfloat16 state (galore_bf16_state): float32 noise moves a rounding
      # by one bf16 ulp, and a moment that is a small difference of larger
      # terms (m = β m + (1 - β) g) carries the ulp of those terms: one ulp
      # at the leaf's scale.
      scale = float(np.max(np.abs(np.asarray(y, np.float32))))
      tolerance = {'atol': max(atol, 2.0 ** -8 * scale), 'rtol': 1e-2}
    np.testing.assert_allclose(np.asarray(x, np.float32),
                               np.asarray(y, np.float32), **tolerance)


def build(name, **overrides):
  rank = bench_methods.get(name).rank
  options = dict(learning_rate=1e-2, rank=rank if isinstance(rank, float)
                 else 4, refresh=2, weight_decay=0.1, seed=0) | overrides
  return bench_methods.get(name).build(**options)


# The list (adamw, galore, 8-bit q_galore, apollo_mini, fira,
# frugal) and golore, whose random bases need layer l's key of the whole
# tree's split.
CORE = {
    'adamw': lambda: build('adamw'),
    'galore': lambda: build('galore'),
    'q_galore_8bit': lambda: so.q_galore(
        1e-2, rank=32, refresh=so.refresh.every(2), side='compact',
        dimension_numbers=bench_methods.block_matrices),
    'apollo_mini': lambda: build('apollo_mini'),
    'fira': lambda: build('fira'),
    'frugal': lambda: build('frugal'),
    'golore': lambda: build('golore'),
}


# Rounding to INT4 bases and 8-bit moments, and FRUGAL's sign of the
# residual, turn float32 noise between the two gradients (summed in another
# order) into whole quantisation steps or flipped signs of entries near 0; in
# float64 they agree.
FLOAT64 = {'q_galore_8bit', 'frugal'}


@pytest.mark.parametrize('name', [
    # float64 and 8-bit moments: the slowest case to compile.
    pytest.param(n, marks=pytest.mark.slow) if n == 'q_galore_8bit' else n
    for n in CORE])
def test_equals_whole_tree_step(name):
  tx = CORE[name]()
  if name in FLOAT64:
    with jax.enable_x64(True):
      (params, state), (params_w, state_w), same = run_both(
          tx, dtype=jnp.float64)
  else:
    (params, state), (params_w, state_w), same = run_both(tx)
  assert same
  assert_trees_close(params, params_w)
  assert_trees_close(state, state_w, atol=1e-4)
  # The step moved the layers (an update that was dropped would also "agree"
  # with a whole-tree step that dropped it).
  moved = params['blocks']['mlp']['up']['kernel'] - make_params()[
      'blocks']['mlp']['up']['kernel']
  assert np.all(np.abs(np.asarray(moved)).max(axis=(1, 2)) > 0)


def test_q_galore_8bit_moments_are_quantized():
  state = CORE['q_galore_8bit']().init(make_params())
  dtypes = {x.dtype for x in jax.tree.leaves(state)}
  assert jnp.dtype(jnp.uint8) in dtypes or jnp.dtype(jnp.int8) in dtypes


def test_random_bases_use_the_whole_tree_keys():
  # Layer l's key is key l of the stacked leaf's split; a one-layer update
  # that split its own key would draw other bases and differ.
  tx = build('golore')
  (params, _), (params_w, _), _ = run_both(tx)
  first = make_params()['blocks']['mlp']['up']['kernel']
  np.testing.assert_allclose(params['blocks']['mlp']['up']['kernel'] - first,
                             params_w['blocks']['mlp']['up']['kernel'] - first,
                             atol=1e-6)


# Every other registry row: the same result as the whole-tree step (in
# float64 where a sign or a quantisation turns float32 noise into whole
# steps), or a named error. optax_galore refuses stacked (L, m, n) leaves,
# in the whole-tree step too.
NOT_SEPARABLE = {
    'q_galore': 'lazy refresh',  # its default policy: use refresh=<int>
    'q_galore_8bit_moments': 'lazy refresh',
    # A (3, 4, 256) moment (3,072 entries) stays float32 and a 4-layer one is
    # quantized (quantize_moments' min_size of 4,096): one layer's state
    # cannot be a slice of the stack's.
    'galore_8bit_moments': 'grows to',
    'adamp': 'zero-size', 'sgdp': 'zero-size',  # norms over the whole tree
}
REGISTRY_FLOAT64 = {'frugal_blocks'}


@pytest.mark.slow
@pytest.mark.parametrize('name', [
    n for n in bench_methods.REGISTRY if n not in CORE and n != 'optax_galore'])
def test_every_registry_method(name):
  if name in NOT_SEPARABLE:
    tx = build(name)
    params = make_params()
    with pytest.raises(so.NotLayerSeparableError, match=NOT_SEPARABLE[name]):
      jax.jit(so.per_layer_train_step(
          tx, embed=embed, layer=layer, head_loss=head_loss)).trace(
              params, jax.eval_shape(tx.init, params), batches(1)[0])
    return
  with jax.enable_x64(name in REGISTRY_FLOAT64):
    (params, state), (params_w, state_w), same = run_both(
        build(name), dtype=jnp.float64 if name in REGISTRY_FLOAT64 else None)
  assert same
  assert_trees_close(params, params_w, atol=2e-5)
  assert_trees_close(state, state_w, atol=1e-4)


def test_clip_norm_is_exact():
  tx = build('galore')
  clipped = optax.chain(optax.clip_by_global_norm(0.05), tx)
  params = make_params()
  state = tx.init(params)
  step = jax.jit(so.per_layer_train_step(
      tx, embed=embed, layer=layer, head_loss=head_loss, clip_norm=0.05))
  whole = whole_step(clipped)
  a, b = (params, state), (params, clipped.init(params))
  for x in batches():
    *a, _ = step(*a, x)
    *b, _ = whole(*b, x)
  assert_trees_close(a[0], b[0])
  # The clip acted: without it the params differ.
  unclipped, _, _ = run_both(tx)
  assert not np.allclose(unclipped[0]['lm_head']['kernel'],
                         a[0]['lm_head']['kernel'], atol=1e-4)


def test_gradient_accumulation_in_the_subspace():
  """galore(accumulate_steps=3): each layer's QᵀG is summed inside the
  backward scan over 3 calls, then applied, as by the whole-tree step."""
  tx = so.galore(1e-2, rank=4, refresh=2, weight_decay=0.1, accumulate_steps=3,
                 dimension_numbers=bench_methods.block_matrices)
  (params, state), (params_w, state_w), same = run_both(tx)
  assert same
  assert_trees_close(params, params_w)
  assert_trees_close(state, state_w, atol=1e-4)
  assert not np.allclose(params['blocks']['mlp']['up']['kernel'],
                         make_params()['blocks']['mlp']['up']['kernel'])


@pytest.mark.parametrize('tx, match', [
    (lambda: optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-2)),
     'clip_norm'),
    (lambda: optax.apply_if_finite(optax.adam(1e-2), 3), 'whole-tree'),
    (lambda: optax.MultiSteps(optax.adam(1e-2), 2).gradient_transformation(),
     'MultiSteps'),
    (lambda: so.q_galore(1e-2, rank=32,
                         dimension_numbers=bench_methods.block_matrices),
     'refresh=<int>'),
    (lambda: so.adamp(1e-2), 'zero-size'),
    # The (3, 128) norm scales' moments are quantized (384 >= 300 entries),
    # one layer's (1, 128) would not be.
    (lambda: optax.chain(so.quantize_moments(optax.scale_by_adam(),
                                             min_size=300),
                         optax.scale(-1e-2)), 'min_size'),
])
def test_not_separable_transforms_get_a_named_error(tx, match):
  tx = tx()
  params = make_params()
  step = so.per_layer_train_step(tx, embed=embed, layer=layer,
                                 head_loss=head_loss)
  with pytest.raises(so.NotLayerSeparableError, match=match):  # when traced
    jax.jit(step).trace(params, jax.eval_shape(tx.init, params),
                        batches(1)[0])


def test_shared_state_check_catches_a_non_separable_transform():
  # A transform whose scalar state sums |g| over the tree: each one-layer
  # update sees a different part of it.
  def init(params):
    del params
    return jnp.zeros([], jnp.float32)

  def update(updates, state, params=None):
    del params
    total = sum(jnp.sum(jnp.abs(u)) for u in jax.tree.leaves(updates))
    return jax.tree.map(lambda u: -1e-2 * u, updates), state + total

  _, _, same = run_both(optax.GradientTransformation(init, update))
  assert not same
  _, _, same = run_both(optax.sgd(1e-2))
  assert same


def test_bad_params_get_a_named_error():
  tx = optax.adam(1e-2)
  params = make_params()
  step = so.per_layer_train_step(tx, embed=embed, layer=layer,
                                 head_loss=head_loss, stack='layers')
  with pytest.raises(ValueError, match="'layers'"):
    step(params, tx.init(params), batches(1)[0])
  with pytest.raises(TypeError, match='stack'):
    so.per_layer_train_step(tx, embed=embed, layer=layer,
                            head_loss=head_loss, stack=0)


def temp_bytes(step, *args):
  compiled = jax.jit(step, donate_argnums=(0, 1)).lower(*args).compile()
  return compiled.memory_analysis().temp_size_in_bytes


def _abstract_params(dtype, layers=16, dim=256, hidden=1024):
  spec = lambda *shape: jax.ShapeDtypeStruct(shape, dtype)
  return {
      'embed': {'kernel': spec(V, dim)},
      'blocks': {'mlp': {'up': {'kernel': spec(layers, dim, hidden)},
                         'down': {'kernel': spec(layers, hidden, dim)}},
                 'norm': {'scale': spec(layers, dim)}},
      'lm_head': {'kernel': spec(dim, 32)}}


def test_per_layer_temporaries_hold_no_full_gradient_tree():
  # Compiled ahead of time: 8 layers of 2 x 128 x 512 float32 weights
  # (4 MiB of stack gradients) and a tiny batch, SGD (no state). The
  # whole-tree step's temporaries hold the stack's gradient; the per-layer
  # step's hold one layer's gradient and the saved layer inputs.
  layers, dim, hidden = 8, 128, 512
  params = _abstract_params(jnp.float32, layers, dim, hidden)
  tx = optax.sgd(1e-3)
  state = jax.eval_shape(tx.init, params)
  x = jax.ShapeDtypeStruct((2, V), jnp.float32)
  stack_bytes = 2 * layers * dim * hidden * 4
  whole = temp_bytes(whole_step(tx).__wrapped__, params, state, x)
  per_layer = temp_bytes(so.per_layer_train_step(
      tx, embed=embed, layer=layer, head_loss=head_loss), params, state, x)
  assert whole >= stack_bytes
  assert per_layer < 0.6 * stack_bytes


def test_state_stacks_are_updated_in_place():
  # 8-bit Adam moments (16 MiB of int8/uint8 stacks for 16 layers); one
  # layer's optimizer temporaries are ~1/16 of that. A step that reads a
  # whole state stack while writing it in place makes XLA copy every stack
  # (twice, per layer): temporaries >= the stacks.
  params = _abstract_params(jnp.float32)
  tx = so.quantize_moments(optax.adam(1e-3), min_size=256)
  state = jax.eval_shape(tx.init, params)
  stacks = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state)
               if x.ndim == 3)
  temp = temp_bytes(so.per_layer_train_step(
      tx, embed=embed, layer=layer, head_loss=head_loss), params, state,
                    jax.ShapeDtypeStruct((2, V), jnp.float32))
  assert temp < 0.5 * stacks, (temp, stacks)


def test_bfloat16_stacks_are_not_converted_whole():
  # bfloat16 params: XLA:CPU computes their matmuls in float32 and, for a
  # stack scanned over or closed over, converts the whole stack ahead of the
  # loop. The step indexes barrier-carried stacks instead, so its
  # temporaries stay well under one float32 copy of the stacks.
  params = _abstract_params(jnp.bfloat16)
  tx = optax.sgd(1e-3)
  state = jax.eval_shape(tx.init, params)
  stacks_f32 = sum(2 * x.size for x in jax.tree.leaves(params['blocks']))
  temp = temp_bytes(so.per_layer_train_step(
      tx, embed=embed, layer=layer, head_loss=head_loss), params, state,
                    jax.ShapeDtypeStruct((2, V), jnp.bfloat16))
  assert temp < 0.5 * stacks_f32, (temp, stacks_f32)


@pytest.mark.parametrize('platform, pinned', [
    ('cuda', True), ('rocm', True), ('cpu', False), ('tpu', False)])
def test_gpu_lowering_pins_the_new_layer_params_row_major(platform, pinned):
  # XLA's GPU layout assignment can give a layer's new params a column-major
  # layout and then transpose every whole carried stack around the reverse
  # scan (LLaMA-7B, H100 ahead-of-time compile: 27.8 GB against 22.0 GB).
  # A GPU lowering pins each new >= 2-D layer param to row-major; the CPU
  # lowering (where the pin would cost a copy) does not.
  params = make_params()
  tx = optax.adam(1e-3)
  step = so.per_layer_train_step(tx, embed=embed, layer=layer,
                                 head_loss=head_loss)
  text = jax.jit(step).trace(params, tx.init(params), batches(1)[0]).lower(
      lowering_platforms=(platform,)).as_text()
  constraints = [line for line in text.splitlines()
                 if '@LayoutConstraint' in line]
  matrices = [x for x in jax.tree.leaves(params['blocks']) if x.ndim >= 3]
  assert len(constraints) == (len(matrices) if pinned else 0)
  for line in constraints:  # minor-to-major (n-1, ..., 0): row-major
    rank = int(line.split('result_layouts = [dense<[')[1][0]) + 1
    assert f"result_layouts = [dense<{list(range(rank))[::-1]}>".replace(
        ' ', '') in line.replace(' ', '')


@pytest.mark.slow
@pytest.mark.parametrize('name', ['adamw', 'galore', 'golore'])
def test_equals_whole_tree_step_on_the_fsdp_mesh(name):
  # 8 simulated devices (conftest.py); the stacks are sharded on their
  # input dimension, the layer axis replicated.
  # An Auto mesh: with Explicit axes the toy layer's carry would change its
  # sharding between iterations (a property of the model, not of the step).
  mesh = jax.make_mesh((8,), ('fsdp',), axis_types=(AxisType.Auto,))
  params = make_params()
  specs = {k: jax.tree.map(
      lambda x, k=k: P(None, 'fsdp', *[None] * (x.ndim - 2)) if k == 'blocks'
      else P('fsdp', None), v) for k, v in params.items()}
  params = jax.tree.map(lambda x, s: jax.device_put(
      x, NamedSharding(mesh, s)), params, specs)
  (a, state), (b, state_w), same = run_both(build(name), params)
  assert same
  assert_trees_close(a, b)
  assert_trees_close(state, state_w, atol=1e-4)
  assert a['blocks']['mlp']['up']['kernel'].sharding.spec == P(
      None, 'fsdp', None)


@pytest.mark.slow
def test_llama_per_layer_functions_give_the_whole_tree_step():
  # examples/lm's LLaMA split into embed / block / head (nnx State params).
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from examples.lm import model as model_lib  # pylint: disable=import-outside-toplevel
  config = model_lib.Config(dim=32, layers=3, heads=2, ffn_dim=64,
                            max_seq_len=16, scan_layers=True, vocab_size=50)
  graphdef, state = nnx.split(model_lib.Llama(config, rngs=nnx.Rngs(0)))
  params = nnx.as_pure(state)
  tx = build('galore')
  embed_fn, layer_fn, head_fn = model_lib.per_layer_functions(config)
  step = jax.jit(so.per_layer_train_step(
      tx, embed=embed_fn, layer=layer_fn, head_loss=head_fn))

  @jax.jit
  def whole(p, s, x):
    loss, g = jax.value_and_grad(lambda p: model_lib.cross_entropy(
        nnx.merge(graphdef, p)(x), x))(p)
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s, loss

  x = jax.random.randint(jax.random.key(1), (4, 16), 0, 50)
  a, b = (params, tx.init(params)), (params, tx.init(params))
  for _ in range(3):
    *a, loss_a = step(*a, (x, x))
    *b, loss_b = whole(*b, x)
    np.testing.assert_allclose(loss_a, loss_b, rtol=1e-5)
  assert_trees_close(a[0], b[0])
