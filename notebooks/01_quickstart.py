# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Quickstart: low-rank optimizers are optax transforms
#
# `subspace_optax` runs an optimizer such as Adam or Lion inside a low-rank
# subspace of each weight gradient. The method comes from GaLore (Zhao et al.,
# [arXiv 2403.03507](https://arxiv.org/abs/2403.03507)). For a weight matrix
# $W$ with gradient $G$ and an orthonormal basis $Q$ ($k \times r$) taken from
# $G$'s top singular vectors:
#
# $$C = Q^\top G, \qquad N = \mathrm{inner}(C), \qquad
#   \Delta W = -\eta\,\alpha\, Q N .$$
#
# The inner optimizer only sees the $r \times l$ coefficients $C$, so its moments
# have that shape and not $k \times l$. That is where the memory saving comes
# from.
#
# In this notebook:
# 1. put a low-rank method into an optax pipeline;
# 2. train a flax NNX MLP on scikit-learn's bundled digits with AdamW, GaLore and
#    Lion-in-a-subspace;
# 3. measure the optimizer memory (`so.state_bytes`), compare it with the
#    analytic size, and scale it up to a LLaMA-60M-shaped model;
# 4. look inside the state: every stage of the pipeline is a named field.
#
# Set `SUBSPACE_OPTAX_SMOKE=1` to shrink every size, which is how CI runs this
# notebook.

# %%
import os
import time

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax
from flax import nnx
from sklearn.datasets import load_digits

import subspace_optax as so

SMOKE = os.environ.get('SUBSPACE_OPTAX_SMOKE') == '1'
STEPS = 60 if SMOKE else 500
HIDDEN = 128 if SMOKE else 512
RANK = 16 if SMOKE else 32
print(f'jax {jax.__version__}, optax {optax.__version__}, smoke={SMOKE}')

# %% [markdown]
# ## 1. A method is an optax `GradientTransformation`
#
# `so.galore(...)` is a whole optimizer: the subspace pipeline, then decoupled
# weight decay, then the learning rate. It chains like any other optax
# transform, so gradient clipping goes in front:

# %%
galore = optax.chain(
    optax.clip_by_global_norm(1.0),
    so.galore(learning_rate=4e-3, rank=RANK, refresh=50, scale=0.25,
              weight_decay=1e-4),
)

# %% [markdown]
# `so.low_rank(inner, ...)` is the building block underneath. It takes **any**
# optax transform that does not need `params` and runs it on the coefficients
# $C$. For example Lion (Chen et al., [arXiv 2302.06675](https://arxiv.org/abs/2302.06675))
# in a randomized-SVD subspace that is refreshed every 50 steps:

# %%
lion_in_subspace = optax.chain(
    optax.clip_by_global_norm(1.0),
    so.low_rank(optax.scale_by_lion(b1=0.9, b2=0.99), rank=RANK, refresh=50,
                basis='randomized'),
    optax.add_decayed_weights(1e-4),
    optax.scale_by_learning_rate(3e-4),
)

# %% [markdown]
# Which leaves are projected? By default every 2-D leaf is a matrix. The inner
# optimizer runs at full size on every other leaf (biases, norms), as in
# GaLore's second parameter group. For stacked layers or convolution kernels,
# pass `dimension_numbers=so.last_two_axes` or a pytree of
# `so.DimensionNumbers`.
#
# Applying the optimizer is plain optax:

# %%
params = {'kernel': jnp.ones((256, 64)), 'bias': jnp.zeros((64,))}
state = galore.init(params)
gradients = jax.tree.map(lambda p: jax.random.normal(jax.random.key(0), p.shape),
                         params)
updates, state = jax.jit(galore.update)(gradients, state, params)
params = optax.apply_updates(params, updates)
jax.tree.map(jnp.shape, updates)

# %% [markdown]
# ## 2. Train a small model: AdamW vs GaLore vs Lion in a subspace
#
# This is a flax NNX MLP on the 8×8 digits that ship with scikit-learn (1,797
# images, 10 classes). We keep 1,400 images for training and test on the rest.

# %%
digits = load_digits()
x_all = (digits.data / 16.0).astype(np.float32)
y_all = digits.target.astype(np.int32)
order = np.random.default_rng(0).permutation(len(x_all))
x_all, y_all = x_all[order], y_all[order]
x_train, y_train = jnp.asarray(x_all[:1400]), jnp.asarray(y_all[:1400])
x_test, y_test = jnp.asarray(x_all[1400:]), jnp.asarray(y_all[1400:])


class MLP(nnx.Module):

  def __init__(self, hidden: int, *, rngs: nnx.Rngs):
    self.layer1 = nnx.Linear(64, hidden, rngs=rngs)
    self.layer2 = nnx.Linear(hidden, hidden, rngs=rngs)
    self.head = nnx.Linear(hidden, 10, rngs=rngs)

  def __call__(self, x):
    x = jax.nn.gelu(self.layer1(x))
    x = jax.nn.gelu(self.layer2(x))
    return self.head(x)


def cross_entropy(model, x, y):
  return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()


@nnx.jit
def train_step(model, optimizer, x, y):
  loss, grads = nnx.value_and_grad(cross_entropy)(model, x, y)
  optimizer.update(model, grads)
  return loss


@nnx.jit
def accuracy(model, x, y):
  return jnp.mean(jnp.argmax(model(x), -1) == y)


def train(tx, steps=STEPS, batch_size=128, seed=0):
  model = MLP(HIDDEN, rngs=nnx.Rngs(seed))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  batches = np.random.default_rng(seed).integers(0, len(x_train),
                                                 (steps, batch_size))
  losses = []
  start = time.perf_counter()
  for index in batches:
    losses.append(float(train_step(model, optimizer, x_train[index],
                                   y_train[index])))
  seconds = time.perf_counter() - start
  return dict(model=model, optimizer=optimizer, losses=np.array(losses),
              test_accuracy=float(accuracy(model, x_test, y_test)),
              seconds=seconds)


optimizers = {
    'adamw': optax.chain(optax.clip_by_global_norm(1.0),
                         optax.adamw(1e-3, weight_decay=1e-4)),
    'galore (adam, svd)': galore,  # from section 1
    'lion in a subspace': lion_in_subspace,
}
runs = {name: train(tx) for name, tx in optimizers.items()}
for name, run in runs.items():
  print(f"{name:20s} final loss {run['losses'][-20:].mean():.3f}   "
        f"test accuracy {run['test_accuracy']:.3f}   "
        f"({run['seconds']:.1f} s with compilation)")


# %%
def smooth(values, width=10):
  return np.convolve(values, np.ones(width) / width, mode='valid')


fig, ax = plt.subplots(figsize=(6, 3.5))
for name, run in runs.items():
  ax.plot(smooth(run['losses']), label=name)
ax.set(xlabel='step', ylabel='training loss (smoothed)', yscale='log',
       title=f'MLP on digits, rank {RANK} of {HIDDEN}')
ax.legend()
fig.tight_layout()
plt.show()

# %% [markdown]
# The low-rank runs lower the training loss more slowly than AdamW, because
# each step moves only `RANK` directions of each matrix. Their test accuracy
# (printed above) ends close to AdamW's all the same. They cost more steps and
# save memory, which the next section measures.
#
# ## 3. Memory: measured and analytic
#
# `so.state_bytes(state)` adds up the bytes of every array in an optimizer
# state. It works on concrete states, on `jax.eval_shape` outputs and on
# `nnx.Optimizer` states. For GaLore with the Adam inner optimizer, the size is
# known in closed form (`so.state_sizes.galore_bytes`). Each projected $m \times n$ matrix
# holds a basis of $k r$ floats and two moments of $r l$ floats each, where $k$
# is the projected side and $l$ the other one. Every other leaf keeps Adam's
# $2|p|$.

# %%
mlp_params = nnx.state(runs['adamw']['model'], nnx.Param)
rows = []
for name, run in runs.items():
  rows.append((name, so.state_bytes(run['optimizer'].opt_state)))
analytic = so.state_sizes.galore_bytes(mlp_params, RANK)
parameter_bytes = so.state_bytes(mlp_params)

print(f"{'optimizer':22s}{'state bytes':>14s}{'vs adamw':>10s}")
for name, size in rows:
  print(f"{name:22s}{size:14,d}{size / rows[0][1]:10.2f}")
print(f"{'galore (analytic)':22s}{analytic:14,d}{analytic / rows[0][1]:10.2f}")
print(f"{'(parameters)':22s}{parameter_bytes:14,d}")
assert rows[1][1] == analytic, 'measured GaLore state != analytic size'

# %% [markdown]
# `so.summary(tx, params)` splits the state per parameter leaf: whether the leaf
# is projected, the shape of its basis, its rank, and its bytes next to what
# AdamW would keep. It builds the state with `jax.eval_shape`, so it allocates
# nothing. Look at the $H \times 10$ head: its rank is clamped to 10, so its
# basis is $10 \times 10$ and its moments $10 \times H$, slightly *more* than
# Adam's $2 \cdot 10 H$ floats. `init` said so: a `so.FullSizeWarning` names
# every leaf whose low-rank state is not smaller than Adam's (and every stacked
# or convolution leaf the default dimension numbers leave at full size). Here
# the fix is to give the head plain Adam with `dimension_numbers` (None for the
# head), or to use a rank below 10.

# %%
print(so.summary(galore, nnx.to_pure_dict(mlp_params)))

# %% [markdown]
# Here almost every parameter sits in a matrix, and `RANK` is a small fraction
# of the width, so the state shrinks several times over. (The $H \times 10$
# head is narrower than the rank: its rank is clamped to 10.) Real language
# models also have embeddings, which usually keep full Adam. `jax.eval_shape`
# builds the state's *shapes* without allocating anything, so we can size the
# optimizer of a LLaMA-60M-shaped model (8 blocks, dim 512, SwiGLU width 1376,
# a 32k vocabulary, as in the GaLore paper's smallest model; rank 128):

# %%
dim, ffn, layers, vocab = 512, 1376, 8, 32000
shapes = {'embed': (vocab, dim), 'lm_head': (dim, vocab)}
for layer in range(layers):
  for name in ('wq', 'wk', 'wv', 'wo'):
    shapes[f'block{layer}/{name}'] = (dim, dim)
  shapes[f'block{layer}/w_gate'] = (dim, ffn)
  shapes[f'block{layer}/w_up'] = (dim, ffn)
  shapes[f'block{layer}/w_down'] = (ffn, dim)
  shapes[f'block{layer}/norms'] = (2, dim)
# Embeddings and norms keep full Adam, as in the paper: project the block
# matrices only.
big_params = {k: jax.ShapeDtypeStruct(s, jnp.float32) for k, s in shapes.items()}
projected = {k: (so.DimensionNumbers() if '/w' in k else None) for k in shapes}

large_optimizers = {
    'adamw': optax.adamw(1e-3),
    'galore r=128 (reference side)': so.galore(1e-2, rank=128,
                                               dimension_numbers=projected),
    'galore r=128 (compact)': so.galore(
        1e-2, rank=128, side='compact', dimension_numbers=projected),
    'lion in subspace r=128': so.low_rank(
        optax.scale_by_lion(), rank=128, dimension_numbers=projected),
}
large = {name: so.state_bytes(jax.eval_shape(tx.init, big_params))
         for name, tx in large_optimizers.items()}
large_analytic = so.state_sizes.galore_bytes(big_params, 128, dimension_numbers=projected)
assert large['galore r=128 (reference side)'] == large_analytic
for name, size in large.items():
  print(f"{name:32s}{size / 2**20:9.1f} MiB   {size / large['adamw']:.2f}x adamw")
print(f"{'parameters':32s}{so.state_bytes(big_params) / 2**20:9.1f} MiB")

# %%
fig, axes = plt.subplots(1, 2, figsize=(10, 3.2))
names = [name for name, _ in rows]
axes[0].barh(names, [size / 1024 for _, size in rows], color='C0')
axes[0].set(xlabel='optimizer state (KiB)', title=f'digits MLP (rank {RANK})')
axes[1].barh(list(large), [size / 2**20 for size in large.values()],
             color='C1')
axes[1].set(xlabel='optimizer state (MiB)', title='LLaMA-60M shapes (rank 128)')
for ax in axes:
  ax.invert_yaxis()
fig.tight_layout()
plt.show()

# %% [markdown]
# At this size the 32k-entry embedding and output head keep full Adam
# moments, and they hold more than half of the parameters. The block matrices
# alone shrink much more. With the default reference side, a
# $512 \times 1376$ matrix goes from $2 \cdot 512 \cdot 1376$ moment floats to
# a $512 \times 128$ basis plus two $128 \times 1376$ moments (the compact side
# would keep a $1376 \times 128$ basis and two $128 \times 512$ moments):

# %%
blocks = [s for k, s in shapes.items() if '/w' in k]
adam_floats = sum(2 * m * n for m, n in blocks)
reference_floats = sum(min(m, n) * 128 + 2 * 128 * max(m, n) for m, n in blocks)
compact_floats = sum(max(m, n) * 128 + 2 * 128 * min(m, n) for m, n in blocks)
print(f'block matrices: adam {adam_floats * 4 / 2**20:.1f} MiB, '
      f'galore {reference_floats * 4 / 2**20:.1f} MiB with the reference side '
      f'({adam_floats / reference_floats:.1f}x smaller), '
      f'{compact_floats * 4 / 2**20:.1f} MiB with the compact side '
      f'({adam_floats / compact_floats:.1f}x)')

# %% [markdown]
# Two more things to note. The Lion variant is smaller still, because Lion
# keeps one moment instead of two. The default `side='reference'` (the paper's
# `proj_type='std'`) puts the basis on the *smaller* dimension of each matrix.
# `side='compact'` puts it on the larger one, so the moments get the smaller
# one: at the same rank it saves more, but per byte of state it trained worse on
# this library's quality benchmark (see `so.low_rank`'s docstring).
#
# ## 4. Inside the state: the pipeline's named stages
#
# The low-rank part of the state is a `so.SubspaceState` NamedTuple. There is
# one field per stage:
#
# | field | what it holds |
# |---|---|
# | `count` | number of updates so far (int32) |
# | `basis` | per projected leaf, the basis $Q$ ($k \times r$); `MaskedNode()` for leaves that are not projected |
# | `refresh` | per projected leaf, the refresh policy's state (the staggered schedule) |
# | `inner_state` | the inner optimizer's state, on **low-rank** coefficient shapes |
# | `residual_state` | the state of the residual path on $G - QQ^\top G$ (FRUGAL / Fira); `EmptyState()` here |

# %%
subspace_state = galore.init(
    {'kernel': jnp.ones((256, 64)), 'bias': jnp.zeros((64,))})[1][0]
assert isinstance(subspace_state, so.SubspaceState)
for field in subspace_state._fields:
  value = getattr(subspace_state, field)
  print(f'{field:15s}', jax.tree.map(jnp.shape, value))

# %% [markdown]
# The kernel is $256 \times 64$. With the reference side the basis spans the 64
# columns ($64 \times r$), and Adam's `mu` and `nu` are $r \times 256$ instead
# of $256 \times 64$. The bias is not a matrix: it has no basis and keeps full Adam
# moments.
#
# The same structure is inside the trained NNX optimizer:

# %%
trained = runs['galore (adam, svd)']['optimizer'].opt_state
trained_subspace = trained[1][0]
print('updates so far:', int(trained_subspace.count[...]))
# nnx.Optimizer boxes every array in an OptArray; to_pure_dict unboxes them.
print('basis shapes:  ',
      jax.tree.map(jnp.shape, nnx.to_pure_dict(trained_subspace.basis)))
print('adam mu shapes:',
      jax.tree.map(jnp.shape, nnx.to_pure_dict(trained_subspace.inner_state.mu)))

# %% [markdown]
# Each basis has orthonormal columns, $Q^\top Q = I_r$:

# %%
basis = trained_subspace.basis['layer2']['kernel'][...]
print('max |QᵀQ - I| =', float(jnp.abs(basis.T @ basis - jnp.eye(RANK)).max()))

# %% [markdown]
# **Next:** `02_anatomy_of_a_subspace` looks at what the basis captures and how
# it moves. `03_continual_learning` uses subspaces to keep old tasks from being
# forgotten.
