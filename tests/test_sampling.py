"""Sampling tests: cached generation against uncached full forward passes and numpy references.

Every reference here is independent of the decode loop in `rlhf_jax.model.sampling`: log-probs come
from one full (uncached) forward pass over prompt + response, greedy decoding is re-derived by a
plain Python loop that re-runs the full model each step, left padding and the top-k / top-p
filters are re-implemented in numpy, and sampling frequencies are compared with a float64 softmax.

Compilation is the dominant cost, so all tests share a handful of shapes and static arguments.
"""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from rlhf_jax.model.config import PRESETS
from rlhf_jax.model.sampling import filter_logits, generate, to_left_padding
from rlhf_jax.model.transformer import Transformer, init_params

CFG = dataclasses.replace(PRESETS["tiny"], dtype="float32", param_dtype="float32")
SCAN_CFG = dataclasses.replace(CFG, scan_layers=True)
SMALL_CFG = dataclasses.replace(CFG, vocab_size=16)  # for the sampling-distribution tests

B, P, N = 4, 8, 6  # batch, prompt slots, max_new_tokens: shared by most tests (one compile each)
LENGTHS = (8, 3, 5, 1)  # per-row prompt lengths, full and short rows mixed
PAD_ID = 0


def make_params(cfg, seed=0, noise=0.1):
  """Initialised params perturbed with random normal noise so logits are far from uniform.

  The noise comes from numpy: per-shape jax.random calls would each cost an XLA compilation.
  """
  params = nn.meta.unbox(jax.jit(init_params, static_argnums=0)(cfg, jax.random.PRNGKey(seed)))
  rng = np.random.default_rng(seed + 1000)
  return jax.tree.map(
      lambda x: jnp.asarray(np.asarray(x) + noise * rng.normal(size=x.shape), x.dtype), params)


def stack_layers(params, num_layers):
  """Unscanned params -> the equivalent scan_layers=True params (layer i at index i)."""
  layers = [params[f"layer_{i}"] for i in range(num_layers)]
  out = {k: v for k, v in params.items() if not k.startswith("layer_")}
  out["layers"] = jax.tree.map(lambda *xs: jnp.stack(xs), *layers)
  return out


_FORWARD = {}


def full_logits(cfg, params, tokens, mask):
  """One uncached forward pass (default positions = count of valid tokens before each one)."""
  if cfg not in _FORWARD:
    _FORWARD[cfg] = jax.jit(lambda p, t, m: Transformer(cfg).apply(
        {"params": p}, t, attention_mask=m).logits)
  return np.asarray(_FORWARD[cfg](params, jnp.asarray(tokens), jnp.asarray(mask)), np.float64)


def np_log_softmax(x):
  x = x - x.max(axis=-1, keepdims=True)
  return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def random_prompts(seed, lengths, width, vocab, sides):
  """Prompts padded to `width`; sides[b] in {'left', 'right'}. Pad slots hold random junk tokens
  (not pad_id), so any leak of a padded slot into the computation changes the result."""
  rng = np.random.default_rng(seed)
  valid = [rng.integers(1, vocab, size=n).astype(np.int32) for n in lengths]
  tokens = rng.integers(0, vocab, size=(len(lengths), width)).astype(np.int32)
  mask = np.zeros((len(lengths), width), bool)
  for b, (v, side) in enumerate(zip(valid, sides)):
    sl = slice(width - len(v), width) if side == "left" else slice(0, len(v))
    tokens[b, sl], mask[b, sl] = v, True
  return tokens, mask, valid


def np_left_pad(valid, width, pad_id=PAD_ID):
  tokens = np.full((len(valid), width), pad_id, np.int32)
  mask = np.zeros((len(valid), width), bool)
  for b, v in enumerate(valid):
    tokens[b, width - len(v):], mask[b, width - len(v):] = v, True
  return tokens, mask


@pytest.fixture(scope="module")
def setup():
  params = make_params(CFG)
  model = Transformer(CFG)
  sides = ("left", "right", "left", "right")
  tokens, mask, valid = random_prompts(0, LENGTHS, P, CFG.vocab_size, sides)
  return params, model, tokens, mask, valid


def run(setup_, rng_seed=0, tokens=None, mask=None, **kw):
  params, model, t0, m0, _ = setup_
  tokens = t0 if tokens is None else tokens
  mask = m0 if mask is None else mask
  kw = dict(dict(max_new_tokens=N, temperature=1.0, pad_id=PAD_ID), **kw)
  gen = generate(params, jnp.asarray(tokens), jnp.asarray(mask), jax.random.PRNGKey(rng_seed),
                 model=model, **kw)
  return jax.tree.map(np.asarray, gen)


def reference_log_probs(cfg, params, gen, temperature):
  """log softmax(logits / T) of each response token from one full forward pass."""
  full = np.concatenate([gen.prompt_tokens, gen.tokens], axis=1)
  full_mask = np.concatenate([gen.prompt_mask, gen.mask], axis=1)
  logits = full_logits(cfg, params, full, full_mask)
  p = gen.prompt_tokens.shape[1]
  n = gen.tokens.shape[1]
  logp = np_log_softmax(logits[:, p - 1:p + n - 1] / temperature)  # position t predicts t + 1
  return np.take_along_axis(logp, gen.tokens[..., None].astype(np.int64), axis=-1)[..., 0]


# ----------------------------------------------------------------------------------------------
# 1. Cached decoding equals a full forward pass.
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("padding", ["mixed", "right"])
def test_log_probs_match_full_forward(setup, temperature, padding):
  params, _, tokens, mask, _ = setup
  if padding == "right":  # every row right-padded (the fixture's batch alternates left / right)
    tokens, mask, _ = random_prompts(1, LENGTHS, P, CFG.vocab_size, ["right"] * B)
  gen = run(setup, rng_seed=3, tokens=tokens, mask=mask, temperature=temperature)
  assert gen.mask.all() and (gen.lengths == N).all()  # no eos_id: every row runs to the end
  # Returned prompts are left-padded, with the valid tokens of each row in order.
  left_mask = np.arange(P)[None, :] >= P - np.array(LENGTHS)[:, None]
  np.testing.assert_array_equal(gen.prompt_mask, left_mask)
  for b in range(B):
    np.testing.assert_array_equal(gen.prompt_tokens[b][gen.prompt_mask[b]], tokens[b][mask[b]])
  ref = reference_log_probs(CFG, params, gen, temperature)
  np.testing.assert_allclose(gen.log_probs, ref, atol=1e-4, rtol=0)
  assert (ref < -0.05).any() and np.ptp(ref) > 1.0  # non-degenerate comparison


def test_scan_layers_generation_matches_full_forward(setup):
  """scan_layers=True with the same weights stacked: log-probs match the (unscanned) full forward
  pass, and sampling with the same key gives the same tokens as the unscanned model."""
  params, _, tokens, mask, _ = setup
  scan_params = stack_layers(params, CFG.num_layers)
  gen = generate(scan_params, jnp.asarray(tokens), jnp.asarray(mask), jax.random.PRNGKey(4),
                 model=Transformer(SCAN_CFG), max_new_tokens=N, temperature=0.7, pad_id=PAD_ID)
  gen = jax.tree.map(np.asarray, gen)
  ref = reference_log_probs(CFG, params, gen, 0.7)
  np.testing.assert_allclose(gen.log_probs, ref, atol=1e-4, rtol=0)
  assert np.ptp(ref) > 1.0
  unscanned = run(setup, rng_seed=4, temperature=0.7)
  np.testing.assert_array_equal(gen.tokens, unscanned.tokens)
  np.testing.assert_allclose(gen.log_probs, unscanned.log_probs, atol=1e-4, rtol=0)


# ----------------------------------------------------------------------------------------------
# 2. Greedy decoding.
# ----------------------------------------------------------------------------------------------

def greedy_reference(params, valid, n):
  """Plain Python loop: re-run the full uncached model on the whole sequence every step."""
  tokens, mask = np_left_pad(valid, P)
  tokens = np.concatenate([tokens, np.zeros((len(valid), n), np.int32)], axis=1)
  mask = np.concatenate([mask, np.zeros((len(valid), n), bool)], axis=1)
  out, logps = [], []
  for i in range(n):
    # Slots after P + i are still empty; causality makes them irrelevant to position P + i - 1.
    logits = full_logits(CFG, params, tokens, mask)[:, P + i - 1]
    tok = logits.argmax(axis=-1)
    out.append(tok)
    logps.append(np_log_softmax(logits).max(axis=-1))
    tokens[:, P + i], mask[:, P + i] = tok, True
  return np.stack(out, axis=1), np.stack(logps, axis=1)


@pytest.fixture(scope="module")
def greedy(setup):
  return run(setup, rng_seed=0, temperature=0.0)


def test_greedy_deterministic_and_matches_uncached_loop(setup, greedy):
  params, _, _, _, valid = setup
  again = run(setup, rng_seed=123, temperature=0.0)  # the key must not matter
  for a, b in zip(greedy, again):
    np.testing.assert_array_equal(a, b)
  ref_tokens, ref_logps = greedy_reference(params, valid, N)
  np.testing.assert_array_equal(greedy.tokens, ref_tokens)
  np.testing.assert_allclose(greedy.log_probs, ref_logps, atol=1e-4, rtol=0)
  assert greedy.mask.all()
  assert len(np.unique(greedy.tokens)) > 2  # the model is not stuck on one token


# ----------------------------------------------------------------------------------------------
# 3. Reproducibility.
# ----------------------------------------------------------------------------------------------

def test_fixed_key_reproducible_different_keys_differ(setup):
  a, b, c = run(setup, rng_seed=7), run(setup, rng_seed=7), run(setup, rng_seed=8)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)
  assert (a.tokens != c.tokens).mean() > 0.5  # vocab 1024 at T=1: collisions are rare


# ----------------------------------------------------------------------------------------------
# 4. Padding side does not matter; to_left_padding keeps order.
# ----------------------------------------------------------------------------------------------

def test_right_and_left_padding_give_identical_generations(setup):
  _, _, _, _, valid = setup
  rng = np.random.default_rng(11)
  left_t, left_m = np_left_pad(valid, P)
  right_t = rng.integers(0, CFG.vocab_size, size=(B, P)).astype(np.int32)  # junk in pad slots
  right_m = np.zeros((B, P), bool)
  for b, v in enumerate(valid):
    right_t[b, :len(v)], right_m[b, :len(v)] = v, True
  g_left = run(setup, rng_seed=5, tokens=left_t, mask=left_m)
  g_right = run(setup, rng_seed=5, tokens=right_t, mask=right_m)
  np.testing.assert_array_equal(g_left.prompt_mask, g_right.prompt_mask)
  np.testing.assert_array_equal(g_left.prompt_mask, left_m)
  np.testing.assert_array_equal(g_left.prompt_tokens[left_m], right_t[right_m])
  np.testing.assert_array_equal(g_right.prompt_tokens[left_m], right_t[right_m])
  np.testing.assert_array_equal(g_left.tokens, g_right.tokens)
  np.testing.assert_array_equal(g_left.mask, g_right.mask)
  np.testing.assert_allclose(g_left.log_probs, g_right.log_probs, atol=1e-5, rtol=0)


def test_to_left_padding_matches_numpy_loop():
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, 100, size=(6, 9)).astype(np.int32)
  mask = rng.random((6, 9)) < 0.6  # arbitrary masks, holes included
  mask[0] = True
  mask[1] = False
  mask[2, :4], mask[2, 4:] = True, False  # right-padded row
  out_t, out_m = map(np.asarray, to_left_padding(jnp.asarray(tokens), jnp.asarray(mask)))
  for b in range(tokens.shape[0]):
    kept = [t for t, m in zip(tokens[b], mask[b]) if m]
    n = len(kept)
    assert list(out_t[b, tokens.shape[1] - n:]) == kept
    assert not out_m[b, :tokens.shape[1] - n].any() and out_m[b, tokens.shape[1] - n:].all()
    # Every token is still there (a permutation of the row).
    assert sorted(out_t[b]) == sorted(tokens[b])


# ----------------------------------------------------------------------------------------------
# 5. EOS stopping.
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class CountingModel:
  """Wraps a Transformer and records the cache_index of every model call made by generate."""
  inner: Transformer

  @property
  def cfg(self):
    return self.inner.cfg

  def apply(self, variables, tokens, positions, attention_mask, cache, cache_index):
    jax.debug.callback(lambda s: _CALLS.append(int(s)), cache_index)
    return self.inner.apply(variables, tokens, positions, attention_mask, cache, cache_index)


_CALLS: list[int] = []


def test_eos_stops_rows_and_loop(setup, greedy):
  params, model, _, _, valid = setup
  # Greedy continuation g of row 1's prompt. Row b of the new batch is that prompt extended by
  # g[:b], so its greedy continuation is g[b:]. With eos_id = g[k] (first occurrence at k), row b
  # emits EOS at step k - b: every row stops, at different steps, and the loop should end after
  # k + 1 < N steps.
  g = greedy.tokens[1]
  ks = [k for k in range(N - 1) if g[k] not in g[:k]]
  k = max(ks)
  assert k >= 1, f"degenerate greedy continuation {g}"
  eos = int(g[k])
  starts = [min(b, k) for b in range(B)]
  prompts = [np.concatenate([valid[1], g[:s]]) for s in starts]
  tokens = np.full((B, P), PAD_ID, np.int32)  # right-padded
  mask = np.zeros((B, P), bool)
  for b, v in enumerate(prompts):
    tokens[b, :len(v)], mask[b, :len(v)] = v, True

  _CALLS.clear()
  gen = generate(params, jnp.asarray(tokens), jnp.asarray(mask), jax.random.PRNGKey(0),
                 model=CountingModel(model), max_new_tokens=N, temperature=0.0, eos_id=eos,
                 pad_id=PAD_ID)
  gen = jax.tree.map(np.asarray, gen)
  jax.effects_barrier()

  for b, s in enumerate(starts):
    n = k - s + 1  # response length, EOS included
    np.testing.assert_array_equal(gen.tokens[b, :n], g[s:k + 1])
    assert gen.tokens[b, n - 1] == eos and (gen.tokens[b, :n - 1] != eos).all()
    assert gen.mask[b, :n].all() and not gen.mask[b, n:].any()
    assert (gen.tokens[b, n:] == PAD_ID).all()
    assert (gen.log_probs[b, n:] == 0).all() and (gen.log_probs[b, :n] < 0).all()
    assert gen.lengths[b] == n
  # Every row has stopped after k + 1 steps: nothing after that.
  assert not gen.mask[:, k + 1:].any() and (gen.tokens[:, k + 1:] == PAD_ID).all()
  # log-probs of the kept tokens still match a full forward pass.
  np.testing.assert_allclose(gen.log_probs, reference_log_probs(CFG, params, gen, 1.0) * gen.mask,
                             atol=1e-4, rtol=0)
  # The while loop stopped early: one prefill call at slot 0, then k + 1 decode steps (not N).
  assert sorted(_CALLS) == [0] + [P + i for i in range(k + 1)], _CALLS


# ----------------------------------------------------------------------------------------------
# 6. top-k / top-p filtering.
# ----------------------------------------------------------------------------------------------

def np_top_k_keep(logits, k):
  order = np.argsort(-logits, axis=-1, kind="stable")
  keep = np.zeros(logits.shape, bool)
  np.put_along_axis(keep, order[:, :k], True, axis=-1)
  return keep


def np_top_p_keep(logits, p, allowed=None):
  """Smallest set of most likely tokens (among `allowed`, renormalised) with mass >= p."""
  x = logits.astype(np.float64)
  if allowed is not None:
    x = np.where(allowed, x, -np.inf)
  keep = np.zeros(logits.shape, bool)
  for b in range(x.shape[0]):
    probs = np.exp(x[b] - x[b].max())
    probs /= probs.sum()
    order = np.argsort(-probs, kind="stable")
    cum = np.cumsum(probs[order])
    n = int(np.searchsorted(cum, p) + 1)  # first index with cum >= p, counted
    n = min(n, len(order))
    # Skip boundary cases where float32 vs float64 rounding could decide membership.
    assert np.min(np.abs(cum - p)) > 1e-5, "borderline nucleus; pick another seed"
    keep[b, order[:n]] = True
  return keep


def check_filtered(filtered, logits, keep):
  filtered = np.asarray(filtered)
  np.testing.assert_array_equal(filtered[keep], logits[keep])
  # Removed entries are -inf or the most negative finite float: zero probability either way.
  assert (filtered[~keep] <= np.finfo(np.float32).min).all()
  probs = np.asarray(jax.nn.softmax(jnp.asarray(filtered), axis=-1))
  assert (probs[~keep] == 0).all()


@pytest.fixture(scope="module")
def random_logits():
  return (np.random.default_rng(0).normal(size=(16, 50)) * 2.0).astype(np.float32)


@pytest.mark.parametrize("k", [1, 5, 49])
def test_filter_top_k(random_logits, k):
  keep = np_top_k_keep(random_logits, k)
  assert (keep.sum(axis=-1) == k).all()
  check_filtered(filter_logits(jnp.asarray(random_logits), top_k=k), random_logits, keep)


@pytest.mark.parametrize("p", [1e-6, 0.3, 0.75, 0.95])
def test_filter_top_p(random_logits, p):
  keep = np_top_p_keep(random_logits, p)
  if p == 1e-6:
    np.testing.assert_array_equal(keep, np_top_k_keep(random_logits, 1))  # argmax always kept
  check_filtered(filter_logits(jnp.asarray(random_logits), top_p=p), random_logits, keep)


@pytest.mark.parametrize("k,p", [(5, 0.6), (10, 0.9), (3, 0.999)])
def test_filter_top_k_then_top_p(random_logits, k, p):
  """top-p applies to the top-k distribution renormalised (the Hugging Face convention)."""
  top_k = np_top_k_keep(random_logits, k)
  keep = np_top_p_keep(random_logits, p, allowed=top_k)
  assert (keep <= top_k).all()
  check_filtered(filter_logits(jnp.asarray(random_logits), top_k=k, top_p=p), random_logits, keep)


def test_filter_disabled(random_logits):
  out = np.asarray(filter_logits(jnp.asarray(random_logits), top_k=0, top_p=1.0))
  np.testing.assert_array_equal(out, random_logits)


def test_top_k_1_sampling_equals_greedy(setup, greedy):
  gen = run(setup, rng_seed=9, temperature=1.0, top_k=1)
  np.testing.assert_array_equal(gen.tokens, greedy.tokens)
  # Returned log-probs are of the untruncated distribution (T=1 here, as greedy), not 0.
  np.testing.assert_allclose(gen.log_probs, greedy.log_probs, atol=1e-5, rtol=0)
  assert (gen.log_probs < -1e-3).all()


def test_generate_accepts_top_p(setup, greedy):
  gen = run(setup, rng_seed=9, temperature=1.0, top_p=1e-6)  # nucleus = the argmax alone
  np.testing.assert_array_equal(gen.tokens, greedy.tokens)


# ----------------------------------------------------------------------------------------------
# 7. Sampling distribution.
# ----------------------------------------------------------------------------------------------

NUM_SAMPLES = 8192


@pytest.fixture(scope="module")
def small_setup(setup):
  # The tiny model's weights with its (tied) embedding cut to the first 16 tokens.
  params = dict(setup[0])
  params["embedding"] = params["embedding"][:SMALL_CFG.vocab_size]
  prompt = np.array([[5, 9, 2, 11]], np.int32)
  logits = full_logits(SMALL_CFG, params, prompt, np.ones_like(prompt, bool))[0, -1]
  return params, prompt, logits


def sample_counts(small_setup_, **kw):
  params, prompt, _ = small_setup_
  tokens = jnp.asarray(np.repeat(prompt, NUM_SAMPLES, axis=0))
  gen = generate(params, tokens, jnp.ones(tokens.shape, bool), jax.random.PRNGKey(42),
                 model=Transformer(SMALL_CFG), max_new_tokens=1, **kw)
  gen = jax.tree.map(np.asarray, gen)
  return np.bincount(gen.tokens[:, 0], minlength=SMALL_CFG.vocab_size), gen


def chi2_pvalue(counts, probs):
  support = probs > 0
  assert counts[~support].sum() == 0, "sampled a token with zero probability"
  expected = probs[support] * counts.sum()
  stat = ((counts[support] - expected) ** 2 / expected).sum()
  return stats.chi2.sf(stat, df=support.sum() - 1)


def softmax64(x):
  e = np.exp(x - x.max())
  return e / e.sum()


def test_sampling_distribution_matches_softmax(small_setup):
  _, _, logits = small_setup
  temperature = 0.7
  counts, gen = sample_counts(small_setup, temperature=temperature)
  probs = softmax64(logits / temperature)
  assert chi2_pvalue(counts, probs) > 1e-3
  freq = counts / NUM_SAMPLES
  assert np.max(np.abs(freq - probs)) < 5 * np.sqrt(0.25 / NUM_SAMPLES)
  # The test has power: the untempered distribution is clearly rejected.
  assert chi2_pvalue(counts, softmax64(logits)) < 1e-6
  # Log-probs are those of the tempered distribution.
  np.testing.assert_allclose(gen.log_probs[:, 0], np.log(probs)[gen.tokens[:, 0]], atol=1e-4)


def test_top_k_sampling_distribution(small_setup):
  _, _, logits = small_setup
  k = 4
  counts, gen = sample_counts(small_setup, temperature=1.0, top_k=k)
  kept = np.argsort(-logits)[:k]
  probs = np.zeros_like(logits)
  probs[kept] = softmax64(logits[kept])
  assert chi2_pvalue(counts, probs) > 1e-3  # also asserts nothing outside the top k was drawn
  # Log-probs are of the full (untruncated) distribution.
  full = np.log(softmax64(logits))
  np.testing.assert_allclose(gen.log_probs[:, 0], full[gen.tokens[:, 0]], atol=1e-4)

