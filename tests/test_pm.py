"""Preference-model objective against float64 numpy: the pairwise/ranked loss, scores read at the
end-of-context token, the optional LM term, sharded steps, a learnable synthetic rule, PM batches."""
import dataclasses
import itertools
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from rlhf_jax.data.batching import encode_dialogue
from rlhf_jax.data.hh_rlhf import catalog, read_comparisons
from rlhf_jax.data.pm_data import PMBatcher, encode_comparison, encode_for_pm, split_in_halves
from rlhf_jax.data.tokenizer import EOC_ID, EOS_ID, PAD_ID, train_tokenizer
from rlhf_jax.model.config import PRESETS
from rlhf_jax.model.transformer import Transformer, init_params
from rlhf_jax.objectives import pm
from rlhf_jax.trainers import pm_steps
from rlhf_jax.training import sharding as shd
from rlhf_jax.training.optimizer import make_optimizer
from rlhf_jax.training.train_state import create_train_state

import numerics

CFG = dataclasses.replace(PRESETS["tiny"], vocab_size=64)
MODEL = Transformer(CFG)
SEQ = 16
MARKER = 5  # the synthetic task's "good" token
OPT = ml_collections.ConfigDict(dict(learning_rate=1e-3, warmup_steps=0, final_lr_fraction=1.0, b1=0.9,
                                     b2=0.95, eps=1e-8, weight_decay=0.1, grad_clip=1.0))


def _softplus64(x):
  return np.logaddexp(0.0, np.asarray(x, np.float64))


def _perturb(params, seed=0):
  # The scalar head initialises to zero (all scores 0): give it real weight so scores differ.
  rng = np.random.default_rng(seed)
  noisy = jax.tree.map(lambda x: np.asarray(x) + 0.05 * rng.standard_normal(np.shape(x)).astype(np.float32),
                       params)
  noisy["scalar_head"] = 0.3 * rng.standard_normal(CFG.d_model).astype(np.float32)
  noisy["scalar_bias"] = np.float32(0.7)
  return noisy


@pytest.fixture(scope="module")
def single():
  """One single-device train state, initialised once (compiling the init is the slow part)."""
  mesh = shd.make_mesh((1, 1, 1), jax.devices()[:1])
  state, shardings = create_train_state(lambda r: init_params(CFG, r), make_optimizer(OPT, total_steps=10),
                                        mesh, jax.random.PRNGKey(0))
  return mesh, jax.tree.map(np.asarray, state), shardings


@pytest.fixture(scope="module")
def params(single):
  return _perturb(single[1].params)


def _pm_batch(seed, lengths):
  """Right-padded [batch, K, SEQ] for lengths [batch, K]: random tokens, EOC at length - 1, padding."""
  rng = np.random.default_rng(seed)
  b, k = lengths.shape
  tokens = rng.integers(4, CFG.vocab_size, (b, k, SEQ)).astype(np.int32)
  positions = np.arange(SEQ)
  attention = positions < lengths[..., None]
  tokens = np.where(attention, tokens, PAD_ID).astype(np.int32)
  tokens[positions == lengths[..., None] - 1] = EOC_ID
  loss_mask = (rng.random((b, k, SEQ)) < 0.7).astype(np.float32)
  return {"tokens": tokens, "attention_mask": attention, "eoc_index": (lengths - 1).astype(np.int32),
          "loss_mask": loss_mask}


# 12 sequences of two lengths (one compile each for the per-sequence reference), arranged as
# 4 comparisons of K = 3 or 6 of K = 2: the batched forward pass has one shape throughout.
LENGTHS = np.array([16, 9, 16, 9, 9, 16, 16, 16, 9, 9, 16, 9])


def _log_softmax64(logits):
  x = np.asarray(logits, np.float64)
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


# ---------------------------------------------------------------------------------------------
# 1. The loss and metrics on given scores.


def test_preference_loss_matches_numpy_including_large_margins():
  rng = np.random.default_rng(0)
  a = np.concatenate([rng.normal(0, 3, 200), [25.0, -25.0, 50.0, 0.0, 0.0, 1e-3]]).astype(np.float32)
  b = np.concatenate([rng.normal(0, 3, 200), [-25.0, 25.0, 0.0, 50.0, -50.0, 0.0]]).astype(np.float32)
  got = np.asarray(pm.preference_loss(a, b))
  want = _softplus64(-(a.astype(np.float64) - b.astype(np.float64)))  # -log sigmoid(a - b)
  assert np.all(np.isfinite(got))
  # Relative accuracy even where the loss is ~exp(-50): a naive log(sigmoid()) would give 0 or inf.
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=0)
  np.testing.assert_allclose(got[[-5, -3]], 50.0, rtol=1e-6)  # wrong by 50: loss 50, not inf
  assert np.all((0 < got[[-6, -4, -2]]) & (got[[-6, -4, -2]] < 1e-21))  # right by 50: ~exp(-50), not 0
  # The gradient stays finite and saturates at -1 when the order is badly wrong.
  g = np.asarray(jax.grad(lambda x, y: pm.preference_loss(x, y).sum())(a, b))
  assert np.all(np.isfinite(g))
  np.testing.assert_allclose(g[[-5, -3]], -1.0, rtol=1e-6)


@pytest.mark.parametrize("k", [2, 3, 4])
def test_ranked_loss_is_mean_over_ordered_pairs(k):
  scores = np.random.default_rng(k).normal(0, 2, (6, k)).astype(np.float32)
  got = np.asarray(pm.ranked_loss(scores))
  assert got.shape == (6,)
  if k == 2:
    np.testing.assert_allclose(got, np.asarray(pm.preference_loss(scores[:, 0], scores[:, 1])), rtol=1e-6)
  s = scores.astype(np.float64)
  for row in range(6):
    pairs = [_softplus64(s[row, j] - s[row, i]) for i in range(k) for j in range(i + 1, k)]
    assert len(pairs) == k * (k - 1) // 2
    np.testing.assert_allclose(got[row], np.mean(pairs), rtol=1e-5)


def test_pm_metrics_matches_numpy():
  rng = np.random.default_rng(1)
  scores = rng.normal(0, 1, (10, 3)).astype(np.float32)
  scores[2, 1] = scores[2, 0]  # ties count as wrong
  scores[5, 1] = scores[5, 0]
  scores[7, 2] = scores[7, 0] + 10  # only r0 vs r1 counts for accuracy
  m = {k: float(v) for k, v in pm.pm_metrics(scores).items()}
  s = scores.astype(np.float64)
  assert m["accuracy"] == pytest.approx(np.mean(s[:, 0] > s[:, 1]), abs=1e-7)
  assert m["margin"] == pytest.approx(np.mean(s[:, 0] - s[:, 1]), rel=1e-5)
  assert m["mean_score"] == pytest.approx(s.mean(), rel=1e-5, abs=1e-7)
  assert np.sum(s[:, 0] > s[:, 1]) < np.sum(s[:, 0] >= s[:, 1])  # the ties do matter


# ---------------------------------------------------------------------------------------------
# 2-3. Scores on a real model: read at the end-of-context token.

_apply = jax.jit(lambda p, t: MODEL.apply({"params": p}, t))  # one unpadded sequence, no mask


def test_pm_loss_matches_per_sequence_model_and_numpy(params):
  flat = _pm_batch(0, LENGTHS[:, None])  # [12, 1, SEQ]
  ref_scores, logp = np.zeros(12), []
  for i, n in enumerate(LENGTHS):
    out = _apply(params, flat["tokens"][i, 0, :n][None])
    ref_scores[i] = float(out.scalar[0, n - 1])
    logp.append(_log_softmax64(out.logits[0]))
  assert np.std(ref_scores) > 0.1  # a live head: the comparisons below are not all zeros

  # K = 3: the scores, and the ranked loss over all pairs.
  batch = {key: v.reshape((4, 3) + v.shape[2:]) for key, v in flat.items()}
  r = ref_scores.reshape(4, 3)
  np.testing.assert_allclose(np.asarray(pm.pm_scores(params, MODEL, batch)[0]), r, rtol=1e-5, atol=1e-5)
  ranked = np.mean([_softplus64(r[:, j] - r[:, i]) for i, j in itertools.combinations(range(3), 2)])
  loss, metrics = pm.pm_loss(params, MODEL, batch)
  np.testing.assert_allclose(float(loss), ranked, rtol=1e-5)
  assert "lm_loss" not in metrics

  # K = 2 with the LM term: loss = pairwise loss + lm_weight * masked NLL of k = 0 only.
  pair = {key: v.reshape((6, 2) + v.shape[2:]) for key, v in flat.items()}
  r = ref_scores.reshape(6, 2)
  nll, count = 0.0, 0.0
  for b in range(6):
    i = 2 * b  # the preferred sequence of comparison b
    for t in range(1, LENGTHS[i]):  # logits at t - 1 predict token t
      w = pair["loss_mask"][b, 0, t]
      nll, count = nll - w * logp[i][t - 1, pair["tokens"][b, 0, t]], count + w
  loss, metrics = pm.pm_loss(params, MODEL, pair, lm_weight=0.25)
  pref = np.mean(_softplus64(r[:, 1] - r[:, 0]))  # -log sigmoid(r_chosen - r_rejected)
  np.testing.assert_allclose(float(metrics["preference_loss"]), pref, rtol=1e-5)
  np.testing.assert_allclose(float(metrics["lm_loss"]), nll / count, rtol=1e-5)
  np.testing.assert_allclose(float(loss), pref + 0.25 * nll / count, rtol=1e-5)
  np.testing.assert_allclose(float(metrics["loss"]), float(loss), rtol=1e-7)
  assert float(metrics["accuracy"]) == pytest.approx(np.mean(r[:, 0] > r[:, 1]))
  assert 0 < float(metrics["accuracy"]) < 1
  # The rejected sequences' NLL differs: an LM term over all K would not match the one above.
  nll_all = -sum(pair["loss_mask"][b, 1, t] * logp[2 * b + 1][t - 1, pair["tokens"][b, 1, t]]
                 for b in range(6) for t in range(1, LENGTHS[2 * b + 1]))
  count_all = sum(pair["loss_mask"][b, 1, 1:LENGTHS[2 * b + 1]].sum() for b in range(6))
  assert abs((nll + nll_all) / (count + count_all) - nll / count) > 1e-3


def test_score_reads_end_of_context_only(params):
  lengths = np.array([[16, 9, 5], [12, 16, 3], [7, 14, 16], [10, 11, 16]])
  batch = _pm_batch(1, lengths)
  base = np.asarray(pm.pm_scores(params, MODEL, batch)[0])

  # Tokens after the EOC (padding, attention_mask False) change nothing.
  junk = np.random.default_rng(2).integers(4, CFG.vocab_size, batch["tokens"].shape).astype(np.int32)
  padded = dict(batch, tokens=np.where(batch["attention_mask"], batch["tokens"], junk))
  assert np.any(padded["tokens"] != batch["tokens"])
  np.testing.assert_allclose(np.asarray(pm.pm_scores(params, MODEL, padded)[0]), base, rtol=1e-6, atol=1e-6)

  # A token before the EOC changes that sequence's score, and only that one.
  changed = dict(batch, tokens=batch["tokens"].copy())
  changed["tokens"][1, 0, 2] = 4 + (changed["tokens"][1, 0, 2] - 4 + 17) % (CFG.vocab_size - 4)
  moved = np.asarray(pm.pm_scores(params, MODEL, changed)[0])
  assert abs(moved[1, 0] - base[1, 0]) > 1e-3
  np.testing.assert_allclose(np.delete(moved, 3), np.delete(base, 3), rtol=1e-6, atol=1e-6)

  # A left-padded copy (EOC at the last position) scores as the right-padded original.
  left = {key: v.copy() for key, v in batch.items()}
  for b in range(4):
    for k in range(3):
      n = lengths[b, k]
      left["tokens"][b, k] = np.concatenate([np.full(SEQ - n, PAD_ID), batch["tokens"][b, k, :n]])
      left["attention_mask"][b, k] = np.arange(SEQ) >= SEQ - n
      left["eoc_index"][b, k] = SEQ - 1
  np.testing.assert_allclose(np.asarray(pm.pm_scores(params, MODEL, left)[0]), base, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# 4. Sharded against single-device.


def _sharded_batch(seed):
  lengths = np.random.default_rng(seed).integers(6, SEQ + 1, (8, 2))
  return _pm_batch(seed, lengths)


def _step_metrics(params, batch):
  """[loss, preference_loss, lm_loss, margin, mean_score, grad_norm, per-comparison margins...]
  as the train step computes them (grad_norm: of the unclipped gradient)."""
  loss_fn = lambda p: pm.pm_loss(p, MODEL, batch, lm_weight=0.5)
  (_, m), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
  scores = pm.pm_scores(params, MODEL, batch)[0]
  head = [m[k] for k in STEP_METRICS[:-1]] + [optax.tree.norm(grads)]
  return jnp.concatenate([jnp.stack(head), scores[:, 0] - scores[:, 1]])


STEP_METRICS = ("loss", "preference_loss", "lm_loss", "margin", "mean_score", "grad_norm")


def test_sharded_pm_step_equals_single_device(single):
  runs = []
  for shape, devices in [((1, 1, 1), jax.devices()[:1]), ((2, 2, 2), jax.devices()[:8])]:
    tx = make_optimizer(OPT, total_steps=10)
    if shape == (1, 1, 1):
      mesh, host_state, shardings = single  # the same create_train_state call, made once
      state = jax.device_put(host_state, shardings)
    else:
      mesh = shd.make_mesh(shape, devices)
      state, shardings = create_train_state(lambda r: init_params(CFG, r), tx, mesh, jax.random.PRNGKey(0))
    initial = jax.tree.map(np.asarray, state.params)
    # Zero scalar head = zero gradient everywhere but the head: start from a live model instead.
    state = state.replace(params=jax.device_put(_perturb(initial), shardings.params))
    perturbed = jax.tree.map(np.asarray, state.params)
    grad_fn = jax.jit(jax.grad(lambda p, b: pm.pm_loss(p, MODEL, b, lm_weight=0.5)[0]),
                      in_shardings=(shardings.params, shd.batch_sharding(mesh)))
    grads = shd.under_mesh(grad_fn, mesh)(state.params, shd.shard_batch(_sharded_batch(0), mesh))
    grads = jax.tree.map(np.asarray, grads)
    step = pm_steps.jit_pm_train_step(MODEL, tx, mesh, shardings, lm_weight=0.5)
    metrics, after = [], []
    for i in range(2):
      state, m = step(state, shd.shard_batch(_sharded_batch(i), mesh))
      metrics.append({k: float(v) for k, v in m.items()})
      after.append(jax.tree.map(np.asarray, state.params))
    runs.append((initial, perturbed, grads, metrics, after, state))

  (init_1, start_1, grads_1, metrics_1, after_1, _), (init_8, start_8, grads_8, metrics_8, after_8, state_8) = runs
  jax.tree.map(np.testing.assert_array_equal, init_1, init_8)  # same init on any mesh
  jax.tree.map(np.testing.assert_array_equal, start_1, start_8)
  # Step 1 runs on identical params: only float32 reassociation separates the two.
  for key in STEP_METRICS + ("accuracy",):
    np.testing.assert_allclose(metrics_8[0][key], metrics_1[0][key], rtol=1e-5, atol=1e-6, err_msg=key)
  assert 0 < metrics_1[0]["accuracy"] < 1  # a batch with both right and wrong comparisons
  # Summation order differs across shards: entries that nearly cancel (e.g. an embedding row
  # summed over many tokens) get an absolute floor relative to their leaf; a missing reduction
  # would be off by the size of the gradient itself.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4 * np.abs(a).max()),
               grads_1, grads_8)
  assert float(np.abs(grads_1["layer_0"]["attn"]["wq"]).max()) > 1e-4  # gradients reach the trunk
  assert int(state_8.step) == 2 and int(state_8.data_position) == 16

  moved = [np.abs(b - a) for a, b in zip(jax.tree.leaves(start_1), jax.tree.leaves(after_1[1]))]
  assert max(float(d.max()) for d in moved) > 1e-3
  assert float(np.median(np.concatenate([d.ravel() for d in moved]))) > 1e-4  # most weights moved
  largest = max(float(np.abs(x).max()) for x in jax.tree.leaves(start_1))
  for t in (0, 1):
    numerics.assert_adam_runs_close(after_1[t], after_8[t], [OPT.learning_rate] * (t + 1), OPT.b1, OPT.b2,
                                    weight_decay=OPT.weight_decay, max_abs_param=largest)
  # Step 2 runs on parameters that one Adam update may have set apart: its metrics may differ by
  # what that parameter difference explains to first order (and no more).
  batch = _sharded_batch(1)
  values, tol = numerics.first_order_tolerance(lambda p: _step_metrics(p, batch), after_1[0], after_8[0])
  np.testing.assert_allclose(values[:len(STEP_METRICS)], [metrics_1[1][k] for k in STEP_METRICS],
                             rtol=1e-5, atol=1e-6)  # the reference computation is the step's own
  for i, key in enumerate(STEP_METRICS):
    assert abs(metrics_8[1][key] - metrics_1[1][key]) <= tol[i], (key, metrics_8[1][key], metrics_1[1][key], tol[i])
  # Accuracy counts signs of margins: only comparisons whose margin is within its tolerance of 0
  # may change side.
  margins, margin_tol = values[len(STEP_METRICS):], tol[len(STEP_METRICS):]
  undecided = int(np.sum(np.abs(margins) <= margin_tol))
  assert abs(metrics_8[1]["accuracy"] - metrics_1[1]["accuracy"]) * len(margins) <= undecided + 1e-9


# ---------------------------------------------------------------------------------------------
# 5. A known rule, learned from scratch.


def _marker_batch(rng, batch):
  """Chosen contains MARKER once, rejected never; random lengths, EOC last, right padding."""
  ids = np.array([t for t in range(4, CFG.vocab_size) if t != MARKER])
  tokens = np.full((batch, 2, SEQ), PAD_ID, np.int32)
  attention = np.zeros((batch, 2, SEQ), bool)
  eoc = np.zeros((batch, 2), np.int32)
  for b in range(batch):
    for k in range(2):
      n = int(rng.integers(8, SEQ + 1))  # including the EOC
      seq = rng.choice(ids, n - 1)
      if k == 0:
        seq[rng.integers(0, n - 1)] = MARKER
      tokens[b, k, :n] = np.append(seq, EOC_ID)
      attention[b, k, :n], eoc[b, k] = True, n - 1
  return {"tokens": tokens, "attention_mask": attention, "eoc_index": eoc,
          "loss_mask": np.zeros((batch, 2, SEQ), np.float32)}


def test_learns_marker_rule_from_scratch(single):
  steps = 60  # it is at 100% held-out accuracy by step ~20 (lr 3e-3): 3x margin
  opt = ml_collections.ConfigDict(dict(OPT, learning_rate=3e-3, warmup_steps=10, weight_decay=0.0))
  tx = make_optimizer(opt, total_steps=steps)
  mesh, host_state, shardings = single
  # The fresh state from `single` (zero moments, step 0) fits this optimizer too: same structure.
  opt_structure = jax.tree.structure(jax.eval_shape(tx.init, host_state.params))
  assert opt_structure == jax.tree.structure(host_state.opt_state)
  # A random (not zero) head, so the initial accuracy is chance rather than all ties.
  head = np.random.default_rng(3).normal(0, CFG.d_model ** -0.5, CFG.d_model).astype(np.float32)
  state = jax.device_put(host_state.replace(params=dict(host_state.params, scalar_head=head)), shardings)
  score = pm_steps.jit_pm_score_step(MODEL, mesh, shardings.params)
  held_out = _marker_batch(np.random.default_rng(1000), 256)

  def accuracy():
    s = np.asarray(score(state.params, shd.shard_batch(held_out, mesh)))
    return float(np.mean(s[:, 0] > s[:, 1]))

  initial = accuracy()
  assert 0.3 < initial < 0.7
  step = pm_steps.jit_pm_train_step(MODEL, tx, mesh, shardings)
  rng = np.random.default_rng(0)
  for _ in range(steps):
    state, metrics = step(state, shd.shard_batch(_marker_batch(rng, 32), mesh))
  assert accuracy() > 0.95
  assert float(metrics["loss"]) < 0.1


# ---------------------------------------------------------------------------------------------
# 6. PM batches from real dialogues.


@pytest.fixture(scope="module")
def records():
  return read_comparisons(os.path.join(catalog.SAMPLE_DIR, "harmless-base", "test.jsonl.gz"))[0]


@pytest.fixture(scope="module")
def tok(records, tmp_path_factory):
  return train_tokenizer([r["chosen"] for r in records[:100]], 512, str(tmp_path_factory.mktemp("tok")))


def test_encode_for_pm_ends_with_eos_then_eoc(tok, records):
  for r in records[:5]:
    ex = encode_for_pm(tok, r["chosen"])
    assert ex.tokens[-2:] == [EOS_ID, EOC_ID]
    assert ex.loss_mask[-1] is False  # the EOC is never an LM target
    plain = encode_dialogue(tok, r["chosen"], assistant_only=True)
    assert ex.tokens[:-1] == plain.tokens and ex.loss_mask[:-1] == plain.loss_mask
    assert EOC_ID not in ex.tokens[:-1]
    chosen, rejected = encode_comparison(tok, r)
    assert chosen.tokens == encode_for_pm(tok, r["prompt"] + r["chosen_response"]).tokens
    assert rejected.tokens[-2:] == [EOS_ID, EOC_ID]


def _batch_of(batcher, index):
  return batcher._collate([batcher.examples[index]])


def test_pm_batcher_collates_groups(tok, records):
  groups = [encode_comparison(tok, r) for r in records[:10]]
  seq_len = 96  # some dialogues are longer: truncated from the left, EOS and EOC kept
  batcher = PMBatcher(groups, batch_size=4, seq_len=seq_len, seed=0, pad_id=PAD_ID)
  assert any(len(ex.tokens) > seq_len for g in groups for ex in g)
  assert any(len(ex.tokens) < seq_len for g in groups for ex in g)
  batch = batcher.batch_at(3)
  assert batch["tokens"].shape == batch["attention_mask"].shape == batch["loss_mask"].shape == (4, 2, seq_len)
  assert batch["eoc_index"].shape == (4, 2) and batch["eoc_index"].dtype == np.int32
  for i, p in enumerate(range(3, 7)):
    group = groups[batcher._index(p)]
    for k in range(2):
      ex = group[k]
      n = min(len(ex.tokens), seq_len)
      assert batch["eoc_index"][i, k] == n - 1
      np.testing.assert_array_equal(batch["tokens"][i, k, :n], ex.tokens[-n:])
      assert batch["tokens"][i, k, n - 1] == EOC_ID and batch["tokens"][i, k, n - 2] == EOS_ID
      np.testing.assert_array_equal(batch["attention_mask"][i, k], np.arange(seq_len) < n)
      np.testing.assert_array_equal(batch["loss_mask"][i, k, :n], ex.loss_mask[-n:])
      assert np.all(batch["tokens"][i, k, n:] == PAD_ID) and not batch["loss_mask"][i, k, n:].any()
  # Both responses of a comparison differ: chosen (k = 0) and rejected really are different rows.
  assert np.any(batch["tokens"][:, 0] != batch["tokens"][:, 1])
  # Evaluation order: every group once, the last batch topped up with real (later dropped) groups.
  ordered = batcher.in_order()
  assert [int(b["num_valid"]) for b in ordered] == [4, 4, 2]
  np.testing.assert_array_equal(ordered[2]["tokens"][2:], np.stack([ordered[0]["tokens"][0]] * 2))
  np.testing.assert_array_equal(ordered[1]["eoc_index"][0], _batch_of(batcher, 4)["eoc_index"][0])
  with pytest.raises(ValueError, match="must all have 2 responses"):
    batcher._collate([batcher.examples[0], batcher.examples[1][:1]])


def test_split_in_halves_is_disjoint_covering_and_seeded():
  records = [{"id": i} for i in range(41)]
  first, second = split_in_halves(records, seed=0)
  ids1, ids2 = [r["id"] for r in first], [r["id"] for r in second]
  assert len(ids1) == 20 and len(ids2) == 21
  assert not set(ids1) & set(ids2) and sorted(ids1 + ids2) == list(range(41))
  assert ids1 == sorted(ids1) and ids2 == sorted(ids2)  # file order kept within each half
  assert split_in_halves(records, seed=0) == (first, second)
  other = split_in_halves(records, seed=1)
  assert [r["id"] for r in other[0]] != ids1
  assert ids1 != list(range(20))  # really shuffled, not the first half of the file
