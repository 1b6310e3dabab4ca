"""Everything the analysis writes for one sweep directory (the `analyse` job; the sweep runs it last).

  python -m rlhf_jax analyse RUN_DIR

Reads <RUN_DIR>/results.jsonl, fits every (size, method) series (rlhf_jax.analysis.fits: Bai et
al.'s line in d = sqrt(KL), Gao et al.'s forms for the gold gain) and writes <RUN_DIR>/analysis/:
scaling.md and fits.json, reward_vs_sqrt_kl.png, proxy_vs_gold.png and slope_vs_size.png (those
three compare PPO with best-of-N, as the papers do), and the comparison of every method at matched
KL (rlhf_jax.analysis.methods): methods.md, methods_frontier.png; and which differences between
methods and sizes the seeds support (rlhf_jax.analysis.significance): differences.md; and the
reward-hacking monitors of every run (rlhf_jax.analysis.monitors): a section at the end of
scaling.md (where gold peaks, where the proxy-gold gap widens) and monitors.json. With several
seeds per cell every value is a mean with a 95% bootstrap interval over seeds.
"""
from __future__ import annotations

from typing import Sequence

from rlhf_jax import storage
from rlhf_jax.analysis import methods as method_frontier
from rlhf_jax.analysis import monitors, significance
from rlhf_jax.analysis.figures import plot_proxy_vs_gold, plot_reward_vs_sqrt_kl, plot_slope_vs_size
from rlhf_jax.analysis.fits import fit_all
from rlhf_jax.analysis.results import RESULTS_FILE, load_results
from rlhf_jax.analysis.tables import write_table
from rlhf_jax.training import cli

ANALYSIS_DIR = "analysis"


def analyse(run_dir: str) -> dict[str, str]:
  """Loads <run_dir>/results.jsonl, fits every series, writes the table, fits.json and the three
  plots into <run_dir>/analysis/; returns their paths by name."""
  rows = load_results(storage.join(run_dir, RESULTS_FILE))
  fits = fit_all(rows)
  out = storage.join(run_dir, ANALYSIS_DIR)
  storage.makedirs(out)
  table, fits_json = write_table(fits, storage.join(out, "scaling.md"))
  return {
      "table": table,
      "fits": fits_json,
      "reward_vs_sqrt_kl": plot_reward_vs_sqrt_kl(rows, fits, storage.join(out, "reward_vs_sqrt_kl.png")),
      "proxy_vs_gold": plot_proxy_vs_gold(rows, storage.join(out, "proxy_vs_gold.png")),
      "slope_vs_size": plot_slope_vs_size(fits, storage.join(out, "slope_vs_size.png")),
      **method_frontier.write(rows, fits, out),
      **significance.write(rows, out),
      **monitors.write(rows, out),
  }


def main_factory():
  return main


def main(argv: Sequence[str]) -> None:
  if len(argv) != 2:
    cli.fail("usage: python -m rlhf_jax analyse RUN_DIR")
  paths = analyse(argv[1])
  print(storage.read_text(paths["table"]))
  print(storage.read_text(paths["differences"]))
  for name, path in paths.items():
    print(f"{name}: {path}")

