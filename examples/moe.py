"""Sub-MoE expert merging on a small byte-level mixture-of-experts LM (CPU).

Trains a top-2 MoE transformer (8 SwiGLU experts per layer, stacked as
``(E, m, n)`` parameters, linear router, Switch load-balancing loss) briefly on
the CPython standard library sources (``examples/lm/data.py``), then merges
8 → 6 and 8 → 4 experts per layer, training-free, with

* ``prune``: keep the most-used experts (router columns dropped);
* ``average`` / ``freq_average``: plain / frequency-weighted average of each
  Sub-MoE group (same k-means groups as Sub-MoE);
* ``sub_moe``: ``so.merging.sub_moe`` at rank ``--rank`` (joint SVD; without
  truncation it equals ``freq_average``, which the run checks);
* ``sub_moe_whitened``: the same with ``whiten=`` (the joint SVD of the
  weights whitened by their calibration inputs: the sampled tokens for
  ``gate``/``up``, each expert's intermediate activations for ``down``);
* ``freq_average_svd``: ``freq_average`` truncated by its own SVD to the same
  rank (same storage as ``sub_moe``),

each merge with two router remaps: ``lse`` (keep the router, a group's logit
is the log-sum-exp of its members' logits, ``so.merging.remap_logits``) and
``linear`` (the group's router columns averaged with the merge weights).
Reports validation loss and its ratio to the full model's (``retained``) as
JSON, the median over seeds. Run: ``python -m examples.moe``.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import pathlib
import platform
import sys
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import subspace_optax as so
from examples.lm import data as data_lib
from examples.lm import model as model_lib

OUT = pathlib.Path('benchmarks/results/sub_moe_cpu.json')


class MoE(nnx.Module):
  """Top-k routed SwiGLU experts, computed densely (small ``E``)."""

  def __init__(self, dim: int, hidden: int, experts: int, top_k: int,
               rngs: nnx.Rngs):
    normal = lambda std, shape: nnx.Param(
        std * jax.random.normal(rngs.params(), shape))
    self.router = normal(dim**-0.5, (dim, experts))
    self.gate = normal(dim**-0.5, (experts, dim, hidden))
    self.up = normal(dim**-0.5, (experts, dim, hidden))
    self.down = normal(hidden**-0.5, (experts, hidden, dim))
    self.remap = nnx.data(None)  # a (G, E) Variable after an 'lse' merge
    self.top_k = top_k

  def route(self, x):
    logits = x @ self.router[...]
    if self.remap is not None:
      logits = so.merging.remap_logits(logits, self.remap[...])
    return logits, jax.lax.top_k(logits, self.top_k)

  def experts(self, x):  # (..., d) -> (..., E, d)
    h = jax.nn.silu(jnp.einsum('...d,edf->...ef', x, self.gate[...]))
    h = h * jnp.einsum('...d,edf->...ef', x, self.up[...])
    return jnp.einsum('...ef,efd->...ed', h, self.down[...])

  def __call__(self, x):
    logits, (top, index) = self.route(x)
    count = logits.shape[-1]
    chosen = jax.nn.one_hot(index, count)  # (..., k, E)
    combine = jnp.sum(chosen * jax.nn.softmax(top)[..., None], axis=-2)
    out = jnp.einsum('...e,...ed->...d', combine, self.experts(x))
    # Switch-style balance: E * sum_e (share of picks) * (mean probability).
    share = chosen.sum(-2).reshape(-1, count).mean(0) / self.top_k
    prob = jax.nn.softmax(logits).reshape(-1, count).mean(0)
    return out, count * jnp.sum(share * prob)


class Block(nnx.Module):

  def __init__(self, config, experts, top_k, rngs):
    self.attention_norm = model_lib.RMSNorm(config.dim, config.norm_eps)
    self.attention = model_lib.Attention(config, rngs=rngs)
    self.moe_norm = model_lib.RMSNorm(config.dim, config.norm_eps)
    self.moe = MoE(config.dim, config.ffn_dim, experts, top_k, rngs)

  def __call__(self, x, positions):
    x = x + self.attention(self.attention_norm(x), positions)
    h = self.moe_norm(x)
    out, aux = self.moe(h)
    return x + out, aux, h


class MoELM(nnx.Module):
  """Byte-level MoE transformer: tokens -> (logits, balance loss, inputs)."""

  def __init__(self, config, experts: int = 8, top_k: int = 2, *, rngs):
    self.embed = nnx.Embed(config.vocab_size, config.dim, rngs=rngs)
    self.blocks = nnx.List(
        [Block(config, experts, top_k, rngs) for _ in range(config.layers)])
    self.norm = model_lib.RMSNorm(config.dim, config.norm_eps)
    self.head = nnx.Linear(config.dim, config.vocab_size, use_bias=False,
                           rngs=rngs)

  def __call__(self, tokens):
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    x, aux, inputs = self.embed(tokens), 0.0, []
    for block in self.blocks:
      x, a, h = block(x, positions)
      aux, inputs = aux + a, inputs + [h]
    return self.head(self.norm(x)), aux / len(self.blocks), inputs


@nnx.jit
def train_step(model, optimizer, inputs, targets, balance):
  def loss_fn(model):
    logits, aux, _ = model(inputs)
    return model_lib.cross_entropy(logits, targets) + balance * aux

  loss, grads = nnx.value_and_grad(loss_fn)(model)
  optimizer.update(model, grads)
  return loss


@functools.partial(jax.jit, static_argnums=0)
def eval_loss(graphdef, state, inputs, targets):
  logits = nnx.merge(graphdef, state)(inputs)[0]
  return model_lib.cross_entropy(logits, targets)


@nnx.jit
def moe_inputs(model, inputs):
  return model(inputs)[2]


def evaluate(model, batches) -> float:
  """Mean validation loss; compiled once per model structure and shape."""
  graphdef, state = nnx.split(model)
  return float(np.mean([float(eval_loss(graphdef, state, *b))
                        for b in batches]))


def calibrate(model, batches, tokens: int, seed: int):
  """Per layer: expert outputs (E, N, d) on N sampled tokens, frequencies,
  and the sampled tokens (N, d)."""
  hs = [jnp.concatenate([h.reshape(-1, h.shape[-1]) for h in layer])
        for layer in zip(*[moe_inputs(model, b[0]) for b in batches])]
  rng = np.random.default_rng(seed)
  stats = []
  for block, h in zip(model.blocks, hs):
    _, (_, index) = block.moe.route(h)
    counts = jnp.bincount(index.reshape(-1), length=block.moe.gate.shape[0])
    sample = h[rng.choice(h.shape[0], min(tokens, h.shape[0]), replace=False)]
    stats.append((jnp.moveaxis(block.moe.experts(sample), -2, 0), counts,
                  sample))
  return stats


def weights_of(moe):
  return {'gate': moe.gate[...], 'up': moe.up[...], 'down': moe.down[...]}


def svd_truncate(w, rank):
  u, s, vt = jnp.linalg.svd(w, full_matrices=False)
  return (u[..., :rank] * s[..., None, :rank]) @ vt[..., :rank, :]


def merge(experts, weights, kind, rank):
  """Group averages of ``{name: (E, m, n)}`` with ``(G, E)`` weights."""
  out = {n: jnp.einsum('ge,emn->gmn', weights, w) for n, w in experts.items()}
  if kind == 'svd':
    out = {n: svd_truncate(w, rank) for n, w in out.items()}
  return out


def compressed(model, layers):
  """A copy of ``model`` with each layer's ``(experts, router, remap)``."""
  model = nnx.clone(model)
  for block, (experts, router, membership) in zip(model.blocks, layers):
    for name, w in experts.items():
      setattr(block.moe, name, nnx.Param(w))
    block.moe.router = nnx.Param(router)
    block.moe.remap = nnx.Variable(membership)
  return model


def compress_all(model, stats, groups: int, rank: int, seed: int):
  """Every compressed copy of ``model`` with ``groups`` experts per layer.

  Keys are ``(method, router remap)``. ``lse`` keeps the ``(d, E)`` router and
  groups its logits (``remap_logits``); ``linear`` and ``drop`` use a
  ``(d, G)`` router with an identity remap (plain logits).
  """
  layers = {}
  for block, (outputs, counts, sample) in zip(model.blocks, stats):
    experts, router = weights_of(block.moe), block.moe.router[...]
    full = so.merging.sub_moe(
        experts, outputs, counts, groups, None, jax.random.key(seed))
    trunc = so.merging.sub_moe(
        experts, outputs, counts, groups, rank, groups=full.groups)
    hidden = jax.nn.silu(jnp.einsum('nd,edf->enf', sample, experts['gate']))
    hidden = hidden * jnp.einsum('nd,edf->enf', sample, experts['up'])
    whitened = so.merging.sub_moe(
        experts, outputs, counts, groups, rank, groups=full.groups,
        whiten={'gate': sample, 'up': sample, 'down': hidden})
    member, freq = full.router_remap, full.weights
    for n, w in merge(experts, freq, 'avg', rank).items():  # the invariant
      np.testing.assert_allclose(full.experts[n], w, atol=1e-4, rtol=1e-4)
    plain = member / member.sum(1, keepdims=True)
    eye = jnp.eye(groups)
    keep = jnp.sort(jnp.argsort(-counts)[:groups])
    pruned = {n: w[keep] for n, w in experts.items()}
    layers.setdefault(('prune', 'drop'), []).append(
        (pruned, router[:, keep], eye))
    for name, merged in (
        ('average', merge(experts, plain, 'avg', rank)),
        ('freq_average', merge(experts, freq, 'avg', rank)),
        ('sub_moe', trunc.experts),
        ('sub_moe_whitened', whitened.experts),
        ('freq_average_svd', merge(experts, freq, 'svd', rank))):
      layers.setdefault((name, 'lse'), []).append((merged, router, member))
      layers.setdefault((name, 'linear'), []).append(
          (merged, router @ freq.T, eye))
  return {k: compressed(model, v) for k, v in layers.items()}


def run_seed(args, corpus, seed: int) -> dict:
  config = model_lib.Config(dim=args.dim, layers=args.layers, heads=4,
                            ffn_dim=args.hidden, max_seq_len=args.seq_len)
  model = MoELM(config, rngs=nnx.Rngs(seed))
  optimizer = nnx.Optimizer(
      model, optax.adamw(optax.warmup_cosine_decay_schedule(
          0.0, args.lr, max(1, args.steps // 10), max(args.steps, 2)),
                         weight_decay=0.0), wrt=nnx.Param)
  start = time.perf_counter()
  for step in range(args.steps):
    batch = data_lib.batch_at(corpus.train, seed=seed, step=step,
                              batch_size=args.batch_size, seq_len=args.seq_len)
    train_step(model, optimizer, *batch, args.balance)
  train_s = time.perf_counter() - start
  val = data_lib.eval_batches(corpus.val, batches=args.eval_batches,
                              batch_size=args.batch_size, seq_len=args.seq_len)
  calib = [data_lib.batch_at(corpus.train, seed=seed + 10_000, step=i,
                             batch_size=args.batch_size, seq_len=args.seq_len)
           for i in range(args.calib_batches)]
  stats = calibrate(model, calib, args.calib_tokens, seed)
  full = evaluate(model, val)
  result = {'seed': seed, 'train_seconds': round(train_s, 1),
            'full': full, 'frequencies': [np.asarray(c).tolist()
                                          for _, c, _ in stats], 'merged': {}}
  for groups in args.groups:
    models = compress_all(model, stats, groups, args.rank, seed)
    result['merged'][str(groups)] = {
        f'{m}/{r}': evaluate(cm, val) for (m, r), cm in models.items()}
  return result


def summarize(runs: list[dict]) -> dict:
  full = float(np.median([r['full'] for r in runs]))
  table = {}
  for groups in runs[0]['merged']:
    table[groups] = {}
    for name in runs[0]['merged'][groups]:
      losses = [r['merged'][groups][name] for r in runs]
      ratios = [r['full'] / r['merged'][groups][name] for r in runs]
      table[groups][name] = {
          'val_loss': round(float(np.median(losses)), 4),
          'retained': round(float(np.median(ratios)), 4),
          'increase': round(float(np.median(
              [l - r['full'] for l, r in zip(losses, runs)])), 4)}
  return {'full_val_loss': round(full, 4), 'by_experts': table}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--steps', type=int, default=300)
  p.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
  p.add_argument('--out', type=str, default=str(OUT),
                 help="JSON path ('' to skip writing)")
  p.add_argument('--groups', type=int, nargs='+', default=[6, 4])
  p.add_argument('--rank', type=int, default=32)
  p.add_argument('--dim', type=int, default=64)
  p.add_argument('--hidden', type=int, default=96)
  p.add_argument('--layers', type=int, default=2)
  p.add_argument('--seq-len', type=int, default=64)
  p.add_argument('--batch-size', type=int, default=16)
  p.add_argument('--lr', type=float, default=3e-3)
  p.add_argument('--balance', type=float, default=0.01)
  p.add_argument('--eval-batches', type=int, default=16)
  p.add_argument('--calib-batches', type=int, default=8)
  p.add_argument('--calib-tokens', type=int, default=1024)
  p.add_argument('--max-bytes', type=int, default=1_000_000)
  return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict:
  args = parse_args(argv)
  corpus = data_lib.load_corpus(max_bytes=args.max_bytes, seq_len=args.seq_len)
  start = time.perf_counter()
  runs = [run_seed(args, corpus, seed) for seed in args.seeds]
  report = {
      'benchmark': 'Sub-MoE expert merging, byte-level top-2 MoE LM',
      'device': 'cpu', 'cores': os.cpu_count(),
      'date': datetime.date.today().isoformat(),
      'command': ' '.join(['python -m examples.moe', *(
          sys.argv[1:] if argv is None else argv)]),
      'seeds': args.seeds, 'steps': args.steps,
      'config': {k: v for k, v in vars(args).items() if k != 'out'},
      'corpus': corpus.description, 'jax': jax.__version__,
      'python': platform.python_version(),
      'retained': 'full-model val loss / merged val loss (median over seeds)',
      **summarize(runs), 'runs': runs,
      'seconds': round(time.perf_counter() - start, 1)}
  print(json.dumps(report, indent=1))
  if args.out:
    path = pathlib.Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1) + '\n')
  return report


if __name__ == '__main__':
  main()
