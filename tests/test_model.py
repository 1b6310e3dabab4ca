"""Transformer tests against an independent float64 numpy reference written from the maths.

The reference below implements RMSNorm, rotary embeddings (with Llama 3.1's and linear frequency
scaling), grouped-query causal attention (with q/k/v biases and per-head q/k norms), SwiGLU,
pre-norm residual blocks, the final norm, the (tied or untied) LM head and the scalar head
directly in numpy; it only reads the parameter arrays of the Flax model.
"""
from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.model.config import PRESETS, ModelConfig, param_counts
from rlhf_jax.model.transformer import Transformer, init_cache, init_params, read_at, rotary_frequencies

VOCAB = 97  # small vocab keeps the LM head cheap
B, T = 2, 8  # the common batch shape: one compilation per config is shared by most tests


def make_cfg(**kw):
  base = dict(vocab_size=VOCAB, dtype="float32", param_dtype="float32")
  base.update(kw)
  return dataclasses.replace(PRESETS["tiny"], **base)


CFG_GQA_TIED = make_cfg(num_kv_heads=2, tie_embeddings=True, scan_layers=False)
CFG_MHA_UNTIED = make_cfg(num_kv_heads=4, tie_embeddings=False, scan_layers=False)
CFG_GQA_SCAN = make_cfg(num_kv_heads=2, tie_embeddings=False, scan_layers=True)
# Every variant added for imported checkpoints at once (Qwen2's biases, Qwen3's q/k norms, Llama
# 3.1's rotary scaling); original_max_len 64 puts head_dim 16's wavelengths (6, 20, 63, 199, ...)
# in all three of its bands.
CFG_VARIANTS = make_cfg(num_kv_heads=2, tie_embeddings=False, scan_layers=False, qkv_bias=True, qk_norm=True,
                        rope_scaling="llama3", rope_factor=8.0, rope_original_max_len=64)


def param_shapes(cfg):
  """Unboxed parameter tree of `init_params` as ShapeDtypeStructs (abstract: no compilation)."""
  return jax.eval_shape(lambda rng: nn.meta.unbox(init_params(cfg, rng)), jax.random.PRNGKey(0))


def make_params(cfg, seed=0, noise=0.1):
  """Random parameters with exactly the tree of `nn.meta.unbox(init_params(cfg, rng))`.

  The init values themselves (norm scales 1, zero scalar head, small fan-in weights) are replaced
  by init-like values plus random normal noise, so that nothing is zero or one and every
  parameter influences the outputs. (Running the real initialisers costs several seconds of XLA
  compile per config on CPU; `test_init_params` covers them once.)
  """
  rng = np.random.default_rng(seed)

  def leaf(path, s):
    name = jax.tree_util.keystr(path)
    base = 1.0 if name.endswith("['scale']") else 0.0
    return jnp.asarray(base + noise * rng.standard_normal(s.shape), s.dtype)

  return jax.tree_util.tree_map_with_path(leaf, param_shapes(cfg))


@functools.partial(jax.jit, static_argnums=0)
def _apply(cfg, params, tokens, kw):
  return Transformer(cfg).apply({"params": params}, tokens, **kw)


def apply(cfg, params, tokens, **kw):
  """Jitted forward pass (eager op-by-op dispatch is far slower on CPU)."""
  return _apply(cfg, params, jnp.asarray(tokens), {k: jnp.asarray(v) if isinstance(v, np.ndarray)
                                                   else v for k, v in kw.items()})


def ones_mask(batch=B, seq=T):
  return np.ones((batch, seq), bool)


def random_tokens(seed, batch=B, seq=T):
  return np.random.default_rng(seed).integers(0, VOCAB, size=(batch, seq)).astype(np.int32)


# ----------------------------------------------------------------------------------------------
# Independent float64 numpy reference.
# ----------------------------------------------------------------------------------------------

def np_rmsnorm(x, scale, eps):
  return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * scale


def np_rope_freqs(cfg):
  """theta^(-i/(D/2)) for i < D/2, scaled as Llama 3.1's paper and reference code put it: high
  frequencies kept, low ones divided by the factor, a smooth interpolation between."""
  half = cfg.head_dim // 2
  out = []
  for i in range(half):
    freq = cfg.rope_theta ** (-i / half)
    if cfg.rope_scaling == "linear":
      freq /= cfg.rope_factor
    elif cfg.rope_scaling == "llama3":
      wavelen = 2 * np.pi / freq
      if wavelen > cfg.rope_original_max_len / cfg.rope_low_freq_factor:
        freq /= cfg.rope_factor
      elif wavelen >= cfg.rope_original_max_len / cfg.rope_high_freq_factor:
        smooth = (cfg.rope_original_max_len / wavelen - cfg.rope_low_freq_factor) / (
            cfg.rope_high_freq_factor - cfg.rope_low_freq_factor)
        freq = (1 - smooth) * freq / cfg.rope_factor + smooth * freq
    out.append(freq)
  return np.array(out)


def np_rope(x, positions, freqs):
  """x [B, T, H, D]; rotates pairs (i, i + D/2) by angle position * freqs[i]."""
  d = x.shape[-1]
  half = d // 2
  out = np.empty_like(x)
  for i in range(half):
    ang = positions.astype(np.float64) * freqs[i]  # [B, T]
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
  if cfg.qkv_bias:
    q, k, v = q + p["bq"], k + p["bk"], v + p["bv"]
  if cfg.qk_norm:  # over head_dim, each head on its own
    q = np_rmsnorm(q, p["q_norm"]["scale"], cfg.norm_eps)
    k = np_rmsnorm(k, p["k_norm"]["scale"], cfg.norm_eps)
  q = np_rope(q, positions, np_rope_freqs(cfg))
  k = np_rope(k, positions, np_rope_freqs(cfg))
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
# 0. Initialisation: the parameter tree, logical axis names and init values.
# ----------------------------------------------------------------------------------------------

def _is_boxed(x):
  return isinstance(x, nn.LogicallyPartitioned)


def test_init_params():
  cfg = CFG_GQA_TIED
  # rbg keys compile far faster than threefry on CPU; the initialisers are the same.
  boxed = jax.jit(functools.partial(init_params, cfg))(jax.random.key(0, impl="rbg"))
  names = jax.tree.map(lambda x: x.names, boxed, is_leaf=_is_boxed)
  assert names["embedding"] == ("vocab", "embed")
  assert names["layer_0"]["attn"]["wk"] == ("embed", "kv_heads", "head_dim")
  assert names["layer_1"]["mlp"]["w_down"] == ("mlp", "embed")
  params = nn.meta.unbox(boxed)
  shapes = param_shapes(cfg)
  assert jax.tree.structure(params) == jax.tree.structure(shapes)
  assert jax.tree.map(lambda a: (a.shape, a.dtype), params) == jax.tree.map(
      lambda a: (a.shape, a.dtype), shapes)
  assert params["embedding"].shape == (VOCAB, cfg.d_model) and "lm_head" not in params
  assert params["layer_0"]["attn"]["wq"].shape == (cfg.d_model, cfg.num_heads, cfg.head_dim)
  assert params["layer_0"]["attn"]["wk"].shape == (cfg.d_model, cfg.num_kv_heads, cfg.head_dim)
  np.testing.assert_array_equal(params["final_norm"]["scale"], 1.0)
  np.testing.assert_array_equal(params["scalar_head"], 0.0)
  assert float(params["scalar_bias"]) == 0.0
  assert float(jnp.std(params["layer_0"]["attn"]["wq"])) > 0
  out = apply(cfg, params, random_tokens(0), attention_mask=ones_mask())
  np.testing.assert_array_equal(out.scalar, 0.0)  # zero-initialised scalar head
  assert np.all(np.isfinite(out.logits))
  # Scanned layers: one stacked parameter per layer kind, with a leading 'layers' axis.
  sboxed = jax.eval_shape(functools.partial(init_params, CFG_GQA_SCAN), jax.random.PRNGKey(0))
  snames = jax.tree.map(lambda x: x.names, sboxed, is_leaf=_is_boxed)
  assert snames["layers"]["attn"]["wq"] == ("layers", "embed", "heads", "head_dim")
  assert snames["lm_head"] == ("embed", "vocab")


# ----------------------------------------------------------------------------------------------
# 1. Forward pass against the reference.
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("cfg", [CFG_GQA_TIED, CFG_MHA_UNTIED, CFG_GQA_SCAN, CFG_VARIANTS],
                         ids=["gqa-tied", "mha-untied", "gqa-untied-scan", "bias-qknorm-llama3rope"])
def test_forward_matches_numpy_reference(cfg):
  params = make_params(cfg, seed=1)
  if cfg.scan_layers:
    assert params["layers"]["attn"]["wq"].shape[0] == cfg.num_layers
    assert not any(k.startswith("layer_") for k in params)
  else:
    assert "layer_0" in params and "layers" not in params
  assert ("lm_head" in params) == (not cfg.tie_embeddings)
  tokens = random_tokens(2)
  out = apply(cfg, params, tokens, attention_mask=ones_mask())
  ref_logits, ref_scalar = np_forward(params, cfg, tokens)
  assert out.logits.shape == (B, T, VOCAB) and out.logits.dtype == jnp.float32
  assert out.scalar.shape == (B, T) and out.scalar.dtype == jnp.float32
  assert out.hidden.shape == (B, T, cfg.d_model)
  assert out.cache is None
  # Guard against a degenerate comparison (e.g. everything ~0).
  assert np.std(ref_logits) > 0.1 and np.std(ref_scalar) > 0.1
  np.testing.assert_allclose(out.logits, ref_logits, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(out.scalar, ref_scalar, rtol=1e-4, atol=1e-4)
  if cfg == CFG_GQA_TIED:  # without an explicit mask (default: all True) the result is the same
    np.testing.assert_allclose(apply(cfg, params, tokens).logits, out.logits, rtol=1e-6, atol=1e-6)


# Llama 3.1 8B / 405B and Llama 3.2 1B / 3B as shipped, the variants config, and a linear one.
LLAMA31 = ModelConfig(head_dim=128, rope_theta=500000.0, rope_scaling="llama3", rope_factor=8.0)
LLAMA32 = ModelConfig(head_dim=64, rope_theta=500000.0, rope_scaling="llama3", rope_factor=32.0)


@pytest.mark.parametrize("cfg", [LLAMA31, LLAMA32, CFG_VARIANTS, ModelConfig(rope_scaling="linear", rope_factor=4.0)],
                         ids=["llama3.1", "llama3.2", "variants", "linear"])
def test_rotary_frequencies_match_float64_formula(cfg):
  want = np_rope_freqs(cfg)
  got = np.asarray(rotary_frequencies(cfg))
  assert got.dtype == np.float32 and got.shape == (cfg.head_dim // 2,)
  np.testing.assert_allclose(got, want, rtol=2 ** -23, atol=0)  # the float64 value, rounded once
  unscaled = cfg.rope_theta ** (-np.arange(cfg.head_dim // 2) / (cfg.head_dim // 2))
  ratio = unscaled / want
  if cfg.rope_scaling == "llama3":  # all three bands are there: kept, divided by the factor, between
    assert np.any(np.isclose(ratio, 1)) and np.any(np.isclose(ratio, cfg.rope_factor))
    assert np.any((ratio > 1.01) & (ratio < cfg.rope_factor - 0.01))
  else:
    np.testing.assert_allclose(ratio, cfg.rope_factor, rtol=1e-12)


def test_unscaled_rotary_frequencies_are_unchanged():
  # The expression rotary embeddings always had, bit for bit: today's models compute as before.
  cfg = PRESETS["13m"]
  want = cfg.rope_theta ** (-jnp.arange(32, dtype=jnp.float32) / 32)
  assert np.asarray(rotary_frequencies(cfg)).tobytes() == np.asarray(want).tobytes()


def test_variant_parameters():
  names = jax.tree.map(lambda x: x.names, jax.eval_shape(functools.partial(init_params, CFG_VARIANTS),
                                                         jax.random.PRNGKey(0)), is_leaf=_is_boxed)
  attn = names["layer_0"]["attn"]
  assert (attn["bq"], attn["bk"], attn["q_norm"]["scale"]) == (("heads", "head_dim"), ("kv_heads", "head_dim"),
                                                               ("norm",))
  shapes = param_shapes(CFG_VARIANTS)["layer_0"]["attn"]
  assert (shapes["bq"].shape, shapes["bv"].shape, shapes["k_norm"]["scale"].shape) == ((4, 16), (2, 16), (16,))
  for cfg in (CFG_VARIANTS, CFG_GQA_TIED):  # the analytic count covers the new parameters
    assert param_counts(cfg)["total"] == sum(int(np.prod(x.shape)) for x in jax.tree.leaves(param_shapes(cfg)))
  assert sorted(param_shapes(CFG_GQA_TIED)["layer_0"]["attn"]) == ["wk", "wo", "wq", "wv"]  # off: as before
  with pytest.raises(ValueError, match="rope_scaling='yarn'"):
    ModelConfig(rope_scaling="yarn")
  with pytest.raises(ValueError, match="expected 0 < low < high"):
    ModelConfig(rope_scaling="llama3", rope_low_freq_factor=4.0, rope_high_freq_factor=1.0)


def test_reference_is_sensitive_to_gqa_head_mapping():
  """Sanity check of the test itself: the n // group head mapping matters with these params."""
  cfg = CFG_GQA_TIED
  params = make_params(cfg, seed=1)
  tokens = random_tokens(2)
  out = apply(cfg, params, tokens, attention_mask=ones_mask())
  # Permuting query heads (0,1,2,3) -> (0,2,1,3) in wq and wo consistently pairs query head n
  # with kv head n % 2 instead of n // 2: the output must change.
  perm = np.array([0, 2, 1, 3])
  p2 = dict(params)
  for i in range(cfg.num_layers):
    attn = dict(p2[f"layer_{i}"]["attn"], wq=params[f"layer_{i}"]["attn"]["wq"][:, perm],
                wo=params[f"layer_{i}"]["attn"]["wo"][perm])
    p2[f"layer_{i}"] = dict(p2[f"layer_{i}"], attn=attn)
  out2 = apply(cfg, p2, tokens, attention_mask=ones_mask())
  assert np.max(np.abs(np.asarray(out.logits) - np.asarray(out2.logits))) > 1e-2


# ----------------------------------------------------------------------------------------------
# 2. Left padding.
# ----------------------------------------------------------------------------------------------

def test_left_padding_matches_unpadded():
  cfg = CFG_GQA_TIED
  params = make_params(cfg, seed=3)
  pad = 3
  tokens = random_tokens(4)
  tokens[0, :pad] = 0  # pad token id; the mask, not the id, must make them invisible
  mask = ones_mask()
  mask[0, :pad] = False
  out = apply(cfg, params, tokens, attention_mask=mask)
  alone = apply(cfg, params, tokens[:1, pad:], attention_mask=ones_mask(1, T - pad))
  np.testing.assert_allclose(out.logits[0, pad:], alone.logits[0], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(out.scalar[0, pad:], alone.scalar[0], rtol=1e-5, atol=1e-5)
  # The same tokens unmasked (pad tokens visible, positions shifted) give different logits.
  unmasked = apply(cfg, params, tokens, attention_mask=ones_mask())
  assert np.max(np.abs(np.asarray(unmasked.logits[0, pad:] - alone.logits[0]))) > 1e-3
  # The unpadded row is unaffected by the other row's padding.
  np.testing.assert_allclose(out.logits[1], unmasked.logits[1], rtol=1e-6, atol=1e-6)
  # And the padded batch matches the reference at the real positions.
  ref_logits, ref_scalar = np_forward(params, cfg, tokens, attention_mask=mask)
  np.testing.assert_allclose(out.logits[0, pad:], ref_logits[0, pad:], rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(out.scalar[0, pad:], ref_scalar[0, pad:], rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(out.logits[1], ref_logits[1], rtol=1e-4, atol=1e-4)
  assert np.all(np.isfinite(out.logits))  # fully masked (pad) queries must not produce NaN


# ----------------------------------------------------------------------------------------------
# 3. Causality.
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("cfg", [CFG_GQA_TIED, CFG_GQA_SCAN], ids=["unscanned", "scanned"])
def test_causality(cfg):
  params = make_params(cfg, seed=5)
  t = 4
  a = random_tokens(6)
  b = a.copy()
  b[:, t + 1:] = (a[:, t + 1:] + 1 + random_tokens(7)[:, t + 1:] % (VOCAB - 1)) % VOCAB
  assert np.all(b[:, t + 1:] != a[:, t + 1:])
  oa = apply(cfg, params, a, attention_mask=ones_mask())
  ob = apply(cfg, params, b, attention_mask=ones_mask())
  np.testing.assert_allclose(oa.logits[:, :t + 1], ob.logits[:, :t + 1], rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(oa.scalar[:, :t + 1], ob.scalar[:, :t + 1], rtol=1e-6, atol=1e-6)
  # Later positions do change (the test can fail the other way too).
  assert np.max(np.abs(np.asarray(oa.logits[:, t + 1:] - ob.logits[:, t + 1:]))) > 1e-3


# ----------------------------------------------------------------------------------------------
# 4. Scanned vs unscanned layers.
# ----------------------------------------------------------------------------------------------

def test_scan_matches_unscanned():
  cfg_scan = CFG_GQA_SCAN
  cfg = dataclasses.replace(cfg_scan, scan_layers=False)
  params = make_params(cfg, seed=8)
  sparams = stack_layers(params, cfg.num_layers)
  # The converted tree has exactly the structure and shapes of a scanned init.
  ref_tree = param_shapes(cfg_scan)
  assert jax.tree.structure(ref_tree) == jax.tree.structure(sparams)
  assert jax.tree.map(lambda a: a.shape, ref_tree) == jax.tree.map(lambda a: a.shape, sparams)
  tokens = random_tokens(9)
  o1 = apply(cfg, params, tokens, attention_mask=ones_mask())
  o2 = apply(cfg_scan, sparams, tokens, attention_mask=ones_mask())
  np.testing.assert_allclose(o1.logits, o2.logits, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(o1.scalar, o2.scalar, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(o1.hidden, o2.hidden, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# 5. Rematerialisation does not change gradients.
# ----------------------------------------------------------------------------------------------

@functools.partial(jax.jit, static_argnums=0)
def _loss_grad(cfg, params, tokens):
  def loss(p):
    out = Transformer(cfg).apply({"params": p}, tokens)
    logp = jax.nn.log_softmax(out.logits[:, :-1], axis=-1)
    nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1).mean()
    return nll + jnp.mean(out.scalar ** 2)
  return jax.value_and_grad(loss)(params)


def test_remat_full_gradients_match():
  cfg_scan = CFG_GQA_SCAN
  cfg = dataclasses.replace(cfg_scan, scan_layers=False)
  params = make_params(cfg, seed=10)
  tokens = jnp.asarray(random_tokens(11))
  l_ref, g_ref = _loss_grad(cfg, params, tokens)
  # Gradients reach every parameter, including the scalar head.
  assert all(float(jnp.max(jnp.abs(x))) > 0 for x in jax.tree.leaves(g_ref))

  def check(l, g, expected):
    np.testing.assert_allclose(l, l_ref, rtol=1e-6)
    assert jax.tree.structure(g) == jax.tree.structure(expected)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g), jax.tree.leaves(expected)):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6, err_msg=jax.tree_util.keystr(path))

  check(*_loss_grad(dataclasses.replace(cfg, remat="full"), params, tokens), g_ref)
  # Scanned + remat: stacking the layers is a reparametrisation, so the gradient w.r.t. the
  # stacked params is the stacked gradient of the unscanned, non-remat model.
  check(*_loss_grad(dataclasses.replace(cfg_scan, remat="full"),
                    stack_layers(params, cfg.num_layers), tokens),
        stack_layers(g_ref, cfg.num_layers))


# ----------------------------------------------------------------------------------------------
# 6. bfloat16 compute.
# ----------------------------------------------------------------------------------------------

def test_bfloat16_compute_close_to_float32():
  cfg = CFG_GQA_TIED
  cfg_bf16 = dataclasses.replace(cfg, dtype="bfloat16", param_dtype="float32")
  params = make_params(cfg, seed=12)
  tokens = random_tokens(13)
  o32 = apply(cfg, params, tokens, attention_mask=ones_mask())
  o16 = apply(cfg_bf16, params, tokens, attention_mask=ones_mask())
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

@functools.partial(jax.jit, static_argnums=0)
def _cached_step(cfg, params, tok, positions, slot_mask, cache, cache_index):
  return Transformer(cfg).apply({"params": params}, tok, positions=positions,
                                attention_mask=slot_mask, cache=cache, cache_index=cache_index)


def _decode_with_cache(cfg, params, tokens, prompt_mask, S):
  """Writes the prompt at slot 0, then one token at a time at slot P+i; returns logits, scalar."""
  batch, seq = tokens.shape
  P = prompt_mask.shape[1]
  cache = init_cache(cfg, batch, S)
  valid = np.zeros((batch, S), bool)
  valid[:, :P] = prompt_mask
  positions = np.maximum(np.cumsum(prompt_mask, axis=1) - 1, 0).astype(np.int32)
  out = _cached_step(cfg, params, jnp.asarray(tokens[:, :P]), jnp.asarray(positions),
                     jnp.asarray(valid), cache, jnp.int32(0))
  logits, scalars, cache = [out.logits], [out.scalar], out.cache
  next_pos = prompt_mask.sum(axis=1).astype(np.int32)  # [batch]
  for i in range(seq - P):
    valid[:, P + i] = True
    out = _cached_step(cfg, params, jnp.asarray(tokens[:, P + i:P + i + 1]),
                       jnp.asarray(next_pos[:, None]), jnp.asarray(valid), cache, jnp.int32(P + i))
    cache = out.cache
    logits.append(out.logits)
    scalars.append(out.scalar)
    next_pos = next_pos + 1
  return np.concatenate(logits, axis=1), np.concatenate(scalars, axis=1), cache


@pytest.mark.parametrize("cfg", [CFG_GQA_TIED, CFG_GQA_SCAN], ids=["unscanned", "scanned"])
def test_kv_cache_decoding_matches_full_forward(cfg):
  params = make_params(cfg, seed=14)
  P, S, pad = 4, 10, 2  # cache longer than the sequence: trailing slots stay empty
  tokens = random_tokens(15)
  full_mask = ones_mask()
  full_mask[0, :pad] = False  # row 0 is left-padded
  prompt_mask = full_mask[:, :P]

  full = apply(cfg, params, tokens, attention_mask=full_mask)
  logits, scalar, cache = _decode_with_cache(cfg, params, tokens, prompt_mask, S)
  assert logits.shape == (B, T, VOCAB)
  np.testing.assert_allclose(logits[full_mask], np.asarray(full.logits)[full_mask],
                             rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(scalar[full_mask], np.asarray(full.scalar)[full_mask],
                             rtol=1e-4, atol=1e-4)
  # Also against the numpy reference.
  ref_logits, _ = np_forward(params, cfg, tokens, attention_mask=full_mask)
  np.testing.assert_allclose(logits[full_mask], ref_logits[full_mask], rtol=1e-4, atol=1e-4)

  # Cache layout: stacked over layers when scanned, a list of per-layer dicts otherwise; the
  # slots past the last written token are still zero.
  if cfg.scan_layers:
    assert cache["k"].shape == (cfg.num_layers, B, S, cfg.num_kv_heads, cfg.head_dim)
    k_all = np.asarray(cache["k"])
  else:
    assert isinstance(cache, list) and len(cache) == cfg.num_layers
    assert cache[0]["k"].shape == (B, S, cfg.num_kv_heads, cfg.head_dim)
    k_all = np.stack([np.asarray(c["k"]) for c in cache])
  assert np.all(k_all[:, :, T:] == 0)
  assert np.all(np.any(k_all[:, :, :T] != 0, axis=(-1, -2)))


def test_cache_requires_explicit_mask_and_positions():
  cfg = CFG_GQA_TIED
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
  assert got.shape == (3,)
  np.testing.assert_array_equal(got, values[np.arange(3), index])
  values3 = rng.normal(size=(3, 5, 7)).astype(np.float32)
  got3 = read_at(jnp.asarray(values3), jnp.asarray(index))
  assert got3.shape == (3, 7)
  np.testing.assert_array_equal(got3, values3[np.arange(3), index])
