"""LoRA (rlhf_jax.model.lora): exact at step 0, steps equal to the dense gradient restricted to the
low-rank update (float64 numpy chain rule), adapters-only checkpoints that resume bitwise, one base
shared in memory, PPO's reference as the base with the adapters off, merged export, and bad input."""
import dataclasses
import json
import os
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import traverse_util
from test_train_ppo import _raw_state, _StopAfter

from rlhf_jax.errors import ConfigError
from rlhf_jax.hf import runs as hf_runs
from rlhf_jax.hf.export_model import export_run
from rlhf_jax.model import lora
from rlhf_jax.model.config import get_preset
from rlhf_jax.model.transformer import Transformer, init_params
from rlhf_jax.objectives.pm import pm_loss
from rlhf_jax.trainers import train_pm, train_ppo
from rlhf_jax.trainers.pm_steps import pm_train_step
from rlhf_jax.trainers.ppo_steps import Models, PPOHyper, ppo_loss, ppo_update
from rlhf_jax.training import adapters, loop
from rlhf_jax.training import sharding as shd
from rlhf_jax.training.metrics import read_metrics
from rlhf_jax.training.saved_runs import FrozenModel, load_policy
from rlhf_jax.training.train_state import TrainState

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from conftest import small_run_config  # noqa: E402

from configs import pm as pm_config  # noqa: E402
from configs import ppo as ppo_config  # noqa: E402

CFG = dataclasses.replace(get_preset("tiny"), vocab_size=64, d_model=32, num_heads=2, num_kv_heads=1, head_dim=16,
                          mlp_dim=48, num_layers=2)
ALL = tuple(lora.TARGETS)


def _params(cfg, spec, seed=0, b_scale=0.0):
  """(base, trainables) with A as initialised and B ~ N(0, b_scale^2) (0: as initialised)."""
  base, trainable = lora.split(nn.meta.unbox(init_params(cfg, jax.random.PRNGKey(seed), lora=spec)))
  if b_scale:
    keys = iter(jax.random.split(jax.random.PRNGKey(seed + 1), 64))
    trainable = jax.tree_util.tree_map_with_path(
        lambda p, v: b_scale * jax.random.normal(next(keys), v.shape) if str(p[-1].key).endswith("_lora_b") else v,
        trainable)
  return base, trainable


@pytest.mark.parametrize("scan", [False, True])
def test_full_rank_lora_with_zero_b_is_the_base_exactly(scan):
  cfg = dataclasses.replace(CFG, scan_layers=scan)
  spec = lora.LoraSpec(rank=min(lora.weight_widths(cfg).values()), alpha=4.0)  # rank = the narrowest width
  base, trainable = _params(cfg, spec)
  tokens = jax.random.randint(jax.random.PRNGKey(3), (2, 12), 0, cfg.vocab_size)
  dense = Transformer(cfg).apply({"params": base}, tokens)
  with_adapters = Transformer(cfg, spec).apply({"params": lora.join(base, trainable)}, tokens)
  switched_off = Transformer(cfg, spec).apply({"params": base}, tokens)
  for out in (with_adapters, switched_off):
    np.testing.assert_array_equal(out.logits, dense.logits)
    np.testing.assert_array_equal(out.scalar, dense.scalar)
  # Non-zero B changes the model, and merging gives a dense model equal to it (float32 rounding
  # of W + s A B against the two-matmul path: relative 1e-5 of logits of order 1).
  _, trained = _params(cfg, spec, b_scale=0.05)
  moved = Transformer(cfg, spec).apply({"params": lora.join(base, trained)}, tokens).logits
  assert float(jnp.abs(moved - dense.logits).max()) > 1e-2
  merged = Transformer(cfg).apply({"params": lora.merge(lora.join(base, trained), spec)}, tokens).logits
  np.testing.assert_allclose(merged, moved, atol=1e-4 * float(jnp.abs(moved).max()))


def _dense_grad(loss, base, trainable, spec):
  """float64 numpy gradients of the LoRA trainables from the dense gradient G at W + s A B:
  dA = s G B^T, dB = s A^T G (contracting the weight's output / input axes), heads as they are."""
  merged = lora.merge(lora.join(base, trainable), spec)
  g = traverse_util.flatten_dict(jax.grad(loss)(merged))
  flat = {k: np.asarray(v, np.float64) for k, v in traverse_util.flatten_dict(trainable).items()}
  out = {}
  for key, value in flat.items():
    name = key[-1]
    if name in lora.HEADS:
      out[key] = np.asarray(g[key], np.float64)
      continue
    weight = name.removesuffix(lora.SUFFIX_A).removesuffix(lora.SUFFIX_B)
    a = flat[key[:-1] + (weight + lora.SUFFIX_A,)]
    b = flat[key[:-1] + (weight + lora.SUFFIX_B,)]
    grad_w = np.asarray(g[key[:-1] + (weight,)], np.float64)
    n_in = lora.TARGETS[weight]
    n_out = grad_w.ndim - n_in
    if name.endswith(lora.SUFFIX_A):  # sum over output axes of G * B
      out[key] = spec.scale * np.tensordot(grad_w, b, axes=(list(range(n_in, grad_w.ndim)), list(range(1, 1 + n_out))))
    else:
      out[key] = spec.scale * np.tensordot(a, grad_w, axes=(list(range(n_in)), list(range(n_in))))
  return traverse_util.unflatten_dict(out)


def _sgd_step_matches(step_fn, loss, base, trainable, spec, lr=0.5):
  tx = optax.sgd(lr)
  state = TrainState(step=jnp.zeros((), jnp.int32), params=trainable, opt_state=tx.init(trainable),
                     rng=jax.random.PRNGKey(0), data_position=jnp.zeros((), jnp.int32))
  new = step_fn(state, tx)
  expected = _dense_grad(loss, base, trainable, spec)
  for (path, before), after, grad in zip(traverse_util.flatten_dict(trainable).items(),
                                         jax.tree.leaves(new.params), jax.tree.leaves(expected)):
    delta, want = np.asarray(after, np.float64) - np.asarray(before, np.float64), -lr * grad
    # Two float32 evaluations of one gradient (different contraction orders): agreement to 1e-4 of
    # the largest entry, far below the size of the update itself.
    scale = max(np.abs(want).max(), 1e-12)
    np.testing.assert_allclose(delta, want, atol=2e-4 * scale + 1e-7, err_msg=str(path))
  assert any(np.abs(g).max() > 0 for g in jax.tree.leaves(expected))


def test_lora_pm_step_is_the_dense_gradient_restricted_to_the_low_rank_update():
  spec = lora.LoraSpec(rank=4, alpha=8.0, targets=("wq", "wo", "w_up", "w_down"))
  base, trainable = _params(CFG, spec, b_scale=0.05)
  rng = np.random.default_rng(0)
  batch = {"tokens": jnp.asarray(rng.integers(1, CFG.vocab_size, (3, 2, 10)), jnp.int32),
           "attention_mask": jnp.ones((3, 2, 10), bool), "eoc_index": jnp.full((3, 2), 9, jnp.int32),
           "loss_mask": jnp.ones((3, 2, 10), bool)}
  model = Transformer(CFG, spec)
  step = lambda state, tx: pm_train_step(state, batch, base, model=model, tx=tx)[0]
  loss = lambda dense: pm_loss(dense, Transformer(CFG), batch)[0]
  _sgd_step_matches(step, loss, base, trainable, spec)


def test_lora_ppo_step_is_the_dense_gradient_restricted_to_the_low_rank_update():
  spec = lora.LoraSpec(rank=3, alpha=6.0, targets=ALL)
  base, trainable = _params(CFG, spec, b_scale=0.05)
  rng = np.random.default_rng(1)
  b, p, n = 4, 6, 5
  tokens = jnp.asarray(rng.integers(1, CFG.vocab_size, (b, p + n)), jnp.int32)
  response_mask = jnp.asarray(np.arange(n)[None, :] < np.array([[5], [3], [4], [2]]))
  rollout = {"tokens": tokens, "mask": jnp.concatenate([jnp.ones((b, p), bool), response_mask], axis=1),
             "response": tokens[:, p:], "response_mask": response_mask,
             "old_logp": jnp.asarray(rng.normal(-4.0, 0.3, (b, n)), jnp.float32) * response_mask,
             "old_values": jnp.asarray(rng.normal(0, 0.1, (b, n)), jnp.float32) * response_mask,
             "advantages": jnp.asarray(rng.normal(0, 1, (b, n)), jnp.float32) * response_mask,
             "returns": jnp.asarray(rng.normal(0, 1, (b, n)), jnp.float32) * response_mask}
  hyper = PPOHyper(gamma=1.0, lam=0.95, clip_eps=0.2, value_clip_eps=0.2, vf_coef=0.5, entropy_coef=0.01,
                   epochs=1, num_minibatches=1, whiten_advantages=False)
  models = Models(Transformer(CFG, spec), Transformer(CFG, spec), Transformer(CFG))
  def step_fn(state, tx):  # ppo_update's params are {"policy": ...}: wrapped around it
    wrapped = state.replace(params={"policy": state.params}, opt_state=tx.init({"policy": state.params}))
    new, _ = ppo_update(wrapped, rollout, jax.random.PRNGKey(0), {"policy": base}, models=models, hyper=hyper,
                        tx=tx)
    return new.replace(params=new.params["policy"])
  dense_models = Models(Transformer(CFG), Transformer(CFG), Transformer(CFG))
  loss = lambda dense: ppo_loss({"policy": dense}, rollout, models=dense_models, hyper=hyper, prompt_len=p)[0]
  _sgd_step_matches(step_fn, loss, base, trainable, spec)


# --- runs: a LoRA PM and a LoRA PPO on the session's tiny LM ------------------------------------


def _lora_pm_config(lm, steps):
  c = small_run_config(pm_config.get_config("tiny"), steps, max_examples=120)
  c.init_from = lm
  c.train.checkpoint_every, c.train.async_checkpointing = 100, False
  c.lora.enabled, c.lora.rank, c.lora.dropout = True, 4, 0.1
  return c


@pytest.fixture(scope="module")
def lora_pm(tiny_runs, tmp_path_factory):
  lm, _ = tiny_runs
  d = tmp_path_factory.mktemp("lora") / "pm"
  train_pm.train(_lora_pm_config(lm, 3), str(d))
  return d


def test_lora_pm_checkpoints_hold_only_adapters_and_resume_bitwise(tiny_runs, lora_pm, tmp_path, monkeypatch):
  lm, _ = tiny_runs
  state = _raw_state(lora_pm, 3)
  names = {k[-1] for k in traverse_util.flatten_dict(state["params"])}
  assert names and all(n.endswith(("_lora_a", "_lora_b")) or n in lora.HEADS for n in names)
  assert any(np.abs(v).max() > 0 for k, v in traverse_util.flatten_dict(state["params"]).items()
             if k[-1].endswith("_lora_b"))  # the adapters trained (B starts at zero)
  record = json.loads((lora_pm / adapters.BASE_FILE).read_text())
  assert record["run_dir"] == os.path.abspath(lm) and record["sha256"] == adapters.checkpoint_hash(lm, record["step"])
  # Preempted after step 2, then resumed: the same adapters, optimizer state and RNG, bit for bit
  # (the LoRA dropout draws from the state's RNG).
  resumed = tmp_path / "resumed"
  _StopAfter.polls = 0
  monkeypatch.setattr(loop, "Preemption", lambda: _StopAfter(2))
  train_pm.train(_lora_pm_config(lm, 3), str(resumed))
  monkeypatch.undo()
  train_pm.train(_lora_pm_config(lm, 3), str(resumed))
  jax.tree.map(np.testing.assert_array_equal, state, _raw_state(resumed, 3))


def test_lora_ppo_reference_is_the_base_and_the_runs_share_it(tiny_runs, lora_pm, tmp_path):
  lm, _ = tiny_runs
  c = ppo_config.get_config("tiny")
  c.policy_from, c.pm_dir = lm, str(lora_pm)
  c.eval.num_prompts, c.ppo.rollout_batch, c.data.max_examples = 8, 8, 120
  c.sampling.max_new_tokens, c.sampling.prompt_len = 6, 16
  c.train.steps, c.train.eval_every, c.train.checkpoint_every, c.train.async_checkpointing = 2, 2, 2, False
  c.mesh.shape, c.progress_bar = (1, -1, 1), False
  c.lora.enabled, c.lora.rank = True, 4
  run = tmp_path / "ppo"
  train_ppo.train(c, str(run))
  start, first, last = read_metrics(str(run))
  # The fresh policy is the base exactly (B = 0): zero KL to the reference, by both estimators.
  assert start["eval_kl"] == 0.0 and first["kl"] == 0.0 and last["eval_kl"] != 0.0
  state = _raw_state(run, 2)
  assert set(state["params"]) == {"policy", "value"}
  pm = FrozenModel(str(lora_pm), shd.make_mesh((1, -1, 1)))
  # The value model started from the PM's adapters: its A matrices (random at initialisation, O(0.1))
  # are the PM's moved by the run's Adam steps, where fresh ones would be uncorrelated. With b2=0.95,
  # (1-b1)/sqrt(1-b2) < 1, so each step moves a weight by at most the learning rate (Kingma & Ba 2.1).
  adam_steps = c.train.steps * c.ppo.epochs * c.ppo.num_minibatches
  assert c.optimizer.weight_decay == 0.0 and (1 - c.optimizer.b1) < (1 - c.optimizer.b2) ** 0.5
  pm_a = traverse_util.flatten_dict(jax.tree.map(np.asarray, pm.adapters))
  value_a = traverse_util.flatten_dict(state["params"]["value"])
  assert set(pm_a) == set(value_a)
  for key in (k for k in pm_a if k[-1].endswith("_lora_a")):
    np.testing.assert_allclose(value_a[key], pm_a[key], atol=adam_steps * c.optimizer.learning_rate * 1.01)
  # One base in memory for the policy, its reference and the PM.
  mesh, bases = shd.make_mesh((1, -1, 1)), {}
  policy0 = FrozenModel(lm, mesh, bases=bases)
  pm_shared = FrozenModel(str(lora_pm), mesh, bases=bases)
  assert all(a is b for a, b in zip(jax.tree.leaves(policy0.params), jax.tree.leaves(pm_shared.base)))
  # The policy reads back as its adapters over policy_from, and exports merged.
  policy = load_policy(str(run), mesh)
  assert policy.model.lora is not None and lora.has_adapters(policy.params)
  tokens = jnp.asarray(np.random.default_rng(0).integers(4, 200, (2, 10)), jnp.int32)
  lora_logits = policy.model.apply({"params": policy.params}, tokens).logits
  merged = lora.merge(policy.params, policy.model.lora)
  dense_logits = Transformer(policy.model.cfg).apply({"params": merged}, tokens).logits
  np.testing.assert_allclose(dense_logits, lora_logits, atol=1e-4 * float(jnp.abs(lora_logits).max()))
  # hf_export writes those merged weights (the adapters are not dropped): imported back, the same logits.
  out = export_run(str(run), str(tmp_path / "exported"))
  again = load_policy(hf_runs.import_model(out, str(tmp_path / "again")), mesh)
  assert again.model.lora is None
  back_logits = again.model.apply({"params": again.params}, tokens).logits
  np.testing.assert_allclose(back_logits, lora_logits, atol=1e-4 * float(jnp.abs(lora_logits).max()))
  base_logits = Transformer(policy.model.cfg).apply({"params": policy0.params}, tokens).logits
  assert float(jnp.abs(base_logits - lora_logits).max()) > 1e-3 * float(jnp.abs(lora_logits).max())


def test_bad_lora_settings_and_a_changed_base_are_one_line_errors(tiny_runs, lora_pm, tmp_path):
  section = lambda **kw: ml_collections.ConfigDict({"enabled": True, "rank": 4, "alpha": 8.0, "dropout": 0.0,
                                                   "targets": "wq,wv", **kw})
  with pytest.raises(ConfigError, match=r"\['attn_q'\] names no module"):
    lora.spec_from_config(section(targets="wq,attn_q"), CFG)
  with pytest.raises(ConfigError, match="lora.rank=0"):
    lora.spec_from_config(section(rank=0), CFG)
  with pytest.raises(ConfigError, match="above the width of .*'wv': 16"):
    lora.spec_from_config(section(rank=20), CFG)  # wv: 32 -> 1 x 16
  assert lora.spec_from_config(section(enabled=False), CFG) is None
  # A base edited after the adapters were trained on it is refused, naming both.
  import shutil
  lm, _ = tiny_runs
  base_copy, pm_copy = tmp_path / "lm", tmp_path / "pm"
  shutil.copytree(lm, base_copy)
  shutil.copytree(lora_pm, pm_copy)
  record = json.loads((pm_copy / adapters.BASE_FILE).read_text())
  (pm_copy / adapters.BASE_FILE).write_text(json.dumps({**record, "run_dir": str(base_copy)}))
  adapters.base_of(str(pm_copy))  # an intact copy is accepted
  victim = next(p for p in sorted((base_copy / "checkpoints").rglob("*")) if p.is_file() and p.stat().st_size > 1000)
  victim.write_bytes(victim.read_bytes()[:-1] + b"\x00")
  with pytest.raises(ConfigError, match="has changed since the adapters were trained"):
    FrozenModel(str(pm_copy), shd.make_mesh((1, -1, 1)))


def test_a_dense_ppo_value_model_starts_from_a_lora_pm_merged(tiny_runs, lora_pm):
  lm, _ = tiny_runs
  mesh = shd.make_mesh((1, -1, 1))
  pm = FrozenModel(str(lora_pm), mesh)
  trainables = train_ppo._dense(ppo_config.get_config("tiny"), mesh, FrozenModel(lm, mesh), pm, shared=False)
  # The dense value model's params have the dense model's tree (no adapter leaves: jit's shardings
  # are the dense model's), and equal the PM with its adapters merged in.
  fresh = nn.meta.unbox(jax.eval_shape(trainables.init, jax.random.PRNGKey(0)))
  assert jax.tree.structure(fresh) == jax.tree.structure(trainables.start)
  jax.tree.map(np.testing.assert_array_equal, trainables.start["value"], lora.merge(pm.params, pm.spec))
  assert not lora.has_adapters(trainables.start["value"])
