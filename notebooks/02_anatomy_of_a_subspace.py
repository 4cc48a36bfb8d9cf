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
# # Anatomy of a subspace
#
# A low-rank optimizer trusts three things: that the gradient's energy lives in a
# few directions, that those directions change slowly enough to be refreshed
# only every $T$ steps, and that the basis is computed well (accurately and
# cheaply, and with consistent signs). This notebook checks each one on the
# gradients of a real model: a small byte-level language model trained on the
# source code of Python's standard library (which ships with every Python, so
# nothing is downloaded):
#
# 1. **spectra**: the singular values of a weight gradient, and the fraction of
#    its energy that the top $r$ directions capture;
# 2. **motion**: how far the basis turns between refreshes (principal angles),
#    and how much of the gradient a stale basis still captures;
# 3. **exact vs randomized SVD**: energy captured and time per refresh;
# 4. **sign alignment**: singular vectors are defined only up to sign. Without
#    alignment, Adam's first moment is negated at a refresh;
# 5. **the weight's own basis**: fine-tuning methods such as SVFit work in the
#    singular basis of the pre-trained weight instead of the gradient's.
#
# Set `SUBSPACE_OPTAX_SMOKE=1` to shrink every size (that is how CI runs it).

# %%
import os
import time

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax

import subspace_optax as so

SMOKE = os.environ.get('SUBSPACE_OPTAX_SMOKE') == '1'
HIDDEN = 128 if SMOKE else 512
RANK = 8 if SMOKE else 16
REFRESH = 15 if SMOKE else 50
STEPS = (4 if SMOKE else 12) * REFRESH
BATCH = 256
CONTEXT, EMBED = 16, 16  # predict the next byte from the previous 16

# %% [markdown]
# ## The model and its gradient stream
#
# The model predicts the next byte of Python source from the previous
# `CONTEXT` bytes. It embeds them, concatenates the embeddings and applies a
# three-layer MLP with 256 output logits (an MLP language model in the style of
# Bengio et al. 2003). We train it with GaLore (exact SVD, rank `RANK`, refresh
# every `REFRESH` steps, no stagger so that every leaf refreshes on the same
# step) and watch the hidden $H \times H$ layer `layer2`. `side='left'` puts the
# basis on the rows, so $C = Q^\top G$ with $Q \in \mathbb{R}^{H \times r}$.

# %%
library = os.path.dirname(os.__file__)
text = b''.join(open(os.path.join(library, name), 'rb').read()
                for name in ('argparse.py', 'typing.py', 'inspect.py'))
data = np.frombuffer(text, np.uint8).astype(np.int32)
print(f'{len(data):,} bytes of Python source')
starts = np.random.default_rng(0).integers(0, len(data) - CONTEXT - 1,
                                           (STEPS, BATCH))
x_batches = data[starts[..., None] + np.arange(CONTEXT)]  # (steps, batch, ctx)
y_batches = data[starts + CONTEXT]  # (steps, batch)


def init_mlp(key):
  keys = jax.random.split(key, 4)
  sizes = [(CONTEXT * EMBED, HIDDEN), (HIDDEN, HIDDEN), (HIDDEN, 256)]
  params = {'embed': 0.1 * jax.random.normal(keys[0], (256, EMBED))}
  for i, ((n_in, n_out), k) in enumerate(zip(sizes, keys[1:])):
    params[f'layer{i + 1}'] = {
        'w': jax.random.normal(k, (n_in, n_out)) / np.sqrt(n_in),
        'b': jnp.zeros((n_out,)),
    }
  return params


def forward(params, tokens):
  x = params['embed'][tokens].reshape(tokens.shape[0], -1)
  for name in ('layer1', 'layer2'):
    x = jax.nn.gelu(x @ params[name]['w'] + params[name]['b'])
  return x @ params['layer3']['w'] + params['layer3']['b']


def loss_fn(params, x, y):
  return optax.softmax_cross_entropy_with_integer_labels(
      forward(params, x), y).mean()


def make_step(tx):
  @jax.jit
  def step(params, state, x, y):
    loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss, grads, updates
  return step


def galore_with(basis, align_signs=True, rank=RANK):
  return so.galore(4e-3, rank=rank, refresh=REFRESH, basis=basis,
                   stagger=False, side='left', align_signs=align_signs)


tx = galore_with('svd')
step = make_step(tx)
params = init_mlp(jax.random.key(0))
state = tx.init(params)
snapshots, bases, captured, losses = [], [], [], []
replay_steps = min(STEPS, 2 * REFRESH + 10)
stream = []  # the first gradients of layer2, replayed in section 4
for t, (x, y) in enumerate(zip(x_batches, y_batches)):
  params, state, loss, grads, _ = step(params, state, x, y)
  g = np.asarray(grads['layer2']['w'])
  q = np.asarray(state[0].basis['layer2']['w'])
  captured.append(np.sum((q.T @ g) ** 2) / np.sum(g ** 2))
  losses.append(float(loss))
  if t < replay_steps:
    stream.append(g)
  if t % REFRESH == 0:  # a refresh step: keep the gradient and the new basis
    snapshots.append(g)
    bases.append(q)
print(f'{STEPS} steps, loss {losses[0]:.2f} -> {np.mean(losses[-10:]):.3f}, '
      f'{len(snapshots)} refreshes recorded')

# %% [markdown]
# ## 1. Gradient spectra
#
# The gradient of a linear layer over a batch is a sum of `BATCH` outer products,
# so its rank is at most $\min(H, \text{BATCH})$. In practice its spectrum
# decays much faster than that. The energy captured at rank $r$ is
# $\sum_{i \le r} \sigma_i^2 / \sum_i \sigma_i^2$, which is exactly
# $\|Q^\top G\|_F^2 / \|G\|_F^2$ for the top-$r$ singular vectors $Q$.

# %%
chosen = [0, len(snapshots) // 2, len(snapshots) - 1]
fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
for i in chosen:
  s = np.linalg.svd(snapshots[i], compute_uv=False)
  label = f'step {i * REFRESH}'
  axes[0].semilogy(s / s[0], label=label)
  axes[1].plot(np.arange(1, len(s) + 1), np.cumsum(s ** 2) / np.sum(s ** 2),
               label=label)
axes[0].set(xlabel='index i', ylabel='σ_i / σ_1',
            title=f'singular values of ∇layer2 ({HIDDEN}×{HIDDEN})')
axes[1].axvline(RANK, color='gray', ls='--', lw=1)
axes[1].set(xlabel='rank r', ylabel='energy captured', xscale='log',
            title='energy in the top-r directions')
for ax in axes:
  ax.legend()
fig.tight_layout()
plt.show()

ranks = [r for r in (1, 4, 8, 16, 32, 64, 128) if r <= HIDDEN]
print('rank   ' + ''.join(f'{r:>7d}' for r in ranks))
for i in chosen:
  s = np.linalg.svd(snapshots[i], compute_uv=False)
  energy = np.cumsum(s ** 2) / np.sum(s ** 2)
  print(f'step {i * REFRESH:<4d}' + ''.join(f'{energy[r - 1]:7.3f}'
                                           for r in ranks))

# %% [markdown]
# ## 2. How the basis moves
#
# Between refreshes the basis is frozen and the gradient keeps moving. The
# curve is the fraction of each step's gradient that the *current* basis
# captures. On a refresh step it equals the top-$r$ energy. Watch what happens
# on the very next step, and then during the rest of the period.

# %%
fig, ax = plt.subplots(figsize=(8, 3))
ax.plot(captured, lw=1, label='‖QᵀG‖² / ‖G‖², current basis')
for t in range(0, STEPS, REFRESH):
  ax.axvline(t, color='gray', lw=0.5)
ax.set(xlabel='step', ylabel='energy captured', ylim=(0, 1),
       title=f'rank {RANK}, refresh every {REFRESH} steps (gray lines)')
ax.legend(loc='lower right')
fig.tight_layout()
plt.show()
refreshes = range(REFRESH, STEPS, REFRESH)  # every period after the first
print('energy captured, mean over the periods after the first:')
for label, offset in (('the refresh step', 0), ('the next step', 1),
                      ('the last step of the period', REFRESH - 1)):
  print(f'  on {label:29s}'
        f'{np.mean([captured[t + offset] for t in refreshes]):.3f}')

# %% [markdown]
# Two bases $Q_a, Q_b$ span subspaces whose **principal angles** $\theta_i$
# have cosines equal to the singular values of $Q_a^\top Q_b$. If all
# $\cos\theta_i = 1$, the subspace has not moved; if they are 0, it is
# orthogonal to the old one. For each refresh we plot the mean $\cos^2\theta$,
# $\|Q_a^\top Q_b\|_F^2 / r$. We do it for the exact-SVD bases that the
# optimizer actually used, and for randomized bases (`so.bases.randomized()`)
# computed from the same gradients.

# %%
def principal_cosines(qa, qb):
  return np.linalg.svd(np.asarray(qa).T @ np.asarray(qb), compute_uv=False)


randomized = so.bases.randomized(oversample=8, power_iterations=1)
randomized_refresh = jax.jit(randomized.refresh, static_argnums=3)
random_bases, old = [], randomized.init(HIDDEN, HIDDEN, RANK)
for i, g in enumerate(snapshots):
  old = randomized_refresh(jnp.asarray(g), old, jax.random.key(i), True)
  random_bases.append(np.asarray(old))

overlap = {
    'exact SVD (the optimizer)': [
        np.mean(principal_cosines(a, b) ** 2)
        for a, b in zip(bases[:-1], bases[1:])],
    'randomized, same gradients': [
        np.mean(principal_cosines(a, b) ** 2)
        for a, b in zip(random_bases[:-1], random_bases[1:])],
}
fig, axes = plt.subplots(1, 2, figsize=(10, 3.3))
for name, values in overlap.items():
  axes[0].plot(np.arange(1, len(values) + 1) * REFRESH, values, 'o-',
               label=name)
axes[0].set(xlabel='step of the new basis', ylabel='mean cos² θ',
            ylim=(0, 1.05), title='overlap of successive bases')
axes[0].legend()
last = len(bases) - 1
for name, (qa, qb) in {'exact': (bases[last - 1], bases[last]),
                       'randomized': (random_bases[last - 1],
                                      random_bases[last])}.items():
  angles = np.degrees(np.arccos(np.clip(principal_cosines(qa, qb), 0, 1)))
  axes[1].plot(np.sort(angles), 'o-', ms=3, label=name)
axes[1].set(xlabel='i (sorted)', ylabel='θ_i (degrees)',
            title='principal angles at the last refresh')
axes[1].legend()
fig.tight_layout()
plt.show()
print('exact vs randomized basis on the same gradient, mean cos² θ:',
      np.round([np.mean(principal_cosines(a, b) ** 2)
                for a, b in zip(bases, random_bases)], 3))

# %% [markdown]
# Two effects show up together. The first is that the basis turns a lot between
# refreshes. Only the top few directions are stable (the smallest principal
# angles are a few degrees), and the rest of the subspace turns almost
# completely (angles up to 90°). Those tail directions have small, nearly equal
# singular values, so which of them the SVD picks depends on the batch. The
# second is that this costs little energy. The top directions carry most of it,
# and after the first period a stale basis still captures almost as much of
# each new gradient as on the step right after a refresh. Most of the drop from
# the refresh step happens at once, on the next batch: it is batch noise, not
# slow drift. The first period is the exception, because early in training the
# gradient changes quickly. The randomized basis tracks the exact one closely
# (the last printed line is their overlap on the same gradient).
#
# ## 3. Exact vs randomized SVD: energy and time
#
# `so.bases.randomized` is a randomized range finder (Halko, Martinsson & Tropp,
# [arXiv 0909.4061](https://arxiv.org/abs/0909.4061)): it sketches $Y = G\Omega$
# with $r + p$ random columns, sharpens the sketch with power iterations, and
# finishes with a small Rayleigh–Ritz step. It costs $O(k\,l\,r)$ instead of the
# SVD's $O(k\,l\,\min(k, l))$, and needs only $(r+p) \times (r+p)$
# factorisations. We first look at the energy it captures on the real gradients:

# %%
def energy(q, g):
  return float(np.sum((np.asarray(q).T @ g) ** 2) / np.sum(g ** 2))


methods = {
    'svd': so.bases.svd(),
    'randomized q=0': so.bases.randomized(power_iterations=0),
    'randomized q=1 (default)': randomized,
    'randomized q=2': so.bases.randomized(power_iterations=2),
}
refresh_fns = {name: jax.jit(m.refresh, static_argnums=3)
               for name, m in methods.items()}
refresh_fns['randomized q=1 (default)'] = randomized_refresh  # compiled above
initial = methods['svd'].init(HIDDEN, HIDDEN, RANK)
print(f"{'method':26s}{'energy captured (mean over snapshots)':>40s}")
for name, refresh in refresh_fns.items():
  values = [energy(refresh(jnp.asarray(g), initial, jax.random.key(i), True), g)
            for i, g in enumerate(snapshots)]
  print(f'{name:26s}{np.mean(values):40.4f}')

# %% [markdown]
# One power iteration already brings the randomized basis within a fraction of
# a percent of the optimal energy. Next, the time per refresh on larger
# matrices with a decaying spectrum ($\sigma_i = i^{-1}$). The times are
# medians over a few calls, after compilation, on this machine's CPU.

# %%
def test_matrix(key, m, n):
  ka, kb = jax.random.split(key)
  u, _ = jnp.linalg.qr(jax.random.normal(ka, (m, min(m, n))))
  v, _ = jnp.linalg.qr(jax.random.normal(kb, (n, min(m, n))))
  return (u / jnp.arange(1, min(m, n) + 1)) @ v.T


def median_seconds(fn, *args, repeats=3):
  jax.block_until_ready(fn(*args))  # compile
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return float(np.median(times))


sizes = [256] if SMOKE else [256, 512, 1024]
timing = {'svd': [], 'randomized q=1 (default)': []}
for size in sizes:
  g = test_matrix(jax.random.key(size), size, size)
  rank = size // 8
  old = methods['svd'].init(size, size, rank)
  for name in timing:
    fn = jax.jit(lambda g, old, m=methods[name]: m.refresh(
        g, old, jax.random.key(0), True))
    timing[name].append(median_seconds(fn, g, old))
  print(f'{size}x{size}, rank {rank}: ' + ', '.join(
      f'{name} {values[-1] * 1e3:.1f} ms' for name, values in timing.items()))

fig, ax = plt.subplots(figsize=(5, 3.3))
for name, values in timing.items():
  ax.loglog(sizes, np.array(values) * 1e3, 'o-', label=name)
ax.set(xlabel='matrix size n (n×n, rank n/8)', ylabel='ms per refresh',
       title='refresh cost on CPU')
ax.legend()
fig.tight_layout()
plt.show()

# %% [markdown]
# On a GPU the gap is larger, because the SVD runs mostly sequentially. The
# randomized method is also the one that works on sharded gradients: its
# orthonormalisation only forms $(r+p) \times (r+p)$ Gram matrices, so a
# row-sharded $G$ is never gathered.
#
# ## 4. Sign alignment
#
# If $u$ is a singular vector, so is $-u$. LAPACK and cuSOLVER pick a sign that
# depends on the matrix, so it can change from one refresh to the next. GaLore
# keeps Adam's moments across a refresh. Adam's first moment for direction
# $i$ is a running mean of $q_i^\top G$. When $q_i$ flips, the new coefficients
# have the opposite sign to the stored momentum. The momentum then pushes the
# wrong way for about $1/(1-\beta_1)$ steps. The second moment is squared and
# does not notice.
#
# `align_signs=True` (the default) flips each new column to have a non-negative
# dot product with the old one. To show what it fixes, we build an SVD basis
# whose column signs are random at every refresh. This is the worst case of
# the arbitrary sign convention, and it mirrors the one in
# `tests/low_rank_test.py`. It is not far-fetched: `so.bases.randomized`
# draws a new sketch at every refresh, so its column signs really are random
# from one refresh to the next.

# %%
exact_svd = so.bases.svd()


def refresh_with_random_signs(g, old, key, align):
  u = exact_svd.refresh(g, old, key, False)
  u = u * jax.random.rademacher(key, (u.shape[1],), jnp.float32)
  return so.bases.align_signs(u, old) if align else u


svd_random_signs = exact_svd._replace(name='svd_random_signs',
                                      refresh=refresh_with_random_signs)

# %% [markdown]
# First, replay one gradient stream (the first `layer2` gradients recorded
# above) and compare each run's updates with the plain SVD run. With alignment,
# the sign convention has no effect at all. Without it, the updates differ
# right after every refresh.

# %%
def replay(tx, gradient_list):
  params = {'w': jnp.zeros((HIDDEN, HIDDEN))}
  state = tx.init(params)
  update = jax.jit(tx.update)
  out = []
  for g in gradient_list:
    u, state = update({'w': jnp.asarray(g)}, state, params)
    out.append(np.asarray(u['w']))
  return out


reference_updates = replay(galore_with('svd'), stream)
difference = {}
for align in (False, True):
  updates = replay(galore_with(svd_random_signs, align_signs=align), stream)
  difference[align] = [
      np.abs(a - b).max() / np.abs(b).max()
      for a, b in zip(updates, reference_updates)]
  print(f'align_signs={align!s:5s}: max relative |Δupdate| = '
        f'{max(difference[align]):.2e}')

fig, ax = plt.subplots(figsize=(8, 3))
for align, values in difference.items():
  exact = ' (exactly 0: drawn at the bottom)' if max(values) == 0 else ''
  ax.semilogy(np.maximum(values, 1e-12), label=f'align_signs={align}{exact}')
for t in range(0, replay_steps, REFRESH):
  ax.axvline(t, color='gray', lw=0.5)
ax.set(xlabel='step', ylabel='max |Δu| / max |u|', ylim=(1e-12, 10),
       title='random-sign SVD vs plain SVD, same gradients')
ax.legend()
fig.tight_layout()
plt.show()

# %% [markdown]
# Then train with random signs and no alignment, and compare with the
# reference run from the start of the notebook.

# %%
def train(tx):
  train_step = make_step(tx)
  params = init_mlp(jax.random.key(0))
  state = tx.init(params)
  out = []
  for x, y in zip(x_batches, y_batches):
    params, state, loss, _, _ = train_step(params, state, x, y)
    out.append(float(loss))
  return np.array(out)


curves = {
    'svd (reference)': np.array(losses),
    'random signs, align_signs=False': train(
        galore_with(svd_random_signs, align_signs=False)),
}
fig, ax = plt.subplots(figsize=(7, 3.3))
width = 10
for name, curve in curves.items():
  ax.plot(np.convolve(curve, np.ones(width) / width, mode='valid'), label=name)
ax.set(xlabel='step', ylabel='training loss (smoothed)', yscale='log')
ax.legend()
fig.tight_layout()
plt.show()
for name, curve in curves.items():
  print(f'{name:34s} final loss {curve[-10:].mean():.4f}')

# %% [markdown]
# With `align_signs=True` the random-sign run would draw exactly the reference
# curve, because the replay above showed that its updates are identical. The
# unaligned run has part of its momentum negated at every refresh. Here that
# costs only a little loss: with a refresh every `REFRESH` steps and
# $\beta_1 = 0.9$, the negated momentum decays within about ten steps of each
# period. The cost grows with more frequent refreshes and larger $\beta_1$. The
# replay is the cleaner measurement: right after a refresh, the updates differ
# by as much as the updates themselves.

# %% [markdown]
# ## 5. Fine-tuning in the weight's own singular basis
#
# The optimizers above follow the subspace of the *gradient*. Fine-tuning
# methods such as SVFit, MiLoRA, PiSSA, SALT and Effort work in the singular
# basis of the pre-trained *weight* $W = U \Sigma V^\top$ instead. SVFit
# (`so.svfit`) trains only the top $r$ singular values, so its update is
# $\Delta = U_r\,\mathrm{diag}(\delta s)\,V_r^\top$: diagonal in that basis.
# It runs on the dense weights, with no adapter in the model
# (`so.reparameterize` keeps the factors in the optimizer state and emits the
# weight's change). A few steps from the trained `params`, `layer2` only (the
# `mask`), and the change $U^\top \Delta V$ next to AdamW's:

# %%
only_layer2 = jax.tree.map(lambda _: False, params)
only_layer2['layer2']['w'] = True
w0 = params['layer2']['w']
u, s, vt = np.linalg.svd(np.asarray(w0))


def change_in_weight_basis(tx, steps=5):
  train_step = make_step(tx)
  p, st = params, tx.init(params)
  for x, y in zip(x_batches[:steps], y_batches[:steps]):
    p, st, *_ = train_step(p, st, x, y)
  return u.T @ np.asarray(p['layer2']['w'] - w0) @ vt.T  # Uᵀ Δ V


in_basis = {
    f'svfit, rank {RANK}': change_in_weight_basis(
        so.svfit(1e-3, rank=RANK, mask=only_layer2)),
    'adamw': change_in_weight_basis(optax.adamw(1e-3)),
}
fig, axes = plt.subplots(1, 2, figsize=(8, 3.6))
for ax, (name, m) in zip(axes, in_basis.items()):
  off = m - np.diag(np.diag(m))
  print(f'{name:14s} off-diagonal share of |UᵀΔV|: '
        f'{np.linalg.norm(off) / np.linalg.norm(m):.1e}')
  block = np.abs(m[:2 * RANK, :2 * RANK])
  ax.imshow(np.log10(np.maximum(block, 1e-12)), vmin=-9, cmap='viridis')
  ax.set(title=f'{name}: log10 |UᵀΔV|', xlabel='j (V)', ylabel='i (U)')
fig.tight_layout()
plt.show()

# %% [markdown]
# SVFit's change has no off-diagonal entries beyond float32 rounding, and none
# past the first $r$ diagonal ones: the singular vectors of `layer2` stay
# exactly where they were. AdamW's change spreads over every pair of
# directions. The fine-tuning benchmark (`python -m benchmarks.finetune`,
# results in `docs/which_method.md`) compares the family
# on a pre-trained model.
#
# **Next:** `03_continual_learning` keeps a subspace *fixed* on purpose, to
# protect what earlier tasks learned.
