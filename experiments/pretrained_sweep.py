"""Over-optimisation across one real family (Gao et al. 2023's setup from pretrained checkpoints):
Qwen2.5 0.5B, 1.5B, 3B and 7B as the policies and proxy PMs, the gold PM from Qwen2.5-14B. For a
TPU pod slice or a GPU cluster (launch/); needs the full hh-rlhf download (online once).

  python -m rlhf_jax sweep --config=experiments/pretrained_sweep.py        # full fine-tuning
  python -m rlhf_jax sweep --config=experiments/pretrained_sweep.py:lora   # LoRA on PMs and policies

The checkpoints are HuggingFace directories under $RLHF_JAX_CHECKPOINTS (default `checkpoints/`),
named as on the hub, e.g.
  huggingface-cli download Qwen/Qwen2.5-0.5B --local-dir checkpoints/Qwen2.5-0.5B
All five share one tokenizer, which the sweep checks before it starts. They are the base models,
not -Instruct: the initial policy comes from SFT on the helpful dialogues as in the paper, in the
paper's Human/Assistant format. SFT is full fine-tuning in both variants (train_lm has no LoRA).

Memory per device, from `python benchmarks/scale_plan.py --plan --pretrained` (benchmarks/RESULTS.md;
bf16 compute, fp32 params and AdamW moments, remat "full", 64 sequences of 1024 tokens): on 32
chips (fsdp) full fine-tuning peaks at 22.6 GiB for the 7B PPO update and 19.0 GiB for the 14B gold
PM step (2 micro-batches), so TPU v4 / H100 or larger; LoRA rank 64 over a bf16 base brings the 7B
PPO update to 9.6 GiB (its arguments from 5.3 to 0.56 GiB) and the 14B PM step to 9.6 GiB, which
fits 16 GiB chips (TPU v5e; the 14B only scores, it never samples). On 64 chips as (1, 16, 4) every step of both fits 16 GiB.
Override anything on the command line, e.g. --config.rl.train.steps=500.
"""
import os

import ml_collections

FAMILY = (("500m", "Qwen2.5-0.5B"), ("1500m", "Qwen2.5-1.5B"), ("3b", "Qwen2.5-3B"), ("7b", "Qwen2.5-7B"))
GOLD = "Qwen2.5-14B"


def get_config(tuning: str = "full") -> ml_collections.ConfigDict:
  if tuning not in ("full", "lora"):
    raise ValueError(f"experiments/pretrained_sweep.py:{tuning}: expected full or lora")
  root = os.environ.get("RLHF_JAX_CHECKPOINTS", "checkpoints")
  # bf16 compute over fp32 params (the import's float32 weights), scanned layers, full remat: what
  # the scale plan fitted; the runtime fields are all a checkpoint size may add to its config.
  runtime = {"dtype": "bfloat16", "scan_layers": True, "remat": "full"}
  c = ml_collections.ConfigDict()
  c.setup = "gold_pm"
  c.base_preset = "13m"  # the non-tiny defaults of the stage configs
  c.sizes = tuple(name for name, _ in FAMILY)
  c.models = ml_collections.ConfigDict({
      **{name: {"from": f"hf:{os.path.join(root, hub)}", **runtime} for name, hub in FAMILY},
      "gold": {"from": f"hf:{os.path.join(root, GOLD)}", **runtime}})
  c.data = ml_collections.ConfigDict({"subset": "helpful-base", "split": "train", "eval_split": "test"})
  fsdp = {"shape": (1, -1, 1)}  # the small members' 2 KV heads do not divide a tensor axis
  c.lm = ml_collections.ConfigDict({"mesh": fsdp})  # imported: nothing to pretrain
  c.sft = ml_collections.ConfigDict({"objective": "sft", "mesh": fsdp, "train": {"steps": 2000}})
  c.pm = ml_collections.ConfigDict({"mesh": fsdp, "train": {"grad_accum": 2}})
  c.gold_pm = ml_collections.ConfigDict({"mesh": fsdp, "train": {"steps": 10000, "grad_accum": 2}})
  c.labels = ml_collections.ConfigDict({"num_pairs": 50000, "policy": "", "max_new_tokens": 0,
                                        "temperature": 1.0, "batch_size": 512, "seed": 0})
  c.rl = ml_collections.ConfigDict({"mesh": fsdp, "train": {"eval_every": 25}})
  c.bon = ml_collections.ConfigDict({"ns": (1, 2, 4, 8, 16, 32, 64, 128, 256), "num_prompts": 256, "seed": 0})
  c.methods = ("ppo", "rloo", "grpo", "dpo")
  c.rloo = ml_collections.ConfigDict({"ppo": {"samples_per_prompt": 4}})
  c.grpo = ml_collections.ConfigDict({"ppo": {"samples_per_prompt": 4}})
  c.dpo = ml_collections.ConfigDict({"betas": (0.03, 0.1, 0.3), "loss": "dpo",
                                     "train": {"steps": 1500, "eval_every": 100, "checkpoint_every": 500}})
  c.evals = ml_collections.ConfigDict({"suites": "bias_cloze,winogender,bbq,ood,mc,elo", "full": True,
                                       "batch_size": 64, "elo": {"bon_ns": (4, 16, 64)}})
  if tuning == "lora":
    # Rank 64 on every projection, the frozen base in bf16 (one copy for policy, reference, value
    # model and PM); a higher learning rate, as adapters need. PPO and best-of-N only: DPO, RLOO
    # and GRPO train dense.
    lora = {"enabled": True, "rank": 64, "alpha": 128.0, "base_dtype": "bfloat16"}
    for section in (c.pm, c.gold_pm, c.rl):
      section.lora = dict(lora)
    c.rl.optimizer = {"learning_rate": 1e-5}
    c.methods = ("ppo",)
    c.dpo.betas = ()
  c.progress_bar = True
  c.workdir = f"runs/pretrained_sweep_{tuning}"
  return c
