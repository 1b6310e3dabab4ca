"""Gradient accumulation: the accumulated loss and gradient are the whole batch's, and a sharded
step with micro-batches matches one without."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.model.config import ModelConfig
from rlhf_jax.model.transformer import Transformer, init_params
from rlhf_jax.objectives import lm, pm
from rlhf_jax.trainers import lm_steps
from rlhf_jax.training.grad_accumulation import accumulated_value_and_grad, micro_batches

CFG = ModelConfig(vocab_size=64, d_model=32, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=16, mlp_dim=64)


@pytest.fixture(scope="module")
def params():
  return nn.meta.unbox(init_params(CFG, jax.random.PRNGKey(0)))


def _lm_batch(b=8, t=16, seed=0):
  rng = np.random.default_rng(seed)
  lengths = rng.integers(3, t + 1, b)  # ragged: micro-batches hold different token counts
  mask = np.arange(t)[None, :] < lengths[:, None]
  return {"tokens": jnp.asarray(rng.integers(4, 64, (b, t)), jnp.int32), "attention_mask": jnp.asarray(mask),
          "loss_mask": jnp.asarray(mask & (rng.random((b, t)) < 0.7))}


def test_micro_batches_deal_rows_round_robin():
  x = jnp.arange(12).reshape(6, 2)
  m = micro_batches({"x": x}, 3)["x"]
  assert m.shape == (3, 2, 2) and m[1].tolist() == [[2, 3], [8, 9]]
  with pytest.raises(ValueError, match="does not split into 4"):
    micro_batches({"x": x}, 4)


def _max_rel(a, b):
  return max(float(jnp.abs(x - y).max() / (jnp.abs(y).max() + 1e-12)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_token_weighted_lm_accumulation_equals_the_full_batch(params):
  batch = _lm_batch()
  loss_fn = lambda p, b: lm.lm_loss(p, Transformer(CFG), b)
  tokens = lambda b: lm.target_weights(b["loss_mask"], b["attention_mask"]).sum()
  (full, fm), g_full = accumulated_value_and_grad(loss_fn, params, batch, 1)
  (acc, am), g_acc = accumulated_value_and_grad(loss_fn, params, batch, 4, tokens)
  # Same sums regrouped: float32 reassociation only (a few ulps of O(1) quantities).
  assert float(acc) == pytest.approx(float(full), rel=1e-5)
  assert _max_rel(g_acc, g_full) < 1e-4
  # An unweighted mean of micro-batch means is not the full batch's loss here (ragged tokens).
  (plain, _), _ = accumulated_value_and_grad(loss_fn, params, batch, 4)
  assert abs(float(plain) - float(full)) > 1e-3


def test_pm_accumulation_equals_the_full_batch(params):
  rng = np.random.default_rng(1)
  b, t = 8, 12
  batch = {"tokens": jnp.asarray(rng.integers(4, 64, (b, 2, t)), jnp.int32),
           "attention_mask": jnp.ones((b, 2, t), bool), "eoc_index": jnp.full((b, 2), t - 1, jnp.int32)}
  loss_fn = lambda p, mb: pm.pm_loss(p, Transformer(CFG), mb)
  (full, fm), g_full = accumulated_value_and_grad(loss_fn, params, batch, 1)
  (acc, am), g_acc = accumulated_value_and_grad(loss_fn, params, batch, 2)
  assert float(acc) == pytest.approx(float(full), rel=1e-5)
  assert float(am["accuracy"]) == pytest.approx(float(fm["accuracy"]), abs=1e-6)
  assert _max_rel(g_acc, g_full) < 1e-4


def test_sharded_lm_step_with_micro_batches_matches_one_without(params):
  import optax

  from rlhf_jax.training import sharding as shd
  from rlhf_jax.training.train_state import create_train_state
  mesh = shd.make_mesh((2, 4, 1))  # data x FSDP: each micro-batch stays split over both
  tx = optax.sgd(0.1)  # linear in the gradient: the updates differ only as the gradients do
  model = Transformer(CFG)
  states = []
  for k in (1, 4):
    state, shardings = create_train_state(lambda r: init_params(CFG, r), tx, mesh, jax.random.PRNGKey(0))
    step = lm_steps.jit_lm_train_step(model, tx, mesh, shardings, grad_accum=k)
    state, metrics = step(state, shd.shard_batch(_lm_batch(b=16), mesh))
    states.append((state, metrics))
  (s1, m1), (s4, m4) = states
  assert float(m4["loss"]) == pytest.approx(float(m1["loss"]), rel=1e-5)
  assert float(m4["num_tokens"]) == float(m1["num_tokens"])
  assert float(m4["perplexity"]) == pytest.approx(float(np.exp(m1["loss"])), rel=1e-5)
  assert _max_rel(s4.params, s1.params) < 1e-5
