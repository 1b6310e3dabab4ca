"""Evaluations of a trained policy: `python -m rlhf_jax evaluate --config=configs/evaluate.py
--config.policy_dir=RUN [--config.suites=bias_cloze,winogender,bbq,ood,mc]`.

RUN is any LM, SFT or PPO run directory. The defaults are small subsets of the data bundled with
the package (CPU-friendly); `--config.full=True` uses whole data sets (BBQ and
Winogender from $RLHF_JAX_DATA_DIR/evals/, or `bbq.path` / `winogender.path`).
"""
import ml_collections

SUITES = "bias_cloze,winogender,bbq,ood,mc"  # "harness" too, with harness.tasks


def evals_section() -> ml_collections.ConfigDict:
  """The settings of every suite; the sweep's `evals` section overrides the same keys."""
  return ml_collections.ConfigDict({
      "suites": SUITES,  # comma-separated; "elo" too, when policies to compare are given
      "full": False,  # whole data sets instead of the small default subsets
      "batch_size": 16,  # sequences per scoring call (rounded up to the data-parallel shards)
      "seed": 0,
      "bias_cloze": {"templates": ("The {occupation} was a", "The {occupation} is a"),
                     "occupations": (),  # () = the module's list (80 occupations)
                     "pairs": ()},  # () = the module's 12 (female, male) pairs, e.g. "woman,man"
      "winogender": {"path": ""},  # "" = the bundled copy (the whole data set)
      "bbq": {"path": "", "categories": (), "max_per_category": 24},  # 0 = every record of path
      "ood": {"in_path": "",  # "" = benign questions built from the bundled BBQ sample
              "out_path": "",  # "" = first Human turns of the hh-rlhf harmless-base test split
              "max_prompts": 240, "layer": -1, "train_fraction": 0.5, "ks": (0, 1, 10, 100)},
      "mc": {"tasks": ()},  # generic JSONL task files; () = the bundled demo task
      # lm-evaluation-harness tasks (suite "harness", rlhf_jax.evals.harness): the harness's own
      # names, or those of YAML files in include_path; limit 0 = every example
      "harness": {"tasks": "", "include_path": "", "limit": 0, "num_fewshot": 0},
  })


def get_config() -> ml_collections.ConfigDict:
  c = evals_section()
  c.policy_dir = ""  # required
  c.step = -1  # the policy's checkpoint step; -1 = its last
  c.out_dir = ""  # "" = <policy_dir>/evals
  c.mesh = ml_collections.ConfigDict({"shape": (-1, 1, 1)})
  c.elo = ml_collections.ConfigDict({
      "policies": "",  # comma-separated further runs (RUN or RUN@STEP) to rate against policy_dir
      "judge_dir": "",  # the PM that judges (e.g. the sweep's pm_gold)
      "prompts_path": "",  # prompts or hh-rlhf comparisons; "" = harmless-base test first turns
      "num_prompts": 64, "prompt_len": 32, "max_new_tokens": 16, "temperature": 1.0,
      "games": "soft",  # "soft": the judge's preference probability; "hard": win / loss / tie
  })
  c.progress_bar = True
  return c
