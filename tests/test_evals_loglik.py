"""The evaluations' model caller: bucketed continuation scores and activations against brute force."""
import dataclasses

import flax.linen as nn
import jax
import numpy as np
import pytest

from rlhf_jax.data.sequence_start import SequenceStart
from rlhf_jax.evals.loglik import Scorer, bucket_length, encode_requests
from rlhf_jax.model.config import ModelConfig
from rlhf_jax.model.transformer import Transformer, init_params
from rlhf_jax.training import sharding as shd

CFG = ModelConfig(vocab_size=64, d_model=32, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=16, mlp_dim=64,
                  max_seq_len=64)


@pytest.fixture(scope="module")
def params():
  return nn.meta.unbox(init_params(CFG, jax.random.PRNGKey(0)))


def _requests(n, seed=0, lengths=(5, 12, 20, 37)):
  """Requests of a few total lengths (one reference compile each, buckets 8 to 64), split at
  random between context and continuation."""
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(n):
    total = int(rng.choice(lengths))
    cont = int(rng.integers(1, min(12, total - 1) + 1))
    seq = list(rng.integers(4, 64, total))
    out.append((seq[:total - cont], seq[total - cont:]))
  return out


@jax.jit
def _logits(params, seq):
  return Transformer(CFG).apply({"params": params}, seq).logits


def _brute_force(params, cfg, ctx, cont):
  """One unpadded forward pass per request; float64 log-softmax of its logits."""
  assert cfg == CFG
  seq = np.array([list(ctx) + list(cont)], np.int32)
  logits = np.asarray(_logits(params, seq), np.float64)[0]
  logp = logits - logits.max(-1, keepdims=True)
  logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
  return np.array([logp[len(ctx) + j - 1, t] for j, t in enumerate(cont)])


def test_bucket_lengths_are_powers_of_two_within_limits():
  assert [bucket_length(n, 16, 64) for n in (1, 16, 17, 33, 64, 70)] == [16, 16, 32, 64, 64, 64]


def test_scores_equal_one_forward_pass_per_request_across_buckets(params):
  # Lengths 2..50 land in buckets 8, 16, 32 and 64; batches mix lengths and get filler rows.
  reqs = _requests(23)
  scorer = Scorer(params, CFG, shd.make_mesh((1, 1, 1), jax.devices()[:1]), batch_size=5, min_len=8)
  got = scorer.continuation_logprobs(reqs)
  assert len({bucket_length(len(c) + len(t), 8, 64) for c, t in reqs}) >= 3
  for (ctx, cont), lp in zip(reqs, got):
    ref = _brute_force(params, CFG, ctx, cont)
    assert lp.shape == (len(cont),)
    # float32 logits of O(1) size: each log-prob within ~1e-5; 1e-4 leaves room for the
    # different reduction orders of padded and unpadded shapes on any CPU.
    np.testing.assert_allclose(lp, ref, atol=1e-4)
  sums = scorer.continuation_sums(reqs)
  np.testing.assert_allclose(sums, [lp.sum() for lp in got], rtol=0, atol=1e-12)


def test_sharded_scores_equal_single_device_scores(params):
  reqs = _requests(19, seed=1)
  one = Scorer(params, CFG, shd.make_mesh((1, 1, 1), jax.devices()[:1]), batch_size=8, min_len=8)
  mesh = shd.make_mesh((2, 2, 2))  # data, fsdp and tensor axes all split
  sharded = Scorer(jax.device_put(params, shd.replicated(mesh)), CFG, mesh, batch_size=8, min_len=8)
  for a, b in zip(one.continuation_logprobs(reqs), sharded.continuation_logprobs(reqs)):
    np.testing.assert_allclose(a, b, atol=1e-5)  # same maths, other partitioning of the sums


def test_long_contexts_are_cut_from_the_left(params):
  scorer = Scorer(params, CFG, shd.make_mesh((1, 1, 1), jax.devices()[:1]), batch_size=4, max_len=16)
  ctx, cont = list(range(4, 30)), [7, 8, 9]
  (lp,) = scorer.continuation_logprobs([(ctx, cont)])
  np.testing.assert_allclose(lp, _brute_force(params, CFG, ctx[-13:], cont), atol=1e-4)
  with pytest.raises(ValueError, match="request 1: continuation of 16 tokens does not fit max_len=16"):
    scorer.continuation_logprobs([(ctx, cont), ([5], list(range(4, 20)))])
  with pytest.raises(ValueError, match="request 0: context and continuation must each have a token"):
    scorer.continuation_logprobs([([], [5])])


def test_mean_activations_are_the_mean_of_the_truncated_models_hidden_states(params):
  seqs = [c + t for c, t in _requests(9, seed=2)]
  scorer = Scorer(params, CFG, shd.make_mesh((1, 1, 1), jax.devices()[:1]), batch_size=4, min_len=8)
  for layer, k in ((1, 1), (-1, 2)):
    got = scorer.mean_activations(seqs, layer=layer)
    # Independent reference: a model built with k layers from the first k layers' params.
    small = dataclasses.replace(CFG, num_layers=k)
    sub = {n: p for n, p in params.items() if not n.startswith("layer_") or int(n[6:]) < k}
    hidden_of = jax.jit(lambda p, s: Transformer(small).apply({"params": p}, s, lm_head=False).hidden)
    for s, row in zip(seqs, got):
      hidden = hidden_of(sub, np.array([s], np.int32))
      np.testing.assert_allclose(row, np.asarray(hidden, np.float64)[0].mean(0), atol=1e-5)
  with pytest.raises(ValueError, match="layer=3: expected 1 .. 2 or -1"):
    scorer.mean_activations(seqs, layer=3)


def test_scanned_layers_give_the_same_activations_as_unrolled_ones(params):
  scanned_cfg = dataclasses.replace(CFG, scan_layers=True)
  seqs = [c + t for c, t in _requests(5, seed=3)]
  mesh = shd.make_mesh((1, 1, 1), jax.devices()[:1])
  a = Scorer(params, CFG, mesh, batch_size=4).mean_activations(seqs, layer=1)
  stacked = {n: p for n, p in params.items() if not n.startswith("layer_")}
  stacked["layers"] = jax.tree.map(lambda *xs: np.stack(xs), *[params[f"layer_{i}"] for i in range(CFG.num_layers)])
  assert jax.tree.structure(stacked) == jax.tree.structure(nn.meta.unbox(init_params(scanned_cfg, jax.random.PRNGKey(0))))
  b = Scorer(stacked, scanned_cfg, mesh, batch_size=4).mean_activations(seqs, layer=1)
  np.testing.assert_allclose(a, b, atol=1e-5)


class _Tok(SequenceStart):
  eos_id = 2

  def encode(self, text):
    return [ord(ch) for ch in text]


def test_requests_move_trailing_space_to_the_continuation_and_empty_context_is_eos():
  reqs = encode_requests(_Tok(), ["The nurse was a ", ""], ["man", "Hello"])
  assert reqs[0] == ([ord(c) for c in "The nurse was a"], [ord(c) for c in " man"])
  assert reqs[1] == ([2], [ord(c) for c in "Hello"])
