"""Preference-model evaluation: scores of held-out comparisons, accuracy with a 95% interval,
calibration table, reliability plot and ECE; saves the PM's score normalisation.

evaluate_pm writes into the PM's run directory: eval_pm.json, calibration.md, reliability.png
and score_normalisation.json (read by PPO to normalise rewards).
"""
from __future__ import annotations

import json
from typing import Optional

import numpy as np

from rlhf_jax import hosts, storage
from rlhf_jax.data.inputs import eval_comparisons
from rlhf_jax.data.pm_data import PMBatcher
from rlhf_jax.objectives import calibration as cal
from rlhf_jax.trainers import pm_steps
from rlhf_jax.training import sharding as shd
from rlhf_jax.training.saved_runs import FrozenModel, load_run_config


def score_all(score_step, params, batcher: PMBatcher, mesh) -> np.ndarray:
  """Scores [num_examples, K] of every example, in order."""
  out = []
  for batch in batcher.in_order():
    n = int(batch.pop("num_valid"))
    out.append(np.asarray(score_step(params, shd.shard_batch(batch, mesh)))[:n])
  return np.concatenate(out)


def evaluate_pm(pm_dir: str, data_path: Optional[str] = None) -> dict:
  """Scores the PM's eval comparisons (or those of data_path) and writes the reports."""
  config = load_run_config(pm_dir)
  if data_path:  # the whole file is the evaluation set
    config.data.path, config.data.eval_split, config.data.eval_fraction = data_path, "", 1.0
    config.data.max_examples = 0
  _, batcher = eval_comparisons(config, pm_dir)
  mesh = shd.make_mesh(config.mesh.shape)
  pm = FrozenModel(pm_dir, mesh)  # a LoRA PM: its adapters over its base
  scores = score_all(pm_steps.jit_pm_score_step(pm.model, mesh, pm.shardings.params), pm.params, batcher, mesh)

  acc = cal.accuracy_interval(scores[:, 0], scores[:, 1])
  calib = cal.calibration(scores[:, 0], scores[:, 1], num_bins=config.get("calibration_bins", 10))
  norm = cal.score_normalisation(scores)
  report = {"accuracy": acc._asdict(), "ece": calib.ece, "normalisation": norm,
            "mean_margin": float(np.mean(scores[:, 0] - scores[:, 1]))}
  if hosts.is_lead():
    cal.save_normalisation(norm, pm_dir)
    cal.reliability_plot(calib, storage.join(pm_dir, "reliability.png"),
                         title=f"PM calibration (N={acc.n} comparisons)")
    storage.write_atomic(storage.join(pm_dir, "calibration.md"), cal.calibration_table(calib) + "\n")
    storage.write_atomic(storage.join(pm_dir, "eval_pm.json"), json.dumps(report, indent=2))
  hosts.barrier(f"pm evaluation {pm_dir}")  # what follows may read the normalisation back
  return report
