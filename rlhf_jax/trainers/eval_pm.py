"""Evaluate a trained preference model (see rlhf_jax.trainers.pm_evaluation for what is written).

  python -m rlhf_jax eval_pm --pm_dir=runs/pm_tiny [--data_path=comparisons.jsonl.gz]
"""
import json

from absl import flags, logging

from rlhf_jax.trainers.pm_evaluation import evaluate_pm


def main_factory():
  """Flags are defined only when this module runs as a job: others import it."""
  pm_dir = flags.DEFINE_string("pm_dir", None, "Run directory of a trained PM.", required=True)
  data = flags.DEFINE_string("data_path", None, "Comparison file to evaluate on (default: the "
                             "PM's own held-out comparisons).")

  def main(argv):
    del argv
    if not flags.FLAGS["verbosity"].present:
      logging.set_verbosity(logging.WARNING)
    print(json.dumps(evaluate_pm(pm_dir.value, data.value), indent=2))
  return main
