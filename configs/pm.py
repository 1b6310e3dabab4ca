"""Preference-model training: `--config=configs/pm.py:PRESET`.

Typical: --config.init_from=runs/lm_tiny (start from a trained LM, reuse its tokenizer);
--config.pmp.path=FILE --config.pmp.steps=N for preference-model pretraining first;
--config.data.half=a|b for the train-PM / test-PM split.
"""
import ml_collections

from configs import lm
from configs.lora import lora_config


def get_config(preset: str = "tiny") -> ml_collections.ConfigDict:
  c = lm.get_config(preset)
  del c["objective"], c["distill"]
  c.lm_weight = 0.0  # weight of an LM loss on the preferred sequence, mixed into the PM loss
  c.optimizer.learning_rate = 1e-3 if preset == "tiny" else 1e-5
  c.train.steps = 120 if preset == "tiny" else 5000  # tiny: about one epoch of the offline data
  c.train.batch_size = 16 if preset == "tiny" else 64  # comparisons (2 sequences each)
  c.train.seq_len = 128 if preset == "tiny" else 1024
  c.train.eval_every = 40 if preset == "tiny" else 500
  c.data.half = ""  # "a" or "b": train on one seeded half of the training comparisons
  c.data.half_seed = 0
  c.pmp = ml_collections.ConfigDict({"path": "", "steps": 100})
  c.calibration_bins = 10
  c.lora = lora_config()  # adapters over init_from instead of training every weight
  c.workdir = f"runs/pm_{preset}"
  return c
