"""The GPU suite's Markdown table from its results.jsonl (benchmarks/gpu_suite.sh)."""
from __future__ import annotations

import json
import sys


def table(rows: list[dict]) -> str:
  out = []
  train = [r for r in rows if "mfu" in r]
  if train:
    out += ["| device | preset | dtype | batch x seq | tokens/s | model TFLOP/s | peak TFLOP/s | MFU |", "|---" * 8 + "|"]
    out += [f"| {r['device']} | {r['preset']} | {r['dtype']} | {r['batch']} x {r['seq']} | {r['tokens_per_s']:.4g} | "
            f"{r['model_tflops_per_s']:.3g} | {r['peak_tflops_per_s']:.3g} | {r['mfu']:.1%} |" for r in train]
    out.append("")
  decode = [r for r in rows if "decode_roofline_fraction" in r]
  if decode:
    out += ["| device | preset | decode batch | tokens/s | roofline tokens/s | of roofline | bandwidth GB/s |",
            "|---" * 7 + "|"]
    out += [f"| {r['device']} | {r['preset']} | {r['decode_batch']} | {r['decode_tokens_per_s']:.4g} | "
            f"{r['decode_roofline_tokens_per_s']:.4g} | {r['decode_roofline_fraction']:.1%} | "
            f"{r['bandwidth_gb_per_s']:.4g} |" for r in decode]
    out.append("")
  ppo = [r for r in rows if "iteration_s" in r or "generate_s" in r]
  if ppo:
    keys = [k for k in ("generate_s", "score_s", "update_s", "iteration_s") if k in ppo[0]]
    out += ["| device | preset | rollout batch | " + " | ".join(keys) + " |", "|---" * (3 + len(keys)) + "|"]
    out += [f"| {r['device']} | {r['preset']} | {r['rollout_batch']} | " + " | ".join(f"{r[k]:.4g}" for k in keys) + " |"
            for r in ppo]
  return "\n".join(out) + "\n"


if __name__ == "__main__":
  with open(sys.argv[1], encoding="utf-8") as f:
    print(table([json.loads(line) for line in f if line.strip()]), end="")
