"""Decoder-only transformer (Flax linen): RMSNorm, rotary embeddings, SwiGLU, grouped-query attention,
and the switches of imported families (q/k/v biases, q/k norms, rotary scaling, Gemma's GeGLU), off by default.

The module is pure: parameters are a pytree, every call is `Transformer(cfg).apply({'params': p}, ...)`.
Every parameter carries logical axis names; `rlhf_jax.training.sharding` maps them onto a device mesh.

One call covers training and decoding. Keys and values live in "slots": for a full forward pass
slot t holds token t; with a KV cache, the new tokens are written at slots
`cache_index .. cache_index + T - 1` of a cache of S slots. A query at slot i sees the keys at
slots <= i whose `attention_mask` entry is True, so left padding, EOS-finished rows and partially
filled caches are all just masks.
"""
from __future__ import annotations

import functools
from typing import Any, NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.model import lora as lora_lib
from rlhf_jax.model.config import ModelConfig

Cache = Any  # per-layer {'k','v'} dicts (a list), or one stacked dict when layers are scanned


class ModelOutput(NamedTuple):
  logits: Optional[jax.Array]  # [batch, seq, vocab] float32, or None when lm_head=False
  scalar: jax.Array  # [batch, seq] float32: the scalar (reward/value) head at every position
  hidden: jax.Array  # [batch, seq, d_model] after the final norm
  cache: Cache  # updated KV cache, or None


def _dtype(name: str):
  return jnp.dtype(name)


def _fan_in_init(in_axes, out_axes, scale=1.0):
  return nn.initializers.variance_scaling(scale, "fan_in", "truncated_normal",
                                          in_axis=in_axes, out_axis=out_axes)


class RMSNorm(nn.Module):
  eps: float
  dtype: Any
  param_dtype: Any
  offset: float = 0.0  # the gain is offset + scale (Gemma: 1 + scale, scale initialised to 0)

  @nn.compact
  def __call__(self, x):
    init = nn.initializers.ones if self.offset == 0 else nn.initializers.constant(1.0 - self.offset)
    scale = self.param("scale", nn.with_logical_partitioning(init, ("norm",)),
                       (x.shape[-1],), self.param_dtype)
    x32 = x.astype(jnp.float32)
    # Normalise in float32: bf16 mean-of-squares loses precision at large d_model.
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    gain = scale.astype(jnp.float32)
    if self.offset:
      gain = self.offset + gain
    return (y * gain).astype(self.dtype)


def rotary_frequencies(cfg: ModelConfig) -> jax.Array:
  """freq_i [head_dim / 2] = rope_theta ** (-i / (head_dim / 2)), rescaled as cfg.rope_scaling says."""
  half = cfg.head_dim // 2
  if cfg.rope_scaling == "none":
    return cfg.rope_theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
  # Scaled frequencies are constants of the config: computed once in float64, then rounded.
  freqs = cfg.rope_theta ** (-np.arange(half, dtype=np.float64) / half)
  if cfg.rope_scaling == "llama3":
    # Llama 3.1: a wavelength 2 pi / freq longer than original_max_len / low_freq_factor is
    # stretched by the factor, one shorter than original_max_len / high_freq_factor is kept, and
    # between the two the inverse stretch moves linearly in original_max_len / wavelength.
    ramp = (cfg.rope_original_max_len * freqs / (2 * np.pi) - cfg.rope_low_freq_factor) / (
        cfg.rope_high_freq_factor - cfg.rope_low_freq_factor)
    ramp = np.clip(ramp, 0.0, 1.0)  # 0: stretched, 1: kept
    freqs = freqs * ((1 - ramp) / cfg.rope_factor + ramp)
  else:  # linear: positions / factor, i.e. every frequency / factor
    freqs = freqs / cfg.rope_factor
  return jnp.asarray(freqs, jnp.float32)


def rotary_embedding(x: jax.Array, positions: jax.Array, freqs: jax.Array) -> jax.Array:
  """Rotates pairs (i, i + head_dim/2) of x [batch, seq, heads, head_dim] by position * freqs[i]."""
  angles = positions.astype(jnp.float32)[..., None] * freqs  # [batch, seq, half]
  sin = jnp.sin(angles)[:, :, None, :]
  cos = jnp.cos(angles)[:, :, None, :]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


def causal_mask(key_valid: jax.Array, num_queries: int, cache_index) -> jax.Array:
  """Causal-and-valid mask [batch, queries, slots] for queries at slots cache_index + t."""
  q_slots = cache_index + jnp.arange(num_queries)  # [T]
  k_slots = jnp.arange(key_valid.shape[1])  # [S]
  causal = k_slots[None, :] <= q_slots[:, None]  # [T, S]
  return causal[None] & key_valid[:, None, :].astype(bool)


class Attention(nn.Module):
  cfg: ModelConfig
  lora: Optional[lora_lib.LoraSpec] = None

  @nn.compact
  def __call__(self, x, positions, mask, layer_cache, cache_index):
    cfg = self.cfg
    dtype, pdtype = _dtype(cfg.dtype), _dtype(cfg.param_dtype)
    d, nh, nkv, hd = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim

    def proj(name, heads, axes):
      w = self.param(name, nn.with_logical_partitioning(_fan_in_init(0, (1, 2)), axes),
                     (d, heads, hd), pdtype)
      y = jnp.einsum("btd,dnh->btnh", x, w.astype(dtype))
      extra = lora_lib.delta(self, self.lora, name, x, (d, heads, hd), axes, dtype)
      if extra is not None:
        y = y + extra
      if cfg.qkv_bias:
        b = self.param("b" + name[1], nn.with_logical_partitioning(nn.initializers.zeros, axes[1:]),
                       (heads, hd), pdtype)
        y = y + b.astype(dtype)
      return y

    q = proj("wq", nh, ("embed", "heads", "head_dim"))
    k = proj("wk", nkv, ("embed", "kv_heads", "head_dim"))
    v = proj("wv", nkv, ("embed", "kv_heads", "head_dim"))
    if cfg.qk_norm:
      norm = functools.partial(RMSNorm, cfg.norm_eps, dtype, pdtype, cfg.norm_offset)
      q, k = norm(name="q_norm")(q), norm(name="k_norm")(k)
    freqs = rotary_frequencies(cfg)
    q = rotary_embedding(q, positions, freqs)
    k = rotary_embedding(k, positions, freqs)

    new_cache = None
    if layer_cache is not None:
      start = (0, cache_index, 0, 0)
      k = jax.lax.dynamic_update_slice(layer_cache["k"], k.astype(layer_cache["k"].dtype), start)
      v = jax.lax.dynamic_update_slice(layer_cache["v"], v.astype(layer_cache["v"].dtype), start)
      new_cache = {"k": k, "v": v}
      k, v = k.astype(dtype), v.astype(dtype)

    # GQA is native here: key/value heads are shared by num_heads // num_kv_heads query heads.
    out = jax.nn.dot_product_attention(q, k, v, mask=mask[:, None, :, :],
                                       implementation=cfg.attention_impl if cfg.attention_impl != "xla" else None)
    # Residual-branch outputs start small (GPT-2 / Megatron scaling) so depth does not blow up activations.
    wo = self.param("wo", nn.with_logical_partitioning(
        _fan_in_init((0, 1), 2, scale=1.0 / (2 * cfg.num_layers)), ("heads", "head_dim", "embed")),
                    (nh, hd, d), pdtype)
    y = jnp.einsum("btnh,nhd->btd", out, wo.astype(dtype))
    extra = lora_lib.delta(self, self.lora, "wo", out, (nh, hd, d), ("heads", "head_dim", "embed"), dtype)
    return (y if extra is None else y + extra), new_cache


class SwiGLU(nn.Module):
  """Gated MLP: SwiGLU, or GeGLU with the tanh-approximated GELU (Gemma) by cfg.mlp_activation."""
  cfg: ModelConfig
  lora: Optional[lora_lib.LoraSpec] = None

  @nn.compact
  def __call__(self, x):
    cfg = self.cfg
    dtype, pdtype = _dtype(cfg.dtype), _dtype(cfg.param_dtype)
    w_in = nn.with_logical_partitioning(_fan_in_init(0, 1), ("embed", "mlp"))
    w_out = nn.with_logical_partitioning(_fan_in_init(0, 1, scale=1.0 / (2 * cfg.num_layers)),
                                         ("mlp", "embed"))
    d, m = cfg.d_model, cfg.mlp_dim

    def linear(name, init, shape, axes, inp):
      y = inp @ self.param(name, init, shape, pdtype).astype(dtype)
      extra = lora_lib.delta(self, self.lora, name, inp, shape, axes, dtype)
      return y if extra is None else y + extra

    act = jax.nn.silu if cfg.mlp_activation == "silu" else functools.partial(jax.nn.gelu, approximate=True)
    h = act(linear("w_gate", w_in, (d, m), ("embed", "mlp"), x)) * linear("w_up", w_in, (d, m), ("embed", "mlp"), x)
    return linear("w_down", w_out, (m, d), ("mlp", "embed"), h)


class Block(nn.Module):
  """Pre-norm transformer layer; signature fits nn.scan: (carry, *xs) -> (carry, ys)."""
  cfg: ModelConfig
  lora: Optional[lora_lib.LoraSpec] = None

  @nn.compact
  def __call__(self, x, positions, mask, layer_cache, cache_index):
    cfg = self.cfg
    norm = functools.partial(RMSNorm, cfg.norm_eps, _dtype(cfg.dtype), _dtype(cfg.param_dtype), cfg.norm_offset)
    h, new_cache = Attention(cfg, self.lora, name="attn")(norm(name="attn_norm")(x), positions, mask,
                                               layer_cache, cache_index)
    x = x + h
    x = x + SwiGLU(cfg, self.lora, name="mlp")(norm(name="mlp_norm")(x))
    # Pin the residual stream to batch sharding; without it the partitioner may pick layouts
    # that force full rematerialisation between layers. A no-op outside a mesh context.
    x = nn.with_logical_constraint(x, ("activation_batch", "activation_length", "activation_embed"))
    return x, new_cache


def _block_class(cfg: ModelConfig):
  if cfg.remat == "none":
    return Block
  policy = (jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims if cfg.remat == "dots"
            else jax.checkpoint_policies.nothing_saveable)
  return nn.remat(Block, policy=policy, prevent_cse=not cfg.scan_layers)


def _default_mask_and_positions(tokens, attention_mask, positions, cache):
  if attention_mask is None:
    if cache is not None:
      raise ValueError("decoding with a cache needs an explicit attention_mask over cache slots")
    attention_mask = jnp.ones(tokens.shape, bool)
  if positions is None:
    if cache is not None:
      raise ValueError("decoding with a cache needs explicit positions")
    positions = jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=1) - 1, 0)
  return attention_mask, positions


class Transformer(nn.Module):
  cfg: ModelConfig
  lora: Optional[lora_lib.LoraSpec] = None  # adapters (rlhf_jax.model.lora): created at init, applied when present

  @nn.compact
  def __call__(self, tokens: jax.Array, positions: Optional[jax.Array] = None,
               attention_mask: Optional[jax.Array] = None, cache: Cache = None,
               cache_index=0, *, lm_head: bool = True) -> ModelOutput:
    """tokens [batch, T] int32.

    attention_mask: [batch, S] bool, True where the key slot holds a real token. Without a cache
      S = T (defaults to all True); with a cache S is the cache length and the mask must already
      be True at the new tokens' slots.
    positions: [batch, T] rotary positions; defaults to the count of valid tokens before each one,
      so left-padded rows start at position 0.
    """
    cfg = self.cfg
    dtype, pdtype = _dtype(cfg.dtype), _dtype(cfg.param_dtype)
    attention_mask, positions = _default_mask_and_positions(tokens, attention_mask, positions, cache)
    mask = causal_mask(attention_mask, tokens.shape[1], cache_index)

    embedding = self.param("embedding", nn.with_logical_partitioning(
        nn.initializers.normal(stddev=cfg.d_model ** -0.5), ("vocab", "embed")),
                           (cfg.vocab_size, cfg.d_model), pdtype)
    # Look up in the table gathered over its embed axis (as FSDP gathers any weight) but still split
    # over vocab: a gather from a table split on both axes makes XLA replicate the whole table
    # ("involuntary full rematerialization").
    table = nn.with_logical_constraint(embedding, ("vocab", None))
    x = jnp.take(table, tokens, axis=0).astype(dtype)
    if cfg.scale_embeddings:
      x = x * jnp.asarray(cfg.d_model ** 0.5, dtype)
    x = nn.with_logical_constraint(x, ("activation_batch", "activation_length", "activation_embed"))

    block = _block_class(cfg)
    if cfg.scan_layers:
      layers = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                       in_axes=(nn.broadcast, nn.broadcast, 0, nn.broadcast),
                       length=cfg.num_layers, metadata_params={nn.PARTITION_NAME: "layers"})
      x, new_cache = layers(cfg, self.lora, name="layers")(x, positions, mask, cache, cache_index)
    else:
      new_cache = [] if cache is not None else None
      for i in range(cfg.num_layers):
        x, layer_cache = block(cfg, self.lora, name=f"layer_{i}")(
            x, positions, mask, None if cache is None else cache[i], cache_index)
        if cache is not None:
          new_cache.append(layer_cache)

    hidden = RMSNorm(cfg.norm_eps, dtype, pdtype, cfg.norm_offset, name="final_norm")(x)
    logits = None
    if lm_head:
      # float32 accumulation: log-probs feed PPO ratios and KL, where bf16 rounding is visible.
      if cfg.tie_embeddings:
        logits = jnp.einsum("btd,vd->btv", hidden, embedding.astype(dtype),
                            preferred_element_type=jnp.float32)
      else:
        w = self.param("lm_head", nn.with_logical_partitioning(_fan_in_init(0, 1), ("embed", "vocab")),
                       (cfg.d_model, cfg.vocab_size), pdtype)
        logits = jnp.einsum("btd,dv->btv", hidden, w.astype(dtype), preferred_element_type=jnp.float32)
    # The scalar head stays in float32: rewards and values are compared across sequences.
    head_w = self.param("scalar_head", nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
                        (cfg.d_model,), jnp.float32)
    head_b = self.param("scalar_bias", nn.with_logical_partitioning(nn.initializers.zeros, ()), (),
                        jnp.float32)
    scalar = hidden.astype(jnp.float32) @ head_w + head_b
    return ModelOutput(logits, scalar, hidden, new_cache)



def init_cache(cfg: ModelConfig, batch: int, length: int, dtype=None) -> Cache:
  """Zero KV cache for `length` slots; stacked over layers when the layers are scanned."""
  dtype = _dtype(dtype or cfg.dtype)
  shape = (batch, length, cfg.num_kv_heads, cfg.head_dim)
  if cfg.scan_layers:
    shape = (cfg.num_layers,) + shape
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
  return [{"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)} for _ in range(cfg.num_layers)]


def read_at(values: jax.Array, index: jax.Array) -> jax.Array:
  """values [batch, seq, ...] read at index [batch] -> [batch, ...] (e.g. reward at end-of-context)."""
  idx = index.reshape(index.shape + (1,) * (values.ndim - 1)).astype(jnp.int32)
  return jnp.take_along_axis(values, idx, axis=1)[:, 0]


def init_params(cfg: ModelConfig, rng: jax.Array, seq_len: int = 8, lora: Optional[lora_lib.LoraSpec] = None):
  """Boxed (logically partitioned) parameters, with LoRA adapters if `lora`; `nn.meta.unbox` for plain arrays."""
  tokens = jnp.zeros((1, seq_len), jnp.int32)
  return Transformer(cfg, lora).init(rng, tokens)["params"]
