"""Reward-hacking monitors (rlhf_jax.analysis.monitors) on hand-built runs whose peaks, gaps and
KL rates are worked out by hand."""
import json
import math

import pytest

from rlhf_jax.analysis import monitors
from rlhf_jax.analysis.results import load_results


def _row(step, kl, proxy, gold, method="ppo", seed=0, **extra):
  return {"size": "xs", "params": 100, "method": method, "seed": seed, "step": step, "kl": kl,
          "sqrt_kl": math.sqrt(kl), "proxy_reward": proxy, "gold_reward": gold, **extra}


def _hump(seed=0, method="ppo", **extra):
  # gold rises to step 4 and falls; the gap (proxy - gold) is 0.1, 0.0, 0.1, 0.6, 1.0: smallest at step 2.
  gold = [0.0, 0.3, 0.5, 0.4, 0.2]
  proxy = [0.1, 0.3, 0.6, 1.0, 1.2]
  kl = [0.0, 0.1, 0.2, 0.5, 1.0]
  return [_row(2 * i, kl[i], proxy[i], gold[i], method, seed, **extra) for i in range(5)]


def test_a_hump_peaks_inside_and_its_gap_widens_from_its_smallest_point():
  rows = _hump(entropy=1.0)
  rows[-1]["entropy"] = 0.25
  m = monitors.run_monitors(rows)
  assert m["gold_peak_step"] == 4 and m["gold_peaks_inside"] and m["last_step"] == 8
  assert (m["gold_at_peak"], m["gold_at_last"]) == (0.5, 0.2)
  assert m["gap_widens_from"] == 2
  assert m["gap_first"] == pytest.approx(0.1) and m["gap_last"] == pytest.approx(1.0)
  # KL per step between evaluations two steps apart: (0.1 - 0) / 2 first, (1.0 - 0.5) / 2 last.
  assert m["kl_rate_first"] == pytest.approx(0.05) and m["kl_rate_last"] == pytest.approx(0.25)
  assert (m["entropy_first"], m["entropy_last"]) == (1.0, 0.25)
  assert "advantage_std_first" not in m  # not in these rows: not made up


def test_a_flat_or_rising_run_has_no_peak_and_no_widening():
  flat = [_row(s, 0.1 * s, 0.2, 0.3) for s in range(4)]
  m = monitors.run_monitors(flat)
  assert not m["gold_peaks_inside"] and m["gold_peak_step"] == 0  # equal values: no peak to report
  assert m["gap_widens_from"] is None
  rising = [_row(s, 0.1 * s, 0.1 * s, 0.2 * s) for s in range(4)]  # gap shrinks throughout
  m = monitors.run_monitors(rising)
  assert not m["gold_peaks_inside"] and m["gold_peak_step"] == 3 and m["gap_widens_from"] is None
  text = monitors.format_monitors(monitors.all_monitors(rising))
  assert "Gold reward peaks inside no run" in text


def test_runs_are_told_apart_by_seed_and_beta_and_best_of_n_is_left_out():
  rows = _hump(seed=0) + [_row(s, 0.1 * s, 0.1 * s, 0.2 * s, seed=1) for s in range(4)]
  rows += [dict(r, method="dpo", beta=0.1) for r in _hump()] + [dict(r, method="dpo", beta=0.5) for r in _hump()]
  rows += [_row(n, math.log(n) - (n - 1) / n, 0.1, 0.1, method="bon") for n in (1, 2, 4)]
  ms = monitors.all_monitors(rows)
  keys = [(m["method"], m.get("beta"), m["seed"]) for m in ms]
  assert sorted(keys, key=str) == sorted([("ppo", None, 0), ("ppo", None, 1), ("dpo", 0.1, 0), ("dpo", 0.5, 0)],
                                         key=str)
  text = monitors.format_monitors(ms)
  assert "xs ppo seed 0 (step 4 of 8: 0.5 -> 0.2)" in text and "xs dpo beta=0.5 seed 0 (step 4 of 8" in text
  assert "xs ppo seed 1" not in text.split("\n\n")[-1].split("Gap:")[0]  # seed 1 only rises
  # Per run over seeds: PPO peaks in 1 of its 2 seeds (falling 0.5 -> 0.2), each DPO beta in its one.
  assert "Seeds whose gold reward peaks inside the run: xs ppo 1 of 2 (mean fall 0.3)" in text
  assert "xs dpo beta=0.1 1 of 1 (mean fall 0.3)" in text


def test_write_appends_to_scaling_md_and_writes_json(tmp_path):
  (tmp_path / "scaling.md").write_text("| the fits |\n")
  paths = monitors.write(_hump(advantage_std=0.5), str(tmp_path))
  text = (tmp_path / "scaling.md").read_text()
  assert text.startswith("| the fits |\n") and "## Reward-hacking monitors" in text
  assert "| xs | ppo | 0 | 4 (8) | 2 | 0.05 -> 0.25 | - -> - | - -> - | 0.5 -> 0.5 |" in text
  with open(paths["monitors"]) as f:
    assert json.load(f)[0]["gold_peak_step"] == 4


@pytest.mark.parametrize("value", ["high", float("nan"), True])
def test_a_bad_monitor_field_names_the_line_and_field(tmp_path, value):
  path = tmp_path / "results.jsonl"
  rows = _hump()
  rows[1]["entropy"] = value
  path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
  with pytest.raises(ValueError, match=r"results.jsonl:2: field 'entropy'"):
    load_results(str(path))
