"""Transformer tests against an independent float64 numpy reference written from the maths.

The reference below implements RMSNorm, rotary embeddings, grouped-query causal attention,
SwiGLU, pre-norm residual blocks, the final norm, the (tied or untied) LM head and the scalar
head directly in numpy; it only reads the parameter arrays of the Flax model.
"""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.model import Transformer, init_cache, init_params, read_at
from rlhf_jax.model_config import PRESETS

VOCAB = 97  # small vocab keeps the LM head cheap


def make_cfg(**kw):
  base = dict(vocab_size=VOCAB, dtype="float32", param_dtype="float32")
  base.update(kw)
  return dataclasses.replace(PRESETS["tiny"], **base)


def make_params(cfg, seed=0, noise=0.1):
  """Initialised params perturbed with random normal noise so no parameter is zero or one."""
  params = nn.meta.unbox(init_params(cfg, jax.random.PRNGKey(seed)))
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(seed + 1000), len(leaves))
  leaves = [x + noise * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
  return jax.tree.unflatten(treedef, leaves)


def apply(cfg, params, tokens, **kw):
  return Transformer(cfg).apply({"params": params}, tokens, **kw)


def random_tokens(seed, batch, seq):
  return np.random.default_rng(seed).integers(0, VOCAB, size=(batch, seq)).astype(np.int32)


# ----------------------------------------------------------------------------------------------
# Independent float64 numpy reference.
# ----------------------------------------------------------------------------------------------

def np_rmsnorm(x, scale, eps):
  return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * scale


def np_rope(x, positions, theta):
  """x [B, T, H, D]; rotates pairs (i, i + D/2) by angle position * theta^(-i/(D/2))."""
  d = x.shape[-1]
  half = d // 2
  out = np.empty_like(x)
  for i in range(half):
    ang = positions.astype(np.float64) * theta ** (-i / half)  # [B, T]
    c, s = np.cos(ang)[:, :, None], np.sin(ang)[:, :, None]
    a, b = x[..., i], x[..., i + half]
    out[..., i] = a * c - b * s
    out[..., i + half] = b * c + a * s
  return out


def np_silu(x):
  return x / (1.0 + np.exp(-x))


def np_attention(x, p, positions, key_valid, cfg):
  """Causal GQA; query t sees keys s <= t with key_valid[b, s]."""
  B, T, _ = x.shape
  nh, nkv, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  group = nh // nkv
  q = np.einsum("btd,dnh->btnh", x, p["wq"])
  k = np.einsum("btd,dnh->btnh", x, p["wk"])
  v = np.einsum("btd,dnh->btnh", x, p["wv"])
  q = np_rope(q, positions, cfg.rope_theta)
  k = np_rope(k, positions, cfg.rope_theta)
  out = np.zeros((B, T, nh, hd))
  for b in range(B):
    for n in range(nh):
      kv = n // group
      for t in range(T):
        allowed = [s for s in range(t + 1) if key_valid[b, s]]
        if not allowed:
          continue  # fully masked (padding) query: output undefined, never compared
        scores = np.array([q[b, t, n] @ k[b, s, kv] for s in allowed]) / np.sqrt(hd)
        w = np.exp(scores - scores.max())
        w /= w.sum()
        out[b, t, n] = sum(wi * v[b, s, kv] for wi, s in zip(w, allowed))
  return np.einsum("btnh,nhd->btd", out, p["wo"])


def np_mlp(x, p):
  return (np_silu(x @ p["w_gate"]) * (x @ p["w_up"])) @ p["w_down"]


def np_layer_params(params, cfg, i):
  to64 = lambda t: jax.tree.map(lambda a: np.asarray(a, np.float64), t)
  if cfg.scan_layers:
    return to64(jax.tree.map(lambda a: a[i], params["layers"]))
  return to64(params[f"layer_{i}"])


def np_forward(params, cfg, tokens, attention_mask=None, positions=None):
  """Returns (logits [B,T,V], scalar [B,T]) in float64."""
  tokens = np.asarray(tokens)
  B, T = tokens.shape
  if attention_mask is None:
    attention_mask = np.ones((B, T), bool)
  attention_mask = np.asarray(attention_mask, bool)
  if positions is None:
    positions = np.maximum(np.cumsum(attention_mask, axis=1) - 1, 0)
  emb = np.asarray(params["embedding"], np.float64)
  x = emb[tokens]
  for i in range(cfg.num_layers):
    lp = np_layer_params(params, cfg, i)
    h = np_rmsnorm(x, lp["attn_norm"]["scale"], cfg.norm_eps)
    x = x + np_attention(h, lp["attn"], positions, attention_mask, cfg)
    h = np_rmsnorm(x, lp["mlp_norm"]["scale"], cfg.norm_eps)
    x = x + np_mlp(h, lp["mlp"])
  hidden = np_rmsnorm(x, np.asarray(params["final_norm"]["scale"], np.float64), cfg.norm_eps)
  if cfg.tie_embeddings:
    logits = hidden @ emb.T
  else:
    logits = hidden @ np.asarray(params["lm_head"], np.float64)
  scalar = hidden @ np.asarray(params["scalar_head"], np.float64) + float(params["scalar_bias"])
  return logits, scalar


def stack_layers(params, num_layers):
  """Unscanned params (layer_0, layer_1, ...) -> scanned params (layers with a leading axis)."""
  out = {k: v for k, v in params.items() if not k.startswith("layer_")}
  out["layers"] = jax.tree.map(lambda *xs: jnp.stack(xs),
                               *[params[f"layer_{i}"] for i in range(num_layers)])
  return out


# ----------------------------------------------------------------------------------------------
# 1. Forward pass against the reference.
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("tie,num_kv_heads,scan", [
    (True, 2, False),   # GQA (2 query heads per kv head), tied embeddings
    (False, 4, False),  # multi-head (num_kv_heads == num_heads), untied LM head
    (False, 2, True),   # GQA, untied, scanned layers
    (True, 4, True),    # MHA, tied, scanned layers
])
def test_forward_matches_numpy_reference(tie, num_kv_heads, scan):
  cfg = make_cfg(tie_embeddings=tie, num_kv_heads=num_kv_heads, scan_layers=scan)
  params = make_params(cfg, seed=1)
  if scan:
    assert params["layers"]["attn"]["wq"].shape[0] == cfg.num_layers
    assert not any(k.startswith("layer_") for k in params)
  else:
    assert "layer_0" in params and "layers" not in params
  assert ("lm_head" in params) == (not tie)
  assert params["layers" if scan else "layer_0"]["attn"]["wk"].shape[-2] == num_kv_heads
  tokens = random_tokens(2, batch=2, seq=7)
  out = apply(cfg, params, jnp.asarray(tokens))
  ref_logits, ref_scalar = np_forward(params, cfg, tokens)
  assert out.logits.shape == (2, 7, VOCAB) and out.logits.dtype == jnp.float32
  assert out.scalar.shape == (2, 7) and out.scalar.dtype == jnp.float32
  assert out.hidden.shape == (2, 7, cfg.d_model)
  assert out.cache is None
  # Guard against a degenerate comparison (e.g. everything ~0).
  assert np.std(ref_logits) > 0.1 and np.std(ref_scalar) > 0.1
  np.testing.assert_allclose(out.logits, ref_logits, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(out.scalar, ref_scalar, rtol=1e-4, atol=1e-4)


def test_reference_is_sensitive_to_gqa_head_mapping():
  """Sanity check of the test itself: the n // group mapping matters with these params."""
  cfg = make_cfg(num_kv_heads=2)
  params = make_params(cfg, seed=1)
  tokens = random_tokens(2, batch=1, seq=5)
  out = apply(cfg, params, jnp.asarray(tokens))
  # Permute query heads (0,1,2,3) -> (0,2,1,3) in wq and wo consistently: this maps query head n
  # to kv head n % 2 instead of n // 2, so the output must change.
  perm = np.array([0, 2, 1, 3])
  p2 = jax.tree.map(lambda a: a, params)
  for i in range(cfg.num_layers):
    attn = dict(p2[f"layer_{i}"]["attn"])
    attn["wq"] = attn["wq"][:, perm]
    attn["wo"] = attn["wo"][perm]
    p2[f"layer_{i}"] = dict(p2[f"layer_{i}"], attn=attn)
  out2 = apply(cfg, p2, jnp.asarray(tokens))
  assert np.max(np.abs(np.asarray(out.logits) - np.asarray(out2.logits))) > 1e-2


# ----------------------------------------------------------------------------------------------
# 2. Left padding.
# ----------------------------------------------------------------------------------------------

def test_left_padding_matches_unpadded():
  cfg = make_cfg(num_kv_heads=2)
  params = make_params(cfg, seed=3)
  T, pad = 8, 3
  tokens = random_tokens(4, batch=2, seq=T)
  tokens[0, :pad] = 0  # pad token id; the mask, not the id, must make them invisible
  mask = np.ones((2, T), bool)
  mask[0, :pad] = False
  out = apply(cfg, params, jnp.asarray(tokens), attention_mask=jnp.asarray(mask))
  alone = apply(cfg, params, jnp.asarray(tokens[:1, pad:]))
  np.testing.assert_allclose(out.logits[0, pad:], alone.logits[0], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(out.scalar[0, pad:], alone.scalar[0], rtol=1e-5, atol=1e-5)
  # The unpadded row is unaffected by the other row's padding.
  row1 = apply(cfg, params, jnp.asarray(tokens[1:]))
  np.testing.assert_allclose(out.logits[1], row1.logits[0], rtol=1e-5, atol=1e-5)
  # And the padded batch matches the reference at the real positions.
  ref_logits, ref_scalar = np_forward(params, cfg, tokens, attention_mask=mask)
  np.testing.assert_allclose(out.logits[0, pad:], ref_logits[0, pad:], rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(out.scalar[0, pad:], ref_scalar[0, pad:], rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(out.logits[1], ref_logits[1], rtol=1e-4, atol=1e-4)
  # The padding changes what a query at pad positions would otherwise see: the result must
  # differ from treating the pad tokens as real.
  unmasked = apply(cfg, params, jnp.asarray(tokens))
  assert np.max(np.abs(np.asarray(unmasked.logits[0, pad:] - alone.logits[0]))) > 1e-3


# ----------------------------------------------------------------------------------------------
# 3. Causality.
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("scan", [False, True])
def test_causality(scan):
  cfg = make_cfg(scan_layers=scan)
  params = make_params(cfg, seed=5)
  T, t = 8, 4
  a = random_tokens(6, batch=2, seq=T)
  b = a.copy()
  b[:, t + 1:] = (a[:, t + 1:] + 1 + random_tokens(7, 2, T - t - 1) % (VOCAB - 1)) % VOCAB
  assert np.all(b[:, t + 1:] != a[:, t + 1:])
  oa = apply(cfg, params, jnp.asarray(a))
  ob = apply(cfg, params, jnp.asarray(b))
  np.testing.assert_allclose(oa.logits[:, :t + 1], ob.logits[:, :t + 1], rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(oa.scalar[:, :t + 1], ob.scalar[:, :t + 1], rtol=1e-6, atol=1e-6)
  # Later positions do change (the test can fail the other way too).
  assert np.max(np.abs(np.asarray(oa.logits[:, t + 1:] - ob.logits[:, t + 1:]))) > 1e-3


# ----------------------------------------------------------------------------------------------
# 4. Scanned vs unscanned layers.
# ----------------------------------------------------------------------------------------------

def test_scan_matches_unscanned():
  cfg = make_cfg(num_kv_heads=2, tie_embeddings=False)
  cfg_scan = dataclasses.replace(cfg, scan_layers=True)
  params = make_params(cfg, seed=8)
  sparams = stack_layers(params, cfg.num_layers)
  # The converted tree has exactly the structure and shapes of a scanned init.
  ref_tree = jax.eval_shape(lambda: nn.meta.unbox(init_params(cfg_scan, jax.random.PRNGKey(0))))
  assert jax.tree.structure(ref_tree) == jax.tree.structure(sparams)
  assert jax.tree.map(lambda a: a.shape, ref_tree) == jax.tree.map(lambda a: a.shape, sparams)
  tokens = jnp.asarray(random_tokens(9, batch=2, seq=6))
  o1 = apply(cfg, params, tokens)
  o2 = apply(cfg_scan, sparams, tokens)
  np.testing.assert_allclose(o1.logits, o2.logits, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(o1.scalar, o2.scalar, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(o1.hidden, o2.hidden, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# 5. Rematerialisation does not change gradients.
# ----------------------------------------------------------------------------------------------

def _loss(cfg, params, tokens):
  out = apply(cfg, params, tokens)
  logp = jax.nn.log_softmax(out.logits[:, :-1], axis=-1)
  nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1).mean()
  return nll + jnp.mean(out.scalar ** 2)


@pytest.mark.parametrize("scan,remat", [(False, "full"), (True, "full"), (True, "dots")])
def test_remat_gradients_match(scan, remat):
  cfg = make_cfg(scan_layers=scan)
  params = make_params(cfg, seed=10)
  tokens = jnp.asarray(random_tokens(11, batch=2, seq=6))
  g_ref = jax.jit(jax.grad(lambda p: _loss(cfg, p, tokens)))(params)
  cfg_r = dataclasses.replace(cfg, remat=remat)
  g = jax.jit(jax.grad(lambda p: _loss(cfg_r, p, tokens)))(params)
  assert jax.tree.structure(g) == jax.tree.structure(g_ref)
  for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  # Gradients reach every parameter, including the scalar head.
  assert all(float(jnp.max(jnp.abs(x))) > 0 for x in jax.tree.leaves(g_ref))


# ----------------------------------------------------------------------------------------------
# 6. bfloat16 compute.
# ----------------------------------------------------------------------------------------------

def test_bfloat16_compute_close_to_float32():
  cfg = make_cfg(num_kv_heads=2)
  cfg_bf16 = dataclasses.replace(cfg, dtype="bfloat16", param_dtype="float32")
  params = make_params(cfg, seed=12)
  tokens = jnp.asarray(random_tokens(13, batch=2, seq=8))
  o32 = apply(cfg, params, tokens)
  o16 = apply(cfg_bf16, params, tokens)
  assert o16.logits.dtype == jnp.float32
  assert o16.scalar.dtype == jnp.float32
  assert o16.hidden.dtype == jnp.bfloat16
  diff = np.abs(np.asarray(o16.logits) - np.asarray(o32.logits))
  assert diff.mean() < 0.05 * np.std(np.asarray(o32.logits)), (diff.mean(), np.std(o32.logits))
  sdiff = np.abs(np.asarray(o16.scalar) - np.asarray(o32.scalar))
  assert sdiff.mean() < 0.05 * np.std(np.asarray(o32.scalar))
  # It really ran in bf16 (not silently in float32).
  assert diff.max() > 0


# ----------------------------------------------------------------------------------------------
# 7. KV cache decoding.
# ----------------------------------------------------------------------------------------------

def _decode_with_cache(cfg, params, tokens, prompt_mask, P, S):
  """Writes tokens[:, :P] at slot 0, then one token at a time at slot P+i; returns logits, scalar."""
  B, T = tokens.shape
  cache = init_cache(cfg, B, S)
  model = Transformer(cfg)

  @jax.jit
  def step(params, tok, positions, slot_mask, cache, cache_index):
    return model.apply({"params": params}, tok, positions=positions, attention_mask=slot_mask,
                       cache=cache, cache_index=cache_index)

  valid = np.zeros((B, S), bool)
  valid[:, :P] = prompt_mask
  positions = np.maximum(np.cumsum(prompt_mask, axis=1) - 1, 0).astype(np.int32)
  out = step(params, jnp.asarray(tokens[:, :P]), jnp.asarray(positions), jnp.asarray(valid), cache,
             jnp.int32(0))
  logits, scalars = [out.logits], [out.scalar]
  cache = out.cache
  next_pos = prompt_mask.sum(axis=1).astype(np.int32)  # [B]
  for i in range(T - P):
    valid[:, P + i] = True
    out = step(params, jnp.asarray(tokens[:, P + i:P + i + 1]), jnp.asarray(next_pos[:, None]),
               jnp.asarray(valid), cache, jnp.int32(P + i))
    cache = out.cache
    logits.append(out.logits)
    scalars.append(out.scalar)
    next_pos = next_pos + 1
  return np.concatenate(logits, axis=1), np.concatenate(scalars, axis=1), cache


@pytest.mark.parametrize("scan", [False, True])
def test_kv_cache_decoding_matches_full_forward(scan):
  cfg = make_cfg(num_kv_heads=2, scan_layers=scan, tie_embeddings=False)
  params = make_params(cfg, seed=14)
  B, T, P, S = 2, 8, 4, 10  # cache longer than the sequence: trailing slots stay empty
  tokens = random_tokens(15, batch=B, seq=T)
  pad = 2
  prompt_mask = np.ones((B, P), bool)
  prompt_mask[0, :pad] = False  # row 0 is left-padded
  full_mask = np.ones((B, T), bool)
  full_mask[0, :pad] = False

  full = apply(cfg, params, jnp.asarray(tokens), attention_mask=jnp.asarray(full_mask))
  logits, scalar, cache = _decode_with_cache(cfg, params, tokens, prompt_mask, P, S)
  assert logits.shape == (B, T, VOCAB)
  np.testing.assert_allclose(logits[full_mask], np.asarray(full.logits)[full_mask],
                             rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(scalar[full_mask], np.asarray(full.scalar)[full_mask],
                             rtol=1e-4, atol=1e-4)
  # Unpadded row, compared also with the numpy reference.
  ref_logits, _ = np_forward(params, cfg, tokens[1:])
  np.testing.assert_allclose(logits[1], ref_logits[0], rtol=1e-4, atol=1e-4)

  # Cache layout: stacked over layers when scanned, a list of per-layer dicts otherwise; the
  # slots past the last written token are still zero.
  if scan:
    assert cache["k"].shape == (cfg.num_layers, B, S, cfg.num_kv_heads, cfg.head_dim)
    k_all = np.asarray(cache["k"])
  else:
    assert isinstance(cache, list) and len(cache) == cfg.num_layers
    assert cache[0]["k"].shape == (B, S, cfg.num_kv_heads, cfg.head_dim)
    k_all = np.stack([np.asarray(c["k"]) for c in cache])
  assert np.all(k_all[:, :, T:] == 0)
  assert np.all(np.any(k_all[:, :, :T] != 0, axis=(-1, -2)))


def test_cache_requires_explicit_mask_and_positions():
  cfg = make_cfg()
  params = make_params(cfg)
  cache = init_cache(cfg, 1, 4)
  tok = jnp.zeros((1, 1), jnp.int32)
  with pytest.raises(ValueError):
    apply(cfg, params, tok, positions=jnp.zeros((1, 1), jnp.int32), cache=cache)
  with pytest.raises(ValueError):
    apply(cfg, params, tok, attention_mask=jnp.ones((1, 4), bool), cache=cache)


# ----------------------------------------------------------------------------------------------
# 8. read_at.
# ----------------------------------------------------------------------------------------------

def test_read_at():
  rng = np.random.default_rng(16)
  values = rng.normal(size=(3, 5)).astype(np.float32)
  index = np.array([4, 0, 2], np.int32)
  got = read_at(jnp.asarray(values), jnp.asarray(index))
  np.testing.assert_array_equal(got, values[np.arange(3), index])
  values3 = rng.normal(size=(3, 5, 7)).astype(np.float32)
  got3 = read_at(jnp.asarray(values3), jnp.asarray(index))
  assert got3.shape == (3, 7)
  np.testing.assert_array_equal(got3, values3[np.arange(3), index])
