"""A LLaMA-style decoder-only transformer in flax NNX.

Touvron et al., `LLaMA: Open and Efficient Foundation Language Models
<https://arxiv.org/abs/2302.13971>`_, 2023: pre-norm blocks with RMSNorm
(Zhang & Sennrich 2019, arXiv 1910.07467), rotary position embeddings (Su et
al. 2021, arXiv 2104.09864), a SwiGLU MLP (Shazeer 2020, arXiv 2002.05202) and
an untied output head. Per block, with ``n`` the RMSNorm:

.. math::
  h = x + W_o\\,attn(rope(W_q n(x)), rope(W_k n(x)), W_v n(x)),\\qquad
  y = h + W_{down}(silu(W_{gate} n(h)) \\odot W_{up} n(h)).

Every block matrix is an ``nnx.Linear`` kernel of shape ``(d_in, d_out)``, so
``DimensionNumbers(reduction_axis=-2, output_axis=-1)`` describes it. With
``scan_layers=True`` the blocks are built with ``nnx.vmap`` and run with
``nnx.scan``: each kernel becomes one ``(layers, d_in, d_out)`` array whose
leading axis is a batch axis for the subspace optimizers. ``remat=True``
recomputes each block's activations in the backward pass (``nnx.remat``).

Precision: ``compute_dtype='bfloat16'`` keeps the parameters (and so the
gradients and optimizer state) in float32 and runs the matmuls and attention in
bfloat16; RMSNorm and the logits / loss stay in float32.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

VOCAB_SIZE = 256  # bytes


@dataclasses.dataclass(frozen=True)
class Config:
  """Model sizes. ``ffn_dim`` is the hidden width of the SwiGLU MLP."""

  vocab_size: int = VOCAB_SIZE
  dim: int = 128
  layers: int = 4
  heads: int = 4
  ffn_dim: int = 344
  max_seq_len: int = 128
  rope_theta: float = 10_000.0
  norm_eps: float = 1e-6
  scan_layers: bool = False
  compute_dtype: str = 'float32'  # 'float32' or 'bfloat16' (params stay f32)
  remat: bool = False  # recompute each block's activations in the backward

  def __post_init__(self):
    if self.dim % self.heads:
      raise ValueError(f'dim={self.dim} is not divisible by heads={self.heads}.')
    if (self.dim // self.heads) % 2:
      raise ValueError('The head dimension must be even for rotary embeddings.')
    if self.compute_dtype not in ('float32', 'bfloat16'):
      raise ValueError(
          f"compute_dtype must be 'float32' or 'bfloat16', got "
          f'{self.compute_dtype!r}.')

  @property
  def head_dim(self) -> int:
    return self.dim // self.heads


# Presets. The 60M/130M shapes are those of the GaLore paper's LLaMA runs
# (Zhao et al. 2024, arXiv 2403.03507, Table 1 and jiaweizzhao/GaLore configs),
# with a 256-byte vocabulary instead of the 32k T5 tokenizer, so they hold
# fewer parameters than their names say (the embeddings are tiny).
PRESETS = {
    'tiny': Config(dim=128, layers=4, heads=4, ffn_dim=344, max_seq_len=128),
    'llama_60m': Config(dim=512, layers=8, heads=8, ffn_dim=1376,
                        max_seq_len=256),
    'llama_130m': Config(dim=768, layers=12, heads=12, ffn_dim=2048,
                         max_seq_len=256),
}


def config_from_preset(name: str, **overrides) -> Config:
  """The preset ``name`` with some fields replaced (e.g. ``scan_layers``)."""
  if name not in PRESETS:
    raise ValueError(f'Unknown model {name!r}; choose from {sorted(PRESETS)}.')
  return dataclasses.replace(PRESETS[name], **overrides)


class RMSNorm(nnx.Module):
  """``x / sqrt(mean(x²) + eps) * scale``, computed in float32."""

  def __init__(self, dim: int, eps: float):
    self.scale = nnx.Param(jnp.ones((dim,), jnp.float32))
    self.eps = eps

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    inverse_rms = jax.lax.rsqrt(
        jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (x32 * inverse_rms * self.scale[...]).astype(x.dtype)


def apply_rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
  """Rotary embedding of ``x`` [batch, seq, heads, head_dim] (half-split form).

  Pairs ``(x_i, x_{i + D/2})`` are rotated by the angle ``p θ^{-2i/D}``.
  """
  half = x.shape[-1] // 2
  frequencies = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
  angles = positions[:, :, None, None].astype(jnp.float32) * frequencies
  cos, sin = jnp.cos(angles), jnp.sin(angles)
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)
  return rotated.astype(x.dtype)


def _linear(d_in: int, d_out: int, config: Config, rngs: nnx.Rngs):
  return nnx.Linear(
      d_in, d_out, use_bias=False, dtype=jnp.dtype(config.compute_dtype),
      param_dtype=jnp.float32,
      kernel_init=nnx.initializers.normal(stddev=d_in ** -0.5), rngs=rngs)


class Attention(nnx.Module):
  """Causal multi-head self-attention with rotary embeddings."""

  def __init__(self, config: Config, *, rngs: nnx.Rngs):
    self.config = config
    d = config.dim
    self.wq = _linear(d, d, config, rngs)
    self.wk = _linear(d, d, config, rngs)
    self.wv = _linear(d, d, config, rngs)
    self.wo = _linear(d, d, config, rngs)

  def __call__(self, x: jax.Array, positions: jax.Array) -> jax.Array:
    c = self.config
    batch, seq, _ = x.shape
    split = lambda t: t.reshape(batch, seq, c.heads, c.head_dim)
    q = apply_rope(split(self.wq(x)), positions, c.rope_theta)
    k = apply_rope(split(self.wk(x)), positions, c.rope_theta)
    v = split(self.wv(x))
    out = jax.nn.dot_product_attention(q, k, v, is_causal=True)
    return self.wo(out.reshape(batch, seq, c.dim))


class SwiGLU(nnx.Module):
  """``W_down (silu(W_gate x) * W_up x)``."""

  def __init__(self, config: Config, *, rngs: nnx.Rngs):
    self.w_gate = _linear(config.dim, config.ffn_dim, config, rngs)
    self.w_up = _linear(config.dim, config.ffn_dim, config, rngs)
    self.w_down = _linear(config.ffn_dim, config.dim, config, rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.w_down(jax.nn.silu(self.w_gate(x)) * self.w_up(x))


class Block(nnx.Module):
  """Pre-norm transformer block: attention then SwiGLU, each residual."""

  def __init__(self, config: Config, *, rngs: nnx.Rngs):
    self.attention_norm = RMSNorm(config.dim, config.norm_eps)
    self.attention = Attention(config, rngs=rngs)
    self.mlp_norm = RMSNorm(config.dim, config.norm_eps)
    self.mlp = SwiGLU(config, rngs=rngs)

  def __call__(self, x: jax.Array, positions: jax.Array) -> jax.Array:
    x = x + self.attention(self.attention_norm(x), positions)
    return x + self.mlp(self.mlp_norm(x))


class Llama(nnx.Module):
  """Byte-level LLaMA: ``tokens [batch, seq] int -> logits [batch, seq, vocab]``.

  The logits are float32 whatever the compute dtype.
  """

  def __init__(self, config: Config, *, rngs: nnx.Rngs):
    self.config = config
    self.embed = nnx.Embed(
        config.vocab_size, config.dim, dtype=jnp.dtype(config.compute_dtype),
        param_dtype=jnp.float32,
        embedding_init=nnx.initializers.normal(stddev=1.0), rngs=rngs)
    if config.scan_layers:

      @nnx.split_rngs(splits=config.layers)
      @nnx.vmap(in_axes=(0,), out_axes=0, axis_size=config.layers)
      def make_blocks(rngs: nnx.Rngs) -> Block:
        return Block(config, rngs=rngs)

      self.blocks = make_blocks(rngs)
    else:
      self.blocks = nnx.List(
          [Block(config, rngs=rngs) for _ in range(config.layers)])
    self.final_norm = RMSNorm(config.dim, config.norm_eps)
    self.lm_head = _linear(config.dim, config.vocab_size, config, rngs)

  def __call__(self, tokens: jax.Array) -> jax.Array:
    positions = jnp.broadcast_to(
        jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    x = self.embed(tokens)
    run_block = lambda block, x: block(x, positions)
    if self.config.remat:
      run_block = nnx.remat(run_block)
    if self.config.scan_layers:

      @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
      def run_blocks(x, block: Block):
        return run_block(block, x)

      x = run_blocks(x, self.blocks)
    else:
      for block in self.blocks:
        x = run_block(block, x)
    return self.lm_head(self.final_norm(x)).astype(jnp.float32)


def cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Mean next-byte cross entropy in nats."""
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  picked = jnp.take_along_axis(log_probs, targets[..., None], axis=-1)
  return -jnp.mean(picked)


def count_params(model: nnx.Module) -> int:
  return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def per_layer_functions(config: Config):
  """``(embed, layer, head_loss)`` of a ``scan_layers`` model, as pure functions
  of its params (``nnx.as_pure(nnx.state(model))``), for
  :func:`subspace_optax.per_layer_train_step` (``stack='blocks'``).

  ``embed(rest, (inputs, targets))``, ``layer(block_params, h)`` (one block,
  no layer axis) and ``head_loss(rest, h, (inputs, targets))`` (the mean
  cross entropy) compute what :class:`Llama` does, module by module.
  """
  if not config.scan_layers:
    raise ValueError('per_layer_functions needs scan_layers=True (the blocks '
                     'stacked under one leading layer axis).')
  graphdef = lambda make: nnx.graphdef(nnx.eval_shape(make))
  rngs = lambda: nnx.Rngs(0)
  embed_def = graphdef(lambda: nnx.Embed(
      config.vocab_size, config.dim, dtype=jnp.dtype(config.compute_dtype),
      param_dtype=jnp.float32, rngs=rngs()))
  block_def = graphdef(lambda: Block(config, rngs=rngs()))
  norm_def = graphdef(lambda: RMSNorm(config.dim, config.norm_eps))
  head_def = graphdef(lambda: _linear(config.dim, config.vocab_size, config,
                                      rngs()))

  def embed(rest, batch):
    return nnx.merge(embed_def, rest['embed'])(batch[0])

  def layer(block_params, h):
    positions = jnp.broadcast_to(
        jnp.arange(h.shape[1], dtype=jnp.int32), h.shape[:2])
    return nnx.merge(block_def, block_params)(h, positions)

  def head_loss(rest, h, batch):
    h = nnx.merge(norm_def, rest['final_norm'])(h)
    logits = nnx.merge(head_def, rest['lm_head'])(h).astype(jnp.float32)
    return cross_entropy(logits, batch[1])

  return embed, layer, head_loss
