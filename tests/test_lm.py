"""LM objectives against float64 numpy: masked next-token NLL and context-distillation KL."""
import flax.linen as nn
import jax
import numpy as np
import pytest

from rlhf_jax.model.config import PRESETS
from rlhf_jax.model.transformer import Transformer, init_params
from rlhf_jax.objectives import lm
from rlhf_jax.trainers import lm_steps

CFG = PRESETS["tiny"]
MODEL = Transformer(CFG)


@pytest.fixture(scope="module")
def params():
  p = nn.meta.unbox(init_params(CFG, jax.random.PRNGKey(0)))
  noise = np.random.default_rng(0)
  return jax.tree.map(lambda x: x + 0.05 * noise.standard_normal(x.shape).astype(np.float32), p)


def _batch(seed, batch=3, seq=12, pad_tail=(0, 4, 7)):
  rng = np.random.default_rng(seed)
  attention = np.ones((batch, seq), bool)
  for row, n in enumerate(pad_tail):
    attention[row, seq - n:] = False
  return {"tokens": rng.integers(4, CFG.vocab_size, (batch, seq)).astype(np.int32),
          "loss_mask": (rng.random((batch, seq)) < 0.6).astype(np.float32), "attention_mask": attention}


def _log_softmax64(logits):
  x = np.asarray(logits, np.float64)
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_lm_loss_matches_numpy(params):
  batch = _batch(0)
  logits = np.asarray(MODEL.apply({"params": params}, batch["tokens"], attention_mask=batch["attention_mask"]).logits)
  logp = _log_softmax64(logits)
  total, count = 0.0, 0.0
  for b in range(3):
    for t in range(1, 12):  # logits at t-1 predict token t
      w = batch["loss_mask"][b, t] * batch["attention_mask"][b, t]
      total += -w * logp[b, t - 1, batch["tokens"][b, t]]
      count += w
  loss, metrics = lm.lm_loss(params, MODEL, batch)
  np.testing.assert_allclose(float(loss), total / count, rtol=1e-5)
  assert float(metrics["num_tokens"]) == count


def test_lm_loss_ignores_padding(params):
  batch = _batch(1)
  changed = dict(batch, tokens=np.where(batch["attention_mask"], batch["tokens"], 5))
  np.testing.assert_allclose(float(lm.lm_loss(params, MODEL, batch)[0]),
                             float(lm.lm_loss(params, MODEL, changed)[0]), rtol=1e-6)


def test_eval_step_sums_match_loss(params):
  batch = _batch(2)
  out = lm_steps.lm_eval_step(params, batch, model=MODEL)
  loss = float(lm.lm_loss(params, MODEL, batch)[0])
  np.testing.assert_allclose(float(out["nll_sum"]) / float(out["num_tokens"]), loss, rtol=1e-5)


def _distill_batch(batch, prefix):
  tiled = np.broadcast_to(prefix, (batch["tokens"].shape[0], len(prefix)))
  return dict(batch, teacher_tokens=np.concatenate([tiled, batch["tokens"]], 1).astype(np.int32),
              teacher_attention_mask=np.concatenate([np.ones_like(tiled, bool), batch["attention_mask"]], 1))


def test_distill_loss_matches_numpy_kl(params):
  batch = _distill_batch(_batch(3), np.array([7, 8, 9, 10, 11], np.int32))
  student_params = jax.tree.map(lambda x: x * 0.9, params)
  t_logits = MODEL.apply({"params": params}, batch["teacher_tokens"],
                         attention_mask=batch["teacher_attention_mask"]).logits
  s_logits = MODEL.apply({"params": student_params}, batch["tokens"], attention_mask=batch["attention_mask"]).logits
  t_logp, s_logp = _log_softmax64(t_logits)[:, 5:], _log_softmax64(s_logits)
  total, count = 0.0, 0.0
  for b in range(3):
    for t in range(1, 12):
      w = batch["loss_mask"][b, t] * batch["attention_mask"][b, t]
      kl = np.sum(np.exp(t_logp[b, t - 1]) * (t_logp[b, t - 1] - s_logp[b, t - 1]))
      total, count = total + w * kl, count + w
  loss, _ = lm.distill_loss(student_params, params, MODEL, batch)
  np.testing.assert_allclose(float(loss), total / count, rtol=1e-4)
  assert total / count > 1e-3  # the two models really differ


def test_distill_loss_is_zero_for_identical_models_without_prompt(params):
  batch = _distill_batch(_batch(4), np.zeros((0,), np.int32))
  loss, _ = lm.distill_loss(params, params, MODEL, batch)
  assert abs(float(loss)) < 1e-6
  # ... and the gradient reaches the student only: the teacher is frozen.
  g_teacher = jax.grad(lambda t: lm.distill_loss(params, t, MODEL, batch)[0])(params)
  assert max(float(np.abs(np.asarray(x)).max()) for x in jax.tree.leaves(g_teacher)) == 0.0
