"""Language-model training: `--config=configs/lm.py:PRESET` with PRESET a model size (tiny, 13m, ...).

Override anything from the command line, e.g. `--config.model.num_layers=3 --config.train.steps=50`.
"""
import ml_collections

from rlhf_jax.model_config import get_preset


def get_config(preset: str = "tiny") -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.preset = preset
  c.model = ml_collections.ConfigDict(get_preset(preset).to_dict())
  # (data, fsdp, tensor); -1 takes every remaining device, so the default is pure FSDP.
  c.mesh = ml_collections.ConfigDict({"shape": (1, -1, 1)})
  c.optimizer = ml_collections.ConfigDict({
      "learning_rate": 3e-3 if preset == "tiny" else 3e-4,
      "warmup_steps": 10 if preset == "tiny" else 500,
      "final_lr_fraction": 0.1,
      "b1": 0.9, "b2": 0.95, "eps": 1e-8,
      "weight_decay": 0.1,
      "grad_clip": 1.0,
  })
  c.train = ml_collections.ConfigDict({
      "steps": 100 if preset == "tiny" else 20000,
      "batch_size": 16 if preset == "tiny" else 256,
      "seq_len": 64 if preset == "tiny" else 1024,
      "seed": 0,
      "log_every": 10,
      "eval_every": 50,
      "eval_batches": 4,
      "checkpoint_every": 50,
      "keep_checkpoints": 3,
      "async_checkpointing": True,
  })
  # Until the hh-rlhf pipeline lands, the LM trains on a synthetic language of arithmetic
  # sequences (learnable, deterministic per example index, so runs resume exactly).
  c.data = ml_collections.ConfigDict({"source": "synthetic"})
  c.workdir = f"runs/lm_{preset}"
  c.progress_bar = True
  return c
