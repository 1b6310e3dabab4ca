"""Non-finite losses and gradients: the jitted steps skip such an update (train_state.keep_if_finite),
the loop stops past train.max_nonfinite_skips with the step and metric named, and no checkpoint
ever holds a non-finite value. In every trainer and in the sweep."""
import dataclasses
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import micro_sweep_config, small_run_config

from rlhf_jax.errors import NonFiniteError
from rlhf_jax.model.config import PRESETS
from rlhf_jax.model.transformer import Transformer, init_params
from rlhf_jax.trainers import train_lm
from rlhf_jax.trainers.ppo_steps import Models, PPOHyper, ppo_update
from rlhf_jax.training import loop
from rlhf_jax.training.metrics import read_metrics
from rlhf_jax.training.optimizer import make_optimizer
from rlhf_jax.training.train_state import TrainState, create_train_state, is_finite, keep_if_finite

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from test_faults import ENV  # noqa: E402  (1-device subprocesses sharing the compilation cache)

from configs import lm as lm_config  # noqa: E402

# Adam moves every weight by about the learning rate in its first steps: 1e30 makes the next
# forward pass overflow float32 (max 3.4e38) on any processor, so the failure is deterministic.
HUGE_LR = 1e30


def _state(w, count):
  return TrainState(step=jnp.int32(3), params={"w": jnp.asarray(w, jnp.float32)},
                    opt_state=(jnp.int32(count), {"w": jnp.asarray(w, jnp.float32) * 2}),
                    rng=jnp.zeros(2, jnp.uint32), data_position=jnp.int32(24))


@pytest.mark.parametrize("loss, grad_norm, new_w, skipped", [
    (1.0, 2.0, [5.0, 6.0], False),
    (np.nan, 2.0, [5.0, 6.0], True),
    (1.0, np.inf, [5.0, 6.0], True),
])
def test_keep_if_finite_keeps_the_old_params_and_moves_on(loss, grad_norm, new_w, skipped):
  old = _state([1.0, 2.0], count=7)
  new = _state(new_w, count=8).replace(step=jnp.int32(4), data_position=jnp.int32(32))
  state, flag = jax.jit(keep_if_finite)(new, old, jnp.float32(loss), jnp.float32(grad_norm))
  expected = old if skipped else new
  jax.tree.map(np.testing.assert_array_equal, (state.params, state.opt_state),
               (expected.params, expected.opt_state))
  assert int(state.step) == 4 and int(state.data_position) == 32  # the bad batch is consumed
  assert float(flag) == float(skipped)


def test_is_finite_looks_at_every_float_leaf():
  state = _state([1.0, 2.0], count=7)
  assert bool(is_finite(state))
  assert not bool(is_finite(state.replace(opt_state=(jnp.int32(7), {"w": jnp.asarray([0.0, np.inf])}))))
  assert not bool(is_finite(state.replace(params={"w": jnp.asarray([np.nan, 1.0])})))


def test_guard_counts_skips_and_names_the_step_and_metric():
  guard = loop.NonFiniteGuard(max_skips=1)
  ok = {"nonfinite": jnp.float32(0), "loss": jnp.float32(0.5), "grad_norm": jnp.float32(1.0)}
  bad = {"nonfinite": jnp.float32(1), "loss": jnp.float32(np.nan), "grad_norm": jnp.float32(1.0)}
  guard.add(1, ok)
  guard.add(2, bad)
  guard.check(last_checkpoint=None, directory="d")
  assert guard.skipped == 1
  guard.add(3, ok)
  guard.add(4, dict(bad, loss=jnp.float32(0.5), grad_norm=jnp.float32(np.inf)))
  with pytest.raises(NonFiniteError, match=r"step 4: non-finite grad_norm=inf.*step 2 in d"):
    guard.check(last_checkpoint=2, directory="d")


def _saved_states(run_dir):
  ckpt_dir = os.path.join(run_dir, "checkpoints")
  manager = ocp.CheckpointManager(ckpt_dir, item_names=("state", "meta"))
  states = {s: manager.restore(s, args=ocp.args.Composite(state=ocp.args.PyTreeRestore())).state
            for s in manager.all_steps()}
  manager.close()
  return states


def _all_finite(tree):
  return all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(tree)
             if np.issubdtype(np.asarray(x).dtype, np.floating))


def test_pm_command_with_exploding_learning_rate_stops_and_keeps_good_checkpoints(tmp_path):
  """The reported case: learning rate huge, no clipping, keep-last-3 checkpoints."""
  out = subprocess.run(
      [sys.executable, "-m", "rlhf_jax", "train_pm", "--config=configs/pm.py:tiny", f"--workdir={tmp_path}",
       f"--config.optimizer.learning_rate={HUGE_LR}", "--config.optimizer.grad_clip=0",
       "--config.optimizer.warmup_steps=0", "--config.train.steps=12", "--config.train.checkpoint_every=1",
       "--config.train.batch_size=8", "--config.train.seq_len=64", "--config.data.max_examples=200",
       "--config.train.log_every=5", "--config.mesh.shape=(1,1,1)", "--config.progress_bar=False"],
      cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
  assert out.returncode == 2, out.stderr[-3000:]
  assert "done" not in out.stdout
  errors = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
  assert len(errors) == 1 and "Traceback" not in out.stderr, out.stderr[-3000:]
  assert "non-finite" in errors[0] and ("loss=nan" in errors[0] or "grad_norm=" in errors[0])
  bad_step = int(errors[0].split("step ")[1].split(":")[0])
  states = _saved_states(str(tmp_path))
  assert states and max(states) == bad_step - 1  # every good step saved, the bad one not
  assert all(_all_finite(s["params"]) and _all_finite(s["opt_state"]) for s in states.values())


def test_lm_skips_up_to_max_nonfinite_skips_and_counts_them(tmp_path):
  config = small_run_config(lm_config.get_config("tiny"), 6, max_examples=120)
  config.optimizer.learning_rate, config.optimizer.warmup_steps = HUGE_LR, 0
  config.train.max_nonfinite_skips = 10
  config.train.checkpoint_every = 3
  train_lm.train(config, str(tmp_path))
  rows = [r for r in read_metrics(str(tmp_path)) if "loss" in r]
  skipped_steps = [r["step"] for r in rows if r["nonfinite"] == 1.0]
  assert skipped_steps and rows[-1]["nonfinite_skips"] == len(skipped_steps)  # the first update is finite
  # logged as null, not dropped:
  assert all(r["loss"] is None or r["grad_norm"] is None for r in rows if r["nonfinite"] == 1.0)
  states = _saved_states(str(tmp_path))
  assert sorted(states) == [3, 6] and all(_all_finite(s) for s in states.values())

  # Fewer skips allowed than happen: the run stops, naming the step, and keeps what it had.
  config.train.max_nonfinite_skips = 1
  config.train.steps = 12
  with pytest.raises(NonFiniteError, match=r"step 7: non-finite (loss|grad_norm)=nan"):
    train_lm.train(config, str(tmp_path))  # resumes at 6 with the 5 skips counted so far
  assert sorted(_saved_states(str(tmp_path))) == [3, 6]


def test_a_state_that_overflowed_with_finite_losses_is_never_checkpointed(tmp_path):
  """The last line of defence: the pre-save check of the whole state."""
  config = small_run_config(lm_config.get_config("tiny"), 4, max_examples=120)
  config.train.checkpoint_every = 2
  s = loop.setup(config, str(tmp_path))
  state = loop.initial_state(config, s)

  def step(state, position):
    overflowed = jax.tree.map(lambda p: p * jnp.inf if state.step >= 2 else p, state.params)
    return (state.replace(step=state.step + 1, params=overflowed),
            {"loss": jnp.float32(1.0), "grad_norm": jnp.float32(1.0), "nonfinite": jnp.float32(0.0)})

  with pytest.raises(NonFiniteError, match=r"step 4: the state holds non-finite values.*step 2"):
    loop.run_steps(config, str(tmp_path), s, state, step=step, evaluate=lambda p: {}, desc="test")
  assert sorted(_saved_states(str(tmp_path))) == [2]


def test_ppo_update_skips_non_finite_minibatches():
  cfg = dataclasses.replace(PRESETS["tiny"], vocab_size=32, num_layers=1)
  model = Transformer(cfg)
  hyper = PPOHyper(gamma=1.0, lam=0.95, clip_eps=0.2, value_clip_eps=0.2, vf_coef=0.5, entropy_coef=0.0,
                   epochs=2, num_minibatches=2, whiten_advantages=False)
  opt = ml_collections.ConfigDict(dict(learning_rate=1e-2, warmup_steps=0, final_lr_fraction=1.0, b1=0.9,
                                       b2=0.95, eps=1e-8, weight_decay=0.0, grad_clip=1.0))
  tx = make_optimizer(opt, 10)
  mesh = jax.make_mesh((1, 1, 1), ("data", "fsdp", "tensor"), devices=jax.devices()[:1],
                       axis_types=(jax.sharding.AxisType.Auto,) * 3)
  state, _ = create_train_state(lambda r: {"policy": init_params(cfg, r)}, tx, mesh, jax.random.PRNGKey(0))
  b, p, n = 8, 4, 6
  rng = np.random.default_rng(0)
  rollout = {"tokens": rng.integers(3, 32, (b, p + n)).astype(np.int32), "mask": np.ones((b, p + n), bool),
             "response_mask": np.ones((b, n), bool), "old_logp": np.full((b, n), -3.0, np.float32),
             "old_values": np.zeros((b, n), np.float32), "returns": np.ones((b, n), np.float32),
             "advantages": rng.normal(size=(b, n)).astype(np.float32)}
  rollout["response"] = rollout["tokens"][:, p:]
  update = jax.jit(lambda s, r: ppo_update(s, r, jax.random.PRNGKey(1), models=Models(model, model, model),
                                           hyper=hyper, tx=tx))
  before = jax.tree.map(np.asarray, state.params)
  good, metrics = update(state, rollout)
  assert float(metrics["nonfinite"]) == 0
  assert not all(np.array_equal(a, np.asarray(c)) for a, c in zip(jax.tree.leaves(before),
                                                                  jax.tree.leaves(good.params)))
  poisoned = dict(rollout, advantages=np.where(np.arange(b)[:, None] == 0, np.nan, rollout["advantages"]))
  bad, metrics = update(state, poisoned)  # the row with NaN advantages is in one minibatch per epoch
  assert float(metrics["nonfinite"]) == hyper.epochs  # each epoch's other minibatch still updates
  assert _all_finite(bad.params) and _all_finite(bad.opt_state)
  everything = dict(rollout, advantages=np.full((b, n), np.nan, np.float32))
  frozen, metrics = update(state, everything)
  assert float(metrics["nonfinite"]) == hyper.epochs * hyper.num_minibatches
  jax.tree.map(np.testing.assert_array_equal, before, jax.tree.map(np.asarray, frozen.params))


def test_sweep_stops_at_the_stage_that_diverged(tmp_path):
  from rlhf_jax.experiments.sweep import run_sweep
  config = micro_sweep_config()
  config.lm = dict(config.lm, optimizer={"learning_rate": HUGE_LR, "warmup_steps": 0})
  with pytest.raises(NonFiniteError, match="non-finite"):
    run_sweep(config, str(tmp_path))
  assert os.path.exists(tmp_path / "tokenizer" / "stage_done.json")
  assert not os.path.exists(tmp_path / "lm_xs" / "stage_done.json")  # never marked done
