"""Every job of the package behind one command:

  python -m rlhf_jax JOB [--flags]      (or, installed: rlhf-jax JOB [--flags])

Each job module defines `main_factory()`, which declares the job's flags and returns its absl
main; flags are declared only for the job that runs, since tests and notebooks import several
job modules into one process. `python -m rlhf_jax` alone lists the jobs.
"""
from __future__ import annotations

import importlib
import sys
from typing import Optional, Sequence

JOBS = {  # name: (module, what it does)
    "train_lm": ("rlhf_jax.trainers.train_lm", "pretrain, SFT or context-distil a language model"),
    "train_pm": ("rlhf_jax.trainers.train_pm", "train a preference model (with PMP)"),
    "eval_pm": ("rlhf_jax.trainers.eval_pm", "accuracy, calibration and score normalisation of a PM"),
    "train_ppo": ("rlhf_jax.trainers.train_ppo", "PPO / RLOO / GRPO against a frozen PM with a KL penalty"),
    "train_dpo": ("rlhf_jax.trainers.train_dpo", "DPO / IPO on comparisons"),
    "best_of_n": ("rlhf_jax.trainers.best_of_n", "best-of-N sampling against a PM"),
    "evaluate": ("rlhf_jax.evals.evaluate", "bias, abilities, OOD detection and Elo of a policy"),
    "convert_mc": ("rlhf_jax.evals.multiple_choice", "a published multiple-choice data set as JSONL"),
    "hf_import": ("rlhf_jax.hf.import_model", "a HuggingFace checkpoint as a run directory"),
    "hf_export": ("rlhf_jax.hf.export_model", "a run as a HuggingFace checkpoint"),
    "sweep": ("rlhf_jax.experiments.sweep", "the scaling experiment: every stage for every size"),
    "online": ("rlhf_jax.experiments.online", "iterated online RLHF"),
    "analyse": ("rlhf_jax.analysis.report", "fits, tables and plots of a sweep's results.jsonl"),
}


def usage() -> str:
  width = max(map(len, JOBS))
  lines = ["usage: python -m rlhf_jax JOB [--flags]   (JOB --help for its flags)", "", "jobs:"]
  lines += [f"  {name:<{width}}  {what}" for name, (_, what) in JOBS.items()]
  return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> None:
  argv = list(sys.argv if argv is None else argv)
  if len(argv) < 2 or argv[1] in ("-h", "--help", "help"):
    print(usage())
    raise SystemExit(0 if len(argv) >= 2 else 2)
  name = argv[1]
  if name not in JOBS:
    print(f"error: no job {name!r}; jobs: {', '.join(JOBS)}", file=sys.stderr)
    raise SystemExit(2)
  from rlhf_jax.training import cli
  module = importlib.import_module(JOBS[name][0])
  sys.argv = [f"rlhf_jax {name}", *argv[2:]]  # absl parses sys.argv; its usage line names the job
  cli.run(module.main_factory())
