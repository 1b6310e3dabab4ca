"""The AOT scale plan: per-device state bytes of an FSDP-sharded 810m PM step, and the HLO parser."""
import json
import os
import subprocess
import sys

import numpy as np

ROOT = os.path.join(os.path.dirname(__file__), os.pardir)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import scale_plan  # noqa: E402


def test_810m_pm_step_on_8_devices_holds_an_eighth_of_the_state_per_device():
  proc = subprocess.run([sys.executable, "benchmarks/scale_plan.py", "--devices=8", "--mesh=1,8,1", "--presets=810m",
                         "--steps=pm", "--batch=8", "--seq=128"], cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  (row,) = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
  from rlhf_jax.model.config import get_preset, param_counts
  total = param_counts(get_preset("810m"))["total"]
  assert row["params"] == total
  # float32 params + AdamW's two float32 moments = 12 bytes per parameter, split 8 ways (FSDP);
  # the rest of the arguments (step, RNG, the batch's shard) is a few kB.
  expected = 12 * total / 8
  assert expected <= row["argument_bytes"] <= expected * 1.001
  assert row["alias_bytes"] >= 0.99 * expected  # the donated state is updated in place
  assert row["collectives"]["all-gather"]["count"] > 0  # FSDP gathers each layer's weights
  assert row["peak_bytes"] >= row["argument_bytes"] and "H100" in row["fits"]


def test_collective_parser_counts_ops_and_result_bytes():
  hlo = "\n".join([
      "  %ag = bf16[8,1024]{1,0} all-gather(bf16[1,1024]{1,0} %p), replica_groups={}, dimensions={0}",
      "  %ars = (f32[256]{0}, f32[256]{0}) all-reduce-start(f32[256]{0} %g), to_apply=%add",
      "  %ard = f32[256]{0} all-reduce-done((f32[256]{0}, f32[256]{0}) %ars)",
      "  %rs = f32[32]{0} reduce-scatter(f32[256]{0} %g), dimensions={0}",
      "  %add = f32[4]{0} add(f32[4]{0} %a, f32[4]{0} %b)",
  ])
  stats = scale_plan.collective_stats(hlo)
  assert stats["all-gather"] == {"count": 1, "bytes": 8 * 1024 * 2}
  assert stats["all-reduce"] == {"count": 1, "bytes": 256 * 4}  # the async pair counted once
  assert stats["reduce-scatter"] == {"count": 1, "bytes": 32 * 4}
  assert stats["all-to-all"]["count"] == 0


def test_ppo_update_holds_policy_and_value_state_split_over_devices():
  proc = subprocess.run([sys.executable, "benchmarks/scale_plan.py", "--devices=8", "--mesh=1,8,1", "--presets=13m",
                         "--steps=ppo_update", "--batch=16", "--seq=64"], cwd=ROOT, capture_output=True, text=True,
                        timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  (row,) = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
  # policy + value, each float32 params + two AdamW moments, over 8 devices; plus the rollout's
  # shard (16 x 64 positions of a few arrays: well under 1 MB).
  expected = 2 * 12 * row["params"] / 8
  assert expected <= row["argument_bytes"] <= expected + 2 ** 20


def test_lora_ppo_update_holds_one_bf16_base_and_two_sets_of_adapters():
  proc = subprocess.run([sys.executable, "benchmarks/scale_plan.py", "--devices=8", "--mesh=1,8,1", "--presets=13m",
                         "--steps=ppo_update", "--batch=16", "--seq=64", "--lora_rank=8"], cwd=ROOT,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  (row,) = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
  import flax.linen as nn
  import jax
  from flax import traverse_util

  from rlhf_jax.model import lora
  from rlhf_jax.model.config import get_preset
  from rlhf_jax.model.transformer import init_params
  cfg = get_preset("13m")
  shapes = traverse_util.flatten_dict(nn.meta.unbox(jax.eval_shape(
      lambda r: init_params(cfg, r, lora=lora.LoraSpec(8, 16.0)), jax.random.PRNGKey(0))))
  size = lambda keys: sum(int(np.prod(shapes[k].shape)) for k in keys)
  adapters = size(k for k in shapes if k[-1].endswith(("_lora_a", "_lora_b")))
  heads = size(k for k in shapes if k[-1] in lora.HEADS)
  assert adapters == cfg.num_layers * 8 * sum(  # rank 8 x (fan-in + fan-out) of each of the 7 targets
      d_in + d_out for d_in, d_out in [(cfg.d_model, cfg.num_heads * cfg.head_dim)] * 2
      + [(cfg.d_model, cfg.num_kv_heads * cfg.head_dim)] * 2 + [(cfg.d_model, cfg.mlp_dim)] * 3)
  # One bf16 base (2 bytes a weight) for policy and value, and for each its adapters and heads in
  # float32 with two AdamW moments (12 bytes), over 8 devices; plus the rollout's shard (< 1 MB).
  expected = (2 * row["params"] + 2 * 12 * (adapters + heads)) / 8
  assert expected <= row["argument_bytes"] <= expected + 2 ** 20
