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
# # Continual learning with protected subspaces
#
# Train one network on a sequence of tasks and it forgets the earlier ones:
# the updates for task $t$ overwrite the directions that tasks $< t$ relied on.
# `subspace_optax.continual` prevents that with **orthogonal updates**. After
# each task we store, for every weight matrix, a protected subspace: an
# orthonormal basis $U$ on the input side and/or $V$ on the output side. From
# then on, the update applied to that weight has no component in it:
#
# $$\Delta \;\leftarrow\; (I - UU^\top)\,\Delta\,(I - VV^\top).$$
#
# `continual.orthogonal_to(...)` is that projection, written as an optax
# stage. It goes **last** in the chain, after Adam, weight decay and the
# learning rate. A projection does not commute with Adam's elementwise
# scaling, so if it ran earlier, part of the update would leak back into the
# protected subspace.
#
# We compare, on a sequence of *permuted digits* tasks (scikit-learn's 8×8
# digits, with a different fixed pixel permutation per task):
#
# * **naive** fine-tuning with Adam;
# * **EWC** (Kirkpatrick et al., [arXiv 1612.00796](https://arxiv.org/abs/1612.00796)),
#   a penalty baseline;
# * **GPM** (Saha et al., [arXiv 2103.09762](https://arxiv.org/abs/2103.09762)):
#   $U$ spans each layer's *inputs* on earlier tasks, so the old inputs $x$ see
#   an unchanged layer, $x\,\Delta = 0$;
# * **Sculpt** (Nayak et al., [arXiv 2504.07097](https://arxiv.org/abs/2504.07097)):
#   $U, V$ are the top singular vectors of the *weights* themselves, so the
#   updates stay out of each weight's dominant directions.
#
# Set `SUBSPACE_OPTAX_SMOKE=1` to shrink every size (that is how CI runs it).

# %%
import os

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax
from sklearn.datasets import load_digits

import subspace_optax as so
from subspace_optax import continual

SMOKE = os.environ.get('SUBSPACE_OPTAX_SMOKE') == '1'
NUM_TASKS = 3 if SMOKE else 5
STEPS_PER_TASK = 100 if SMOKE else 300
WIDTH = 128
BATCH = 32
LEARNING_RATE = 1e-3

# %% [markdown]
# ## Tasks and model
#
# Every task is the same 10-class problem, seen through a different pixel
# permutation (task 0 is the identity). We keep 80% of the images for training
# and test on the rest. The model is a bias-free MLP, so that every parameter
# is a matrix and every parameter is protected.

# %%
digits = load_digits()
x_all = (digits.data / 16.0).astype(np.float32)
y_all = digits.target.astype(np.int32)
order = np.random.default_rng(0).permutation(len(x_all))
x_all, y_all = x_all[order], y_all[order]
split = int(0.8 * len(x_all))

rng = np.random.default_rng(1)
permutations = [np.arange(64)] + [rng.permutation(64)
                                  for _ in range(NUM_TASKS - 1)]
tasks = [dict(x_train=jnp.asarray(x_all[:split][:, p]),
              y_train=jnp.asarray(y_all[:split]),
              x_test=jnp.asarray(x_all[split:][:, p]),
              y_test=jnp.asarray(y_all[split:]))
         for p in permutations]


def init_mlp(key):
  sizes = [(64, WIDTH), (WIDTH, WIDTH), (WIDTH, 10)]
  keys = jax.random.split(key, len(sizes))
  names = ['layer1', 'layer2', 'head']
  return {name: {'w': jax.random.normal(k, shape) * np.sqrt(2 / shape[0])}
          for name, k, shape in zip(names, keys, sizes)}


def forward(params, x, return_inputs=False):
  """Logits, and optionally each layer's input (for GPM's memory)."""
  inputs = {'layer1': x}
  h = jax.nn.relu(x @ params['layer1']['w'])
  inputs['layer2'] = h
  h = jax.nn.relu(h @ params['layer2']['w'])
  inputs['head'] = h
  logits = h @ params['head']['w']
  return (logits, inputs) if return_inputs else logits


def loss_fn(params, x, y):
  return optax.softmax_cross_entropy_with_integer_labels(
      forward(params, x), y).mean()


@jax.jit
def accuracy(params, x, y):
  return jnp.mean(jnp.argmax(forward(params, x), -1) == y)


def make_trainer(tx):
  """One jitted call trains a whole task (lax.scan over the steps)."""

  @jax.jit
  def train_task(params, opt_state, x, y, key):
    def step(carry, key):
      params, opt_state = carry
      index = jax.random.randint(key, (BATCH,), 0, x.shape[0])
      loss, grads = jax.value_and_grad(loss_fn)(params, x[index], y[index])
      updates, opt_state = tx.update(grads, opt_state, params)
      return (optax.apply_updates(params, updates), opt_state), loss

    (params, opt_state), losses = jax.lax.scan(
        step, (params, opt_state), jax.random.split(key, STEPS_PER_TASK))
    return params, opt_state, losses

  return train_task


# %% [markdown]
# ## The methods
#
# Each method is an optax transform plus something to do at task boundaries.
# The boundary step writes the new memory, anchor or Fisher *into the optimizer
# state* (`continual.set_memory`, `optax.tree.set`). The shapes never change,
# so the jitted trainer never recompiles.

# %%
def nll_one(params, example):
  x, y = example
  return optax.softmax_cross_entropy_with_integer_labels(
      forward(params, x[None]), y[None])[0]


def ewc_boundary(params, opt_state, task):
  fisher = continual.fisher_diagonal(
      nll_one, params, (task['x_train'][:300], task['y_train'][:300]))
  return continual.consolidate_ewc(opt_state, params, fisher)


def gpm_boundary(params, opt_state, task, threshold=0.97):
  _, inputs = forward(params, task['x_train'][:300], return_inputs=True)
  activations = {name: {'w': x} for name, x in inputs.items()}
  memory = continual.gpm_memory(activations, threshold,
                                continual.get_memory(opt_state))
  return continual.set_memory(opt_state, memory)


SCULPT_FRACTION = 0.5


def sculpt_boundary(params, opt_state, task):
  del task  # sculpt protects the weights' own top singular directions
  memory = continual.sculpt_memory(params, max_fraction=SCULPT_FRACTION)
  return continual.set_memory(opt_state, memory)


methods = {
    'naive': (optax.adam(LEARNING_RATE), None),
    'EWC': (optax.chain(continual.ewc(strength=100.0),
                        optax.adam(LEARNING_RATE)), ewc_boundary),
    'GPM': (optax.chain(optax.adam(LEARNING_RATE),
                        continual.orthogonal_to(mode='left')), gpm_boundary),
    'Sculpt': (continual.sculpt(LEARNING_RATE, max_fraction=SCULPT_FRACTION),
               sculpt_boundary),
}

# %% [markdown]
# ## Train each method on the task sequence
#
# After training on task $i$ we evaluate on every task $j$. That gives the
# accuracy matrix $R_{ij}$. Entries above the diagonal are tasks not seen yet
# (chance for a permuted task). Entries below it show forgetting.

# %%
results = {}
for name, (tx, boundary) in methods.items():
  train_task = make_trainer(tx)
  params = init_mlp(jax.random.key(0))
  opt_state = tx.init(params)
  matrix = continual.accuracy_matrix(NUM_TASKS)
  states = []
  for i, task in enumerate(tasks):
    params, opt_state, _ = train_task(params, opt_state, task['x_train'],
                                      task['y_train'], jax.random.key(i))
    matrix = continual.record(matrix, i, [
        float(accuracy(params, t['x_test'], t['y_test'])) for t in tasks])
    if boundary is not None:
      opt_state = boundary(params, opt_state, task)
    states.append((params, opt_state))
  results[name] = dict(matrix=matrix, states=states)
  summary = continual.summary(matrix)
  print(f"{name:8s} average accuracy {summary['average_accuracy']:.3f}   "
        f"backward transfer {summary['backward_transfer']:+.3f}   "
        f"forgetting {summary['forgetting']:.3f}")

# %%
fig, axes = plt.subplots(1, len(results), figsize=(3 * len(results) + 1, 3.3),
                         layout='constrained')
for ax, (name, result) in zip(axes, results.items()):
  matrix = result['matrix']
  image = ax.imshow(matrix, vmin=0, vmax=1, cmap='viridis')
  for i in range(NUM_TASKS):
    for j in range(NUM_TASKS):
      ax.text(j, i, f'{matrix[i, j]:.2f}', ha='center', va='center',
              color='white' if matrix[i, j] < 0.6 else 'black', fontsize=8)
  ax.set(title=f"{name} (ACC {continual.average_accuracy(matrix):.2f})",
         xlabel='evaluated on task', xticks=range(NUM_TASKS),
         yticks=range(NUM_TASKS))
axes[0].set_ylabel('after training task')
fig.colorbar(image, ax=axes, shrink=0.8, label='test accuracy')
plt.show()

# %% [markdown]
# Naive fine-tuning learns every task (the diagonal) and forgets the earlier
# ones (the lower triangle). EWC slows the forgetting down. GPM keeps the old
# tasks almost intact: it freezes the layers' response to the old inputs, and
# each task still has enough free input directions to learn in. Sculpt
# protects a fixed fraction of each weight's singular directions, here
# `SCULPT_FRACTION`. That trades plasticity (how well a new task is learned)
# for stability (how little an old one is forgotten). Sculpt was designed for
# fine-tuning large pretrained models with wide layers. On this tiny MLP, the
# trade-off is steeper.
#
# ## The protected subspace
#
# What does the mask actually do to an update? We take the GPM model after
# task 0, whose memory holds the span of each layer's task-0 inputs, and
# compute one task-1 update in two ways. The first is Adam's step before the
# final `orthogonal_to` stage; the second is after it. The chain's state is a
# tuple, one entry per stage, so we can run the stages one by one.

# %%
# The two stages of methods['GPM']: the same transforms, run one at a time on
# the matching entries of the chain's state.
adam_stage = optax.adam(LEARNING_RATE)
mask_stage = continual.orthogonal_to(mode='left')
params0, opt_state0 = results['GPM']['states'][0]
memory = continual.get_memory(opt_state0)
print('protected fraction of each input space after task 0:',
      {k: round(v, 2) for k, v in continual.protected_fraction(memory).items()})

grads = jax.grad(loss_fn)(params0, tasks[1]['x_train'][:BATCH],
                          tasks[1]['y_train'][:BATCH])
raw, _ = adam_stage.update(grads, opt_state0[0], params0)
masked, _ = mask_stage.update(raw, opt_state0[1], params0)

fig, axes = plt.subplots(1, 3, figsize=(12, 3.2), layout='constrained')
for ax, layer in zip(axes, ['layer1', 'layer2', 'head']):
  count = int(memory[layer]['w'].left_count)
  u = memory[layer]['w'].left[:, :count]  # (m, c) protected input directions
  for label, update in (('Adam step (before)', raw), ('after orthogonal_to',
                                                      masked)):
    norms = jnp.linalg.norm(u.T @ update[layer]['w'], axis=1)
    ax.semilogy(np.maximum(np.asarray(norms), 1e-12), '.', label=label)
  ax.set(title=f'{layer}: {count} protected directions',
         xlabel='protected direction i', ylabel='‖u_iᵀ Δ‖')
axes[0].legend()
plt.show()

# %% [markdown]
# Before masking, the step has large components along the protected
# directions. After masking they are at float32 rounding level. For GPM, this
# means that the layer's output on any input $x$ in the protected span does
# not move: $x(W + \Delta) = xW$. Real old inputs are only *mostly* in the
# span, because the memory keeps a `threshold` = 97% of their energy. So the
# change of the layer's output on them drops by an order of magnitude, and the
# small remainder comes from the 3% left out:

# %%
def relative_change(x, delta):
  """‖x Δ‖ / (‖x‖ ‖Δ‖): how much the update moves the outputs on x."""
  return float(jnp.linalg.norm(x @ delta) /
               (jnp.linalg.norm(x) * jnp.linalg.norm(delta)))


_, old_inputs = forward(params0, tasks[0]['x_test'], return_inputs=True)
print(f"{'':15s}{'old inputs x':>14s}{'their part in the span, xUUᵀ':>32s}")
for layer in ('layer1', 'layer2', 'head'):
  count = int(memory[layer]['w'].left_count)
  u = memory[layer]['w'].left[:, :count]
  x = old_inputs[layer]
  for label, update in (('before', raw), ('after', masked)):
    delta = update[layer]['w']
    print(f'{layer:7s} {label:7s}{relative_change(x, delta):14.2e}'
          f'{relative_change(x @ u @ u.T, delta):32.2e}')

# %% [markdown]
# Sculpt's memory is two-sided: the top singular vectors $U$ (inputs) and $V$
# (outputs) of each weight. The mask removes every component that touches
# them, so the block $U^\top \Delta V$ (and more) is zero. Here is
# $|U^\top \Delta V|$ for `layer2`'s first 32 protected directions, before and
# after the mask:

# %%
params_s, opt_state_s = results['Sculpt']['states'][0]
memory_s = continual.get_memory(opt_state_s)
grads_s = jax.grad(loss_fn)(params_s, tasks[1]['x_train'][:BATCH],
                            tasks[1]['y_train'][:BATCH])
# sculpt = chain(adam, learning rate, orthogonal_to): run all but the last
# stage, then the mask.
adam_and_lr = optax.chain(optax.scale_by_adam(),
                          optax.scale_by_learning_rate(LEARNING_RATE))
raw_s, _ = adam_and_lr.update(grads_s, opt_state_s[:2], params_s)
masked_s, _ = continual.orthogonal_to(mode='two_sided').update(
    raw_s, opt_state_s[2], params_s)
leaf = memory_s['layer2']['w']
shown = min(32, int(leaf.left_count))
u, v = leaf.left[:, :shown], leaf.right[:, :shown]
fig, axes = plt.subplots(1, 2, figsize=(8, 3.6), layout='constrained')
for ax, (label, update) in zip(axes, (('before', raw_s), ('after', masked_s))):
  block = np.abs(np.asarray(u.T @ update['layer2']['w'] @ v))
  image = ax.imshow(np.log10(block + 1e-12), vmin=-12, vmax=-3, cmap='magma')
  ax.set(title=f'log10 |UᵀΔV|, {label} the mask', xlabel='j (column of V)')
axes[0].set_ylabel('i (column of U)')
fig.colorbar(image, ax=axes, shrink=0.8)
plt.show()
print('max |UᵀΔ| after the mask:',
      float(jnp.abs(u.T @ masked_s['layer2']['w']).max()))

# %% [markdown]
# **Takeaways.** An orthogonal-update method is one optax stage plus a memory
# that you refresh at task boundaries. It has no extra parameters per task,
# stores no old data, and needs no recompilation between tasks. The memory
# decides the trade-off: GPM protects what the old *inputs* need, and Sculpt
# protects what the *weights* consider important.
#
# The hyper-parameters here are those that `examples/continual.py` tuned on a
# validation split. That script also runs the L2-to-anchor baseline,
# task-incremental *split* digits and Sculpt's per-layer importance, and
# `benchmarks/continual.py` reports the numbers as JSON.
