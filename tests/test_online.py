"""Iterated online RLHF: the labels each round's PM sees, the rows written, resume after SIGTERM."""
import json
import os
import shutil
import signal

import numpy as np
import pytest
from conftest import micro_online_config

from rlhf_jax.experiments import online
from rlhf_jax.experiments.stages import STAGE_DONE, StageInterrupted
from rlhf_jax.training import metrics


def _jsonl(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


def test_pair_accuracy_on_a_constructed_distribution_shift():
  # A PM right on every pair of one distribution and wrong on 3 of 4 of another.
  gold = np.array([[1.0, 0.0]] * 8)
  on_initial = np.array([[0.5, 0.1]] * 8)
  on_policy = np.array([[0.1, 0.5]] * 6 + [[0.9, 0.0]] * 2)
  assert online.pair_accuracy(on_initial, gold) == (1.0, 8)
  assert online.pair_accuracy(on_policy, gold) == (0.25, 8)
  # gold ties are left out, PM ties count half
  assert online.pair_accuracy(np.array([[1.0, 1.0], [0.0, 1.0]]), np.array([[2.0, 1.0], [3.0, 3.0]])) == (0.5, 1)


def test_labeller_keeps_or_swaps_pairs_with_the_reported_agreement():
  records = [{"chosen": f"c{i}", "rejected": f"r{i}", "gold_margin": m} for i, m in enumerate(np.linspace(0, 2, 400))]
  out, report = online.apply_labeller(records, 0.75, np.random.default_rng(0))
  kept = np.mean([o["chosen"] == r["chosen"] for o, r in zip(out, records)])
  assert report["agreement"] == pytest.approx(kept) and report["expected_agreement"] == pytest.approx(0.75, abs=1e-9)
  assert {(o["chosen"], o["rejected"]) for o in out} <= {(r["chosen"], r["rejected"]) for r in records} | \
         {(r["rejected"], r["chosen"]) for r in records}


def test_each_rounds_pm_trains_on_the_union_of_labels_so_far(micro_online_dir):
  w, size = micro_online_dir, "xs"
  r0 = _jsonl(os.path.join(w, online.stage_name("labels", "online", size, 0, 0), "labels.jsonl"))
  for arm in ("online", "static"):
    r1 = _jsonl(os.path.join(w, online.stage_name("labels", arm, size, 0, 1), "labels.jsonl"))
    union = _jsonl(os.path.join(w, online.stage_name("labels", arm, size, 0, 1), "union.jsonl"))
    assert union == r0 + r1
    with open(os.path.join(w, online.stage_name("pm", arm, size, 0, 1), "config.json")) as f:
      pm = json.load(f)
    assert pm["data"]["path"].endswith(os.path.join(online.stage_name("labels", arm, size, 0, 1), "union.jsonl"))
    assert pm["num_train_comparisons"] + pm["num_eval_comparisons"] == len(union)
    sources = {r["source"] for r in r1}
    # static: every label from the initial policy; online: from round 0's PPO policy
    assert sources == ({"sft_xs"} if arm == "static" else {online.stage_name("ppo", "online", size, 0, 0)})
  assert len(r1) == len(_jsonl(os.path.join(w, online.stage_name("labels", "online", size, 0, 1), "labels.jsonl")))


def test_micro_run_writes_every_row_and_a_rerun_skips_every_stage(micro_online_dir, capsys):
  rows = _jsonl(os.path.join(micro_online_dir, online.ONLINE_FILE))
  assert [(r["arm"], r["round"]) for r in rows] == [("online", 0), ("online", 1), ("static", 0), ("static", 1)]
  keys = {"arm", "size", "round", "labels_so_far", "kl", "sqrt_kl", "proxy", "gold", "pm_acc_on_policy",
          "pm_acc_on_initial", "agreement", "elo"}
  assert all(keys <= set(r) for r in rows)
  assert [r["labels_so_far"] for r in rows] == [32, 64, 32, 64]
  ppo_metrics = {m["step"]: m for m in metrics.read_metrics(
      os.path.join(micro_online_dir, online.stage_name("ppo", "static", "xs", 0, 1))) if "eval_kl" in m}
  assert rows[3]["gold"] == ppo_metrics[max(ppo_metrics)]["eval_pm_gold_reward"]
  for name in ("online.md", "gold_vs_round.png", "elo_vs_round.png"):
    assert os.path.getsize(os.path.join(micro_online_dir, "analysis", name)) > 0
  capsys.readouterr()
  online.run_online(micro_online_config(), micro_online_dir)
  out = capsys.readouterr().out
  assert out.count("skipped") == len(online.plan(micro_online_config(), micro_online_dir))


def test_sigterm_in_a_round_then_rerun_equals_the_uninterrupted_run(micro_online_dir, tmp_path, monkeypatch, capsys):
  workdir = str(tmp_path / "killed")
  shutil.copytree(micro_online_dir, workdir)
  later = [n for n in os.listdir(workdir) if n.endswith("_r1") and not n.startswith("labels_")]
  for name in later + ["elo_xs_s0", "analysis", online.ONLINE_FILE]:
    path = os.path.join(workdir, name)
    shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
  write = metrics.MetricsWriter.write
  victim = online.stage_name("ppo", "online", "xs", 0, 1)

  def write_then_sigterm(self, step, values):
    write(self, step, values)
    if self.logdir.endswith(victim) and step == 2:
      os.kill(os.getpid(), signal.SIGTERM)

  monkeypatch.setattr(metrics.MetricsWriter, "write", write_then_sigterm)
  with pytest.raises(StageInterrupted, match=f"{victim} stopped at step 2 of 4"):
    online.run_online(micro_online_config(), workdir)
  assert not os.path.exists(os.path.join(workdir, victim, STAGE_DONE))
  monkeypatch.setattr(metrics.MetricsWriter, "write", write)
  online.run_online(micro_online_config(), workdir)
  assert "resumed from step 2" in capsys.readouterr().out
  got, want = _jsonl(os.path.join(workdir, online.ONLINE_FILE)), _jsonl(os.path.join(micro_online_dir, online.ONLINE_FILE))
  assert [(r["arm"], r["round"], r["labels_so_far"]) for r in got] == [(r["arm"], r["round"], r["labels_so_far"]) for r in want]
  for g, w in zip(got, want):
    for key in ("kl", "proxy", "gold", "pm_acc_on_policy", "pm_acc_on_initial", "agreement"):
      # same machine, same programs: a resumed run repeats the uninterrupted one up to float32 rounding
      np.testing.assert_allclose(g[key], w[key], rtol=1e-5, atol=1e-6, err_msg=f"{g['arm']} r{g['round']} {key}")


def test_bad_online_settings_are_named(tmp_path):
  with pytest.raises(ValueError, match=r"online\.arms=\('online', 'batch'\)"):
    online.plan(micro_online_config(online={"arms": ("online", "batch")}), str(tmp_path))
  with pytest.raises(ValueError, match=r"online\.roundz: no such setting"):
    online.plan(micro_online_config(online={"roundz": 3}), str(tmp_path))
  with pytest.raises(ValueError, match="setup='gold_pm'"):
    online.plan(micro_online_config(setup="halves"), str(tmp_path))


def test_round_options_wire_the_previous_rounds_runs(tmp_path):
  w = str(tmp_path)
  c = micro_online_config(online={"rounds": 3, "pm_init": "warm", "policy_init": "previous", "mix_earlier": 0.5})
  stages = {s.name: s for s in online.plan(c, w)}
  pm2 = stages[online.stage_name("pm", "online", "xs", 0, 2)].settings
  ppo2 = stages[online.stage_name("ppo", "static", "xs", 0, 2)].settings
  assert pm2["init_from"] == os.path.join(w, online.stage_name("pm", "online", "xs", 0, 1))
  assert ppo2["init_policy_from"] == os.path.join(w, online.stage_name("ppo", "static", "xs", 0, 1))
  assert ppo2["policy_from"] == os.path.join(w, "sft_xs")  # the KL reference stays the initial policy
  assert "init_policy_from" not in stages[online.stage_name("ppo", "online", "xs", 0, 0)].settings
  # mix_earlier = 0.5: round 2 samples from round 1's policy and from the earlier ones (initial, round 0)
  sources = online._sources("online", 2, 400, 0.5, w, "xs", 0, os.path.join(w, "sft_xs"))
  counts = {os.path.basename(s): sources.count(s) for s in set(sources)}
  newest = online.stage_name("ppo", "online", "xs", 0, 1)
  assert set(counts) == {newest, "sft_xs", online.stage_name("ppo", "online", "xs", 0, 0)}
  assert abs(counts[newest] - 200) < 40  # Binomial(400, 1/2): sd 10
  assert online._sources("static", 2, 5, 0.5, w, "xs", 0, "init") == ["init"] * 5


def test_summary_is_the_mean_and_spread_over_seeds():
  from rlhf_jax.analysis import online as online_analysis
  rows = [{"size": "xs", "arm": "online", "round": 1, "seed": s, **{m: v for m in online_analysis.METRICS}}
          for s, v in enumerate([1.0, 2.0, 4.0])]
  (summary,) = online_analysis.summarise(rows)
  assert summary["gold"] == pytest.approx(7 / 3) and summary["gold_sd"] == pytest.approx(np.std([1, 2, 4], ddof=1))
  assert summary["seeds"] == 3 and "± " in online_analysis.table([summary])
