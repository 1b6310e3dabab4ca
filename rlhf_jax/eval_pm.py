"""Evaluate a trained preference model (see rlhf_jax.pm_evaluation for what is written).

  python -m rlhf_jax.eval_pm --pm_dir=runs/pm_tiny [--data_path=comparisons.jsonl.gz]
"""
import json

from absl import flags, logging

from rlhf_jax import cli

from rlhf_jax.pm_evaluation import evaluate_pm

_PM_DIR = flags.DEFINE_string("pm_dir", None, "Run directory of a trained PM.", required=True)
_DATA = flags.DEFINE_string("data_path", None, "Comparison file to evaluate on (default: the "
                            "PM's own held-out comparisons).")


def main(argv):
  del argv
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  print(json.dumps(evaluate_pm(_PM_DIR.value, _DATA.value), indent=2))


if __name__ == "__main__":
  cli.run(main)
