"""Jitted autoregressive sampling with a preallocated KV cache.

Prompts may be left- or right-padded, of different lengths, in one batch: they are first moved
to left padding (a stable per-row reorder), so every row's next token goes to the same cache slot
and the decode loop writes one slot per step. The loop is a `lax.while_loop` that stops as soon
as every row has emitted EOS.

Returned log-probs are those of the sampled tokens under the model's distribution at the given
temperature (logits / temperature), *before* top-k / top-p truncation: that is the policy
probability PPO needs, and it matches a full forward pass on the returned tokens. Greedy decoding
(temperature 0) returns log-probs at temperature 1.
"""
from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from rlhf_jax.model.transformer import Transformer, init_cache


class Generation(NamedTuple):
  prompt_tokens: jax.Array  # [batch, prompt_len] left-padded
  prompt_mask: jax.Array  # [batch, prompt_len] bool
  tokens: jax.Array  # [batch, max_new_tokens] sampled tokens; pad_id after EOS
  log_probs: jax.Array  # [batch, max_new_tokens] float32; 0 where mask is False
  mask: jax.Array  # [batch, max_new_tokens] bool: True up to and including EOS
  lengths: jax.Array  # [batch] number of response tokens (EOS included)


def to_left_padding(tokens: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Moves each row's valid tokens to the right end, keeping their order."""
  order = jnp.argsort(mask.astype(jnp.int32), axis=1, stable=True)  # pads (0) first
  return jnp.take_along_axis(tokens, order, axis=1), jnp.take_along_axis(mask, order, axis=1)


def filter_logits(logits: jax.Array, top_k: int = 0, top_p: float = 1.0) -> jax.Array:
  """Sets logits outside the top-k and outside the top-p nucleus to the dtype's lowest value.

  top_k=0 and top_p=1.0 disable each filter. The nucleus is the smallest set of most-likely
  tokens whose probability reaches top_p (the most likely token is always kept).
  """
  neg_inf = jnp.finfo(logits.dtype).min
  if top_k > 0:
    kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
    logits = jnp.where(logits < kth, neg_inf, logits)
  if top_p < 1.0:
    sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep_sorted = mass_before < top_p
    # The smallest kept logit is the threshold; ties at it are kept too.
    threshold = jnp.min(jnp.where(keep_sorted, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits < threshold, neg_inf, logits)
  return logits


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "temperature", "top_k", "top_p",
                                             "eos_id", "pad_id"))
def generate(params, prompt_tokens: jax.Array, prompt_mask: jax.Array, rng: jax.Array, *,
             model: Transformer, max_new_tokens: int, temperature: float = 1.0, top_k: int = 0,
             top_p: float = 1.0, eos_id: Optional[int] = None, pad_id: int = 0) -> Generation:
  """Samples max_new_tokens continuations; temperature=0 is greedy. Every prompt needs >= 1 token."""
  tokens, mask = to_left_padding(prompt_tokens, prompt_mask.astype(bool))
  batch, prompt_len = tokens.shape
  total = prompt_len + max_new_tokens
  apply = lambda *a, **k: model.apply({"params": params}, *a, **k)

  key_valid = jnp.zeros((batch, total), bool).at[:, :prompt_len].set(mask)
  positions = jnp.maximum(jnp.cumsum(mask.astype(jnp.int32), axis=1) - 1, 0)
  out = apply(tokens, positions, key_valid, init_cache(model.cfg, batch, total), 0)
  logits = out.logits[:, -1]  # left padding: the last slot is every row's last prompt token
  next_pos = positions[:, -1] + 1

  def body(carry):
    i, logits, cache, key_valid, next_pos, done, rng, toks, logps, valid = carry
    rng, sample_rng = jax.random.split(rng)
    if temperature == 0.0:
      logp_all = jax.nn.log_softmax(logits, axis=-1)
      token = jnp.argmax(logits, axis=-1)
    else:
      logp_all = jax.nn.log_softmax(logits / temperature, axis=-1)
      token = jax.random.categorical(sample_rng, filter_logits(logits / temperature, top_k, top_p))
    live = ~done
    token = jnp.where(live, token, pad_id).astype(jnp.int32)
    logp = jnp.where(live, jnp.take_along_axis(logp_all, token[:, None], axis=-1)[:, 0], 0.0)
    toks, logps, valid = toks.at[:, i].set(token), logps.at[:, i].set(logp), valid.at[:, i].set(live)
    if eos_id is not None:
      done = done | (token == eos_id)
    slot = prompt_len + i
    key_valid = key_valid.at[:, slot].set(True)
    out = apply(token[:, None], next_pos[:, None], key_valid, cache, slot)
    return (i + 1, out.logits[:, 0], out.cache, key_valid, next_pos + 1, done, rng, toks, logps, valid)

  def cond(carry):
    i, done = carry[0], carry[5]
    return (i < max_new_tokens) & ~jnp.all(done)

  init = (jnp.int32(0), logits, out.cache, key_valid, next_pos, jnp.zeros((batch,), bool), rng,
          jnp.full((batch, max_new_tokens), pad_id, jnp.int32),
          jnp.zeros((batch, max_new_tokens), jnp.float32),
          jnp.zeros((batch, max_new_tokens), bool))
  *_, toks, logps, valid = jax.lax.while_loop(cond, body, init)
  return Generation(tokens, mask, toks, logps, valid, valid.sum(axis=1))
