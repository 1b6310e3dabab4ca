"""The scaling sweep: stages, gold labels, collected results, resume of a killed sweep."""
import json
import math
import os
import shutil
import signal

import jax
import numpy as np
import pytest
from conftest import micro_sweep_config

from rlhf_jax.analysis.results import load_results
from rlhf_jax.data.sequence_start import SequenceStart
from rlhf_jax.errors import ConfigError
from rlhf_jax.experiments import stage_configs, stages, sweep, sweep_results
from rlhf_jax.experiments.config_files import load_module
from rlhf_jax.model.config import param_counts
from rlhf_jax.training import metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _results(workdir):
  with open(os.path.join(workdir, sweep.RESULTS_FILE)) as f:
    return [json.loads(line) for line in f]


def test_plan_runs_every_stage_in_dependency_order(tmp_path):
  two = dict(sizes=("xs", "s"))
  names = [s.name for s in sweep.plan(micro_sweep_config(**two), str(tmp_path))]
  per_size = lambda n: [f"labels_{n}", f"pm_{n}", f"ppo_{n}", f"rloo_{n}", f"grpo_{n}", f"dpo_{n}_beta0.1",
                        f"bon_{n}", f"evals_{n}"]
  assert names == ["tokenizer", "lm_xs", "lm_s", "lm_gold", "sft_xs", "sft_s", "pm_gold", *per_size("xs"),
                   *per_size("s")]
  only_ppo = [s.name for s in sweep.plan(micro_sweep_config(methods=("ppo",), **two), str(tmp_path))]
  assert only_ppo == [n for n in names if n.split("_")[0] not in ("rloo", "grpo", "dpo")]
  no_evals = micro_sweep_config(evals={"suites": ""}, **two)
  assert [s.name for s in sweep.plan(no_evals, str(tmp_path))] == [n for n in names if not n.startswith("evals_")]
  halves = [s.name for s in sweep.plan(micro_sweep_config(setup="halves", **two), str(tmp_path))]
  assert [n for n in names if not n.startswith("labels_")] == halves
  no_sft = micro_sweep_config(**two)
  no_sft.sft.objective = ""
  assert [s.name for s in sweep.plan(no_sft, str(tmp_path))] == [n for n in names if not n.startswith("sft_")]


def test_each_seed_reruns_only_the_stages_whose_randomness_matters(tmp_path):
  c, w = micro_sweep_config(seeds=(0, 2)), str(tmp_path)
  names = [s.name for s in sweep.plan(c, w)]
  seeded = lambda s: [f"pm_xs{s}", f"ppo_xs{s}", f"rloo_xs{s}", f"grpo_xs{s}", f"dpo_xs_beta0.1{s}", f"bon_xs{s}"]
  assert names == ["tokenizer", "lm_xs", "lm_gold", "sft_xs", "pm_gold", "labels_xs", *seeded(""), *seeded("_seed2"),
                   "evals_xs"]
  # Seed 0 is the sweep without seeds, stage for stage, so a sweep that adds seeds keeps its cache.
  plain = {s.name: s.settings for s in sweep.plan(micro_sweep_config(), w)}
  assert all(s.settings == plain[s.name] for s in sweep.plan(c, w) if s.name in plain)
  # Seed 2: its own proxy PM (same labels), every seed of the trainers and best-of-N offset by 2.
  pm, rl = stage_configs.pm_config(c, w, "xs", 2), stage_configs.ppo_config(c, w, "xs", "grpo", 2)
  assert (pm.train.seed, pm.data.path) == (2, os.path.join(w, "labels_xs", "labels.jsonl"))
  assert (rl.train.seed, rl.pm_dir, rl.eval.seed) == (2, os.path.join(w, "pm_xs_seed2"), 1234)  # same eval prompts
  dpo = stage_configs.dpo_config(c, w, "xs", 0.1, 2)
  assert (dpo.train.seed, dpo.pm_dir) == (2, rl.pm_dir)
  bon = next(s for s in sweep.plan(c, w) if s.name == "bon_xs_seed2")
  assert bon.settings["seed"] == 2 and "pm_xs_seed2" in bon.inputs
  # The evaluations are of the first seed's PPO policy.
  evals = next(s for s in sweep.plan(micro_sweep_config(seeds=(3, 1)), w) if s.name == "evals_xs")
  assert "ppo_xs_seed3" in evals.inputs and evals.settings["seed"] == 3


@pytest.mark.parametrize("seeds, message", [((0, 1, 0), "a seed is repeated"), ((), "non-empty list"),
                                            ((0, -1), "non-negative integers"), ((0, 1.5), "non-negative integers")])
def test_bad_seeds_are_one_line(tmp_path, seeds, message):
  with pytest.raises(ValueError, match=message):
    sweep.plan(micro_sweep_config(seeds=seeds), str(tmp_path))


def test_tiny_sweep_runs_the_grpo_variants_with_their_papers_settings(tmp_path):
  c, w = load_module(os.path.join(ROOT, "experiments", "tiny_sweep.py")).get_config(), str(tmp_path)
  names = [s.name for s in sweep.plan(c, w)]
  for method in ("ppo", "rloo", "grpo", "dr_grpo", "gspo", "dapo"):
    assert f"{method}_s" in names and f"{method}_m" in names
  settings = {m: stage_configs.ppo_config(c, w, "s", m) for m in ("grpo", "dr_grpo", "gspo", "dapo")}
  assert {m: r.algorithm for m, r in settings.items()} == {m: m for m in settings}
  assert (settings["gspo"].ppo.clip_eps, settings["gspo"].ppo.clip_eps_high) == (3e-4, 4e-4)
  assert (settings["dapo"].ppo.clip_eps, settings["dapo"].ppo.clip_eps_high, settings["dapo"].ppo.overlong_buffer) == (
      0.2, 0.28, 4)
  for r in settings.values():  # the same rollouts and iterations as GRPO's otherwise
    assert (r.ppo.samples_per_prompt, r.ppo.rollout_batch, r.train.steps) == (4, 32, 30)
    assert r.kl.to_dict() == settings["grpo"].kl.to_dict() and r.eval.to_dict() == settings["grpo"].eval.to_dict()
  assert (settings["grpo"].ppo.clip_eps_high, settings["grpo"].ppo.overlong_buffer) == (0.0, 0)


def test_stage_configs_wire_the_pipeline(tmp_path):
  c, w = micro_sweep_config(), str(tmp_path)
  assert stage_configs.pm_config(c, w, "xs").data.path == os.path.join(w, "labels_xs", "labels.jsonl")
  assert stage_configs.pm_config(c, w, "xs").init_from == os.path.join(w, "lm_xs")
  assert stage_configs.pm_config(c, w, "gold").data.path == ""  # the gold PM learns from the human data
  assert stage_configs.pm_config(c, w, "gold").train.steps == 30 and stage_configs.pm_config(c, w, "xs").train.steps == 20
  rl = stage_configs.ppo_config(c, w, "s")
  assert (rl.policy_from, rl.pm_dir) == (os.path.join(w, "sft_s"), os.path.join(w, "pm_s"))
  sft = stage_configs.sft_config(c, w, "s")
  assert (sft.objective, sft.init_from, sft.train.steps, sft.train.seq_len) == ("sft", os.path.join(w, "lm_s"), 10, 64)
  c.sft.objective = ""  # PPO, labels and best-of-N then start from the pretrained LM
  assert stage_configs.ppo_config(c, w, "s").policy_from == os.path.join(w, "lm_s")
  c = micro_sweep_config()
  assert tuple(rl.eval.pm_dirs) == (os.path.join(w, "pm_gold"),)
  assert stage_configs.lm_config(c, w, "s").model.d_model == 48
  halves = micro_sweep_config(setup="halves")
  assert (stage_configs.pm_config(halves, w, "xs").data.half, stage_configs.pm_config(halves, w, "gold").data.half) == ("a", "b")
  assert stage_configs.pm_config(halves, w, "xs").data.path == ""
  # The other methods: rl's settings with their own overrides; DPO on the proxy PM's comparisons,
  # sampled and evaluated exactly as the RL runs are.
  rloo, ppo = stage_configs.ppo_config(c, w, "xs", "rloo"), stage_configs.ppo_config(c, w, "xs")
  assert (rloo.algorithm, rloo.ppo.samples_per_prompt, ppo.algorithm, ppo.ppo.samples_per_prompt) == ("rloo", 4, "ppo", 1)
  assert rloo.ppo.rollout_batch == ppo.ppo.rollout_batch and rloo.train.steps == ppo.train.steps
  dpo = stage_configs.dpo_config(c, w, "xs", 0.1)
  assert dpo.preferences.to_dict() == stage_configs.pm_config(c, w, "xs").data.to_dict()
  assert (dpo.dpo.beta, dpo.policy_from, dpo.pm_dir) == (0.1, ppo.policy_from, ppo.pm_dir)
  assert dpo.eval.to_dict() == ppo.eval.to_dict() and dpo.data.to_dict() == ppo.data.to_dict()
  assert dpo.sampling.to_dict() == ppo.sampling.to_dict()
  assert stage_configs.dpo_config(halves, w, "xs", 0.5).preferences.half == "a"


def test_bad_sweep_configs_are_named(tmp_path):
  with pytest.raises(ValueError, match=r"rl\.ppo\.clip_epsilon: no such setting"):
    sweep.plan(micro_sweep_config(rl={"ppo": {"clip_epsilon": 0.1}}), str(tmp_path))
  with pytest.raises(ValueError, match=r"size 'l' has no entry in config.models"):
    sweep.plan(micro_sweep_config(sizes=("xs", "l")), str(tmp_path))
  with pytest.raises(ValueError, match=r"unknown ModelConfig fields \['depth'\]"):
    sweep.plan(micro_sweep_config(models={"xs": {"depth": 2}, "gold": {}}, sizes=("xs",)), str(tmp_path))
  with pytest.raises(ValueError, match="setup='gao'"):
    sweep.plan(micro_sweep_config(setup="gao"), str(tmp_path))
  with pytest.raises(ValueError, match=r"methods=\('ppo', 'reinforce'\)"):
    sweep.plan(micro_sweep_config(methods=("ppo", "reinforce")), str(tmp_path))
  with pytest.raises(ValueError, match=r"rloo\.ppo\.group: no such setting"):
    sweep.plan(micro_sweep_config(rloo={"ppo": {"group": 4}}), str(tmp_path))


class _Tok(SequenceStart):
  """Characters as tokens: id = ord(c) - 90 for 'a'..'z' (ids 7..32); 0 pad, 2 EOS, 3 EOC."""
  pad_id, eos_id, eoc_id = 0, 2, 3

  def encode(self, text):
    return [ord(ch) - 90 for ch in text if "a" <= ch <= "z"] or [7]

  def decode(self, ids):
    return "".join(chr(i + 90) for i in ids if i >= 7)


def test_gold_labels_prefer_the_higher_gold_score_and_count_ties(monkeypatch):
  from rlhf_jax.model.config import ModelConfig
  from rlhf_jax.model.transformer import Transformer, init_params
  cfg = ModelConfig(vocab_size=40, d_model=16, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=8,
                    mlp_dim=32, max_seq_len=64)
  policy = type("P", (), {"model": Transformer(cfg), "params": init_params(cfg, jax.random.PRNGKey(0))})()
  tok = _Tok()
  scored = []

  def fake_pm_score(model, params, prompt, prompt_mask, response, response_mask, eoc_id):
    # "Gold" score: the number of 'z' in the decoded response, an independent host-side rule.
    texts = [tok.decode([t for t, m in zip(r, ok) if m and t != tok.eos_id])
             for r, ok in zip(np.asarray(response), np.asarray(response_mask))]
    scored.extend(texts)
    return np.array([t.count("z") + 0.01 * len(t) for t in texts])

  monkeypatch.setattr(sweep, "pm_score_jitted", fake_pm_score)
  prompts = ["abc", "hello", "xyz"]
  gold = type("G", (), {"model": None, "params": None})()
  records, report = sweep.gold_labels(policy, gold, tok, prompts, num_pairs=40, prompt_len=8,
                                      max_new_tokens=3, temperature=3.0, batch_size=16, seed=0)
  assert report["num_pairs"] == len(records) and len(records) + report["ties_not_written"] == 40
  assert len(scored) == 80  # every pair scored once, both responses
  for i, r in enumerate(records):
    prompt = next(p for p in prompts if r["chosen"].startswith(p))
    chosen, rejected = r["chosen"][len(prompt):], r["rejected"][len(prompt):]
    assert r["rejected"].startswith(prompt) and chosen != rejected
    gold = lambda t: t.count("z") + 0.01 * len(t)
    assert gold(chosen) >= gold(rejected)
    assert r["gold_margin"] == pytest.approx(gold(chosen) - gold(rejected))
  # prompts are cycled in order: pair k answers prompts[k % 3]
  firsts = [next(p for p in prompts if r["chosen"].startswith(p)) for r in records]
  assert set(firsts) == set(prompts)


def test_micro_sweep_collects_every_point(micro_sweep_dir):
  c = micro_sweep_config()
  rows = load_results(micro_sweep_dir)  # validated by the analysis reader
  assert rows == _results(micro_sweep_dir)
  for size in c.sizes:
    rl = [r for r in rows if r["size"] == size and r["method"] == "ppo"]
    bon = [r for r in rows if r["size"] == size and r["method"] == "bon"]
    assert [r["step"] for r in rl] == [0, 2, 4] and [r["step"] for r in bon] == [1, 2, 4]
    assert rl[0]["kl"] == 0.0 and bon[0]["kl"] == 0.0
    assert {r["params"] for r in rl + bon} == {param_counts(stage_configs.model_config(c, size))["non_embedding"]}
    # Each RL row is exactly the PPO run's evaluation at that step, gold reward from the gold PM.
    logged = {m["step"]: m for m in metrics.read_metrics(os.path.join(micro_sweep_dir, f"ppo_{size}"))
              if "eval_kl" in m}
    for r in rl:
      m = logged[r["step"]]
      assert (r["kl"], r["proxy_reward"], r["gold_reward"]) == (m["eval_kl"], m["eval_pm_reward"],
                                                                 m["eval_pm_gold_reward"])
      assert r["sqrt_kl"] == pytest.approx(math.sqrt(max(r["kl"], 0.0)))
    for r in bon:
      assert r["kl"] == pytest.approx(math.log(r["step"]) - (r["step"] - 1) / r["step"], abs=1e-12)
    # Proxy PM trained on the gold labels it was given (and nothing else).
    with open(os.path.join(micro_sweep_dir, f"labels_{size}", "labels.jsonl")) as f:
      num_labels = sum(1 for _ in f)
    with open(os.path.join(micro_sweep_dir, f"pm_{size}", "config.json")) as f:
      pm_cfg = json.load(f)
    assert pm_cfg["data"]["path"].endswith(f"labels_{size}/labels.jsonl")
    assert pm_cfg["num_train_comparisons"] + pm_cfg["num_eval_comparisons"] == num_labels
  for name in ("scaling.md", "fits.json", "reward_vs_sqrt_kl.png", "proxy_vs_gold.png", "slope_vs_size.png",
               "methods.md", "methods_frontier.png"):
    assert os.path.getsize(os.path.join(micro_sweep_dir, "analysis", name)) > 0


def test_rerun_skips_finished_stages_and_other_settings_are_refused(micro_sweep_dir, tmp_path, capsys):
  workdir = str(tmp_path / "sweep")  # a copy (mtimes kept): other tests read the shared sweep meanwhile
  shutil.copytree(micro_sweep_dir, workdir)
  before = {d: os.path.getmtime(os.path.join(workdir, d, stages.STAGE_DONE))
            for d in os.listdir(workdir) if os.path.exists(os.path.join(workdir, d, stages.STAGE_DONE))}
  assert len(before) == 13
  sweep.run_sweep(micro_sweep_config(), workdir)
  assert capsys.readouterr().out.count("skipped") == 13
  assert before == {d: os.path.getmtime(os.path.join(workdir, d, stages.STAGE_DONE)) for d in before}
  changed = micro_sweep_config()
  changed.rl.kl = {"coef": 0.5}
  with pytest.raises(ValueError, match=r"ppo_xs finished with other settings: kl.coef 0.001 -> 0.5"):
    sweep.run_sweep(changed, workdir)


def test_killed_sweep_resumes_to_the_uninterrupted_results(micro_sweep_dir, tmp_path, monkeypatch, capsys):
  # A copy of the finished sweep (settings are stored relative to the sweep, so it still resumes)
  # without its PPO, best-of-N and evals stages, rerun with a preemption notice in the middle of ppo_xs.
  workdir = str(tmp_path / "killed")
  shutil.copytree(micro_sweep_dir, workdir)
  for name in ("ppo_xs", "bon_xs", "evals_xs", "analysis", sweep.RESULTS_FILE):
    path = os.path.join(workdir, name)
    shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
  write = metrics.MetricsWriter.write

  def write_then_sigterm(self, step, values):
    write(self, step, values)
    if self.logdir.endswith("ppo_xs") and step == 3:
      os.kill(os.getpid(), signal.SIGTERM)

  monkeypatch.setattr(metrics.MetricsWriter, "write", write_then_sigterm)
  with pytest.raises(sweep.SweepInterrupted, match="ppo_xs stopped at step 3 of 4"):
    sweep.run_sweep(micro_sweep_config(), workdir)
  assert not os.path.exists(os.path.join(workdir, "ppo_xs", stages.STAGE_DONE))
  assert not os.path.exists(os.path.join(workdir, "bon_xs"))
  monkeypatch.setattr(metrics.MetricsWriter, "write", write)
  capsys.readouterr()
  sweep.run_sweep(micro_sweep_config(), workdir)
  out = capsys.readouterr().out
  # Only ppo_xs, bon_xs and evals_xs ran (the other methods' stages do not depend on PPO's).
  assert out.count("skipped") == 10 and "resumed from step 3" in out
  got, want = _results(workdir), _results(micro_sweep_dir)
  assert [(r["size"], r["method"], r["step"]) for r in got] == [(r["size"], r["method"], r["step"]) for r in want]
  for g, w in zip(got, want):
    for key in ("kl", "proxy_reward", "gold_reward"):
      np.testing.assert_allclose(g[key], w[key], rtol=1e-5, atol=1e-6, err_msg=f"{g['size']} {g['method']} {key}")


def test_three_seeds_give_intervals_and_reuse_the_first_seeds_runs(micro_sweep_dir, tmp_path, capsys):
  # The finished micro sweep, copied, rerun with seeds (0, 1, 2) and PPO: only seeds 1 and 2's
  # proxy PM, PPO and best-of-N stages run.
  workdir = str(tmp_path / "seeds")
  shutil.copytree(micro_sweep_dir, workdir)
  os.remove(os.path.join(workdir, sweep.RESULTS_FILE))
  capsys.readouterr()
  sweep.run_sweep(micro_sweep_config(seeds=(0, 1, 2), methods=("ppo",)), workdir)
  out = capsys.readouterr().out
  assert out.count("skipped") == 10, out  # tokenizer, 2 LMs, SFT, gold PM, labels, pm/ppo/bon seed 0, evals
  rows, first = load_results(workdir), load_results(micro_sweep_dir)
  assert [r for r in rows if r["seed"] == 0] == [r for r in first if r["method"] in ("ppo", "bon")]
  ppo = {s: [r for r in rows if r["method"] == "ppo" and r["seed"] == s] for s in (0, 1, 2)}
  assert [[r["step"] for r in ppo[s]] for s in (0, 1, 2)] == [[0, 2, 4]] * 3
  # Step 0 is the same initial policy on the same prompts: the gold PM agrees exactly across seeds,
  # while each seed's own proxy PM (another init and data order) scores it differently.
  assert len({ppo[s][0]["gold_reward"] for s in ppo}) == 1
  assert len({ppo[s][0]["proxy_reward"] for s in ppo}) == 3
  with open(os.path.join(workdir, "pm_xs_seed2", "config.json")) as f:
    assert json.load(f)["train"]["seed"] == 2
  # fits.json: the mean of the seeds' own gold slopes (least squares here, in float64), and with
  # three seeds the 95% bootstrap interval is their range. Best-of-N: its analytic KLs are
  # distinct at any size (the micro PPO barely moves), and each seed draws its own samples.
  bon = {s: [r for r in rows if r["method"] == "bon" and r["seed"] == s] for s in (0, 1, 2)}
  slopes = [np.polyfit([r["sqrt_kl"] for r in bon[s]], [r["gold_reward"] for r in bon[s]], 1)[0] for s in bon]
  assert len(set(slopes)) == 3
  with open(os.path.join(workdir, "analysis", "fits.json")) as f:
    fit = next(f for f in json.load(f) if f["method"] == "bon")
  assert fit["seeds"] == 3
  np.testing.assert_allclose([fit["gold_slope"], fit["gold_slope_lo"], fit["gold_slope_hi"]],
                             [np.mean(slopes), min(slopes), max(slopes)], rtol=1e-9, atol=1e-12)
  with open(os.path.join(workdir, "analysis", "differences.md")) as f:
    assert "Means over 3 seeds" in f.read()
  with open(os.path.join(workdir, "analysis", "scaling.md")) as f:
    row = next(line for line in f if line.startswith(f"| xs | {fit['params']} | bon | "))
  assert f"{fit['gold_slope']:.4g} [{fit['gold_slope_lo']:.4g}, {fit['gold_slope_hi']:.4g}]" in row, row
  assert row.endswith(f"| 3 | {fit['n']} |  |\n"), row


def test_direct_alignment_losses_are_methods_measured_along_training_with_the_monitors(micro_sweep_dir, tmp_path):
  # The finished micro sweep, copied, rerun with IPO and SLiC too: only their stages run.
  workdir = str(tmp_path / "direct")
  shutil.copytree(micro_sweep_dir, workdir)
  shutil.rmtree(os.path.join(workdir, "bon_xs"))  # rerun with its KL measured too
  bon = {"ns": (1, 2, 4), "num_prompts": 8, "seed": 0, "kl_reference": 16}
  c = micro_sweep_config(methods=("ppo", "rloo", "grpo", "dpo", "ipo", "slic"), bon=bon)
  names = [s.name for s in sweep.plan(c, workdir)]
  assert names.index("dpo_xs_beta0.1") + 1 == names.index("ipo_xs_beta0.1") == names.index("slic_xs_beta0.1") - 1
  sweep.run_sweep(c, workdir)
  rows = load_results(workdir)
  for method in ("dpo", "ipo", "slic"):
    with open(os.path.join(workdir, f"{method}_xs_beta0.1", "config.json")) as f:
      assert json.load(f)["dpo"]["loss"] == method
    steps = [r["step"] for r in rows if r["method"] == method]
    assert steps == [0, 2, 4] and all(r["beta"] == 0.1 for r in rows if r["method"] == method), steps
  # Along training, every run's monitors come from its own metrics.jsonl, logged with each evaluation.
  logged = {m["step"]: m for m in metrics.read_metrics(os.path.join(workdir, "slic_xs_beta0.1")) if "eval_kl" in m}
  for r in (r for r in rows if r["method"] == "slic"):
    assert (r["entropy"], r["response_length"]) == (logged[r["step"]]["eval_entropy"],
                                                    logged[r["step"]]["eval_response_length"])
    assert 0.0 < r["entropy"] <= math.log(512) * (1 + 1e-6)  # nats per token, at most log(vocab)
  ppo_logged = {m["step"]: m for m in metrics.read_metrics(os.path.join(workdir, "ppo_xs"))}
  ppo_rows = [r for r in rows if r["method"] == "ppo"]
  assert "advantage_std" not in ppo_rows[0] and all(r["advantage_std"] > 0 for r in ppo_rows[1:])
  for m in ppo_logged.values():
    if "eval_kl" in m:
      assert m["eval_gap_pm_gold"] == pytest.approx(m["eval_pm_reward"] - m["eval_pm_gold_reward"], abs=1e-6)
  with open(os.path.join(workdir, "analysis", "monitors.json")) as f:
    mon = {(m["method"], m.get("beta")): m for m in json.load(f)}
  assert set(mon) == {("ppo", None), ("rloo", None), ("grpo", None), ("dpo", 0.1), ("ipo", 0.1), ("slic", 0.1)}
  ppo = mon[("ppo", None)]  # KL per step between evaluations two steps apart
  assert ppo["kl_rate_last"] == pytest.approx((ppo_rows[2]["kl"] - ppo_rows[1]["kl"]) / 2, rel=1e-12)
  slic = [r for r in rows if r["method"] == "slic"]
  best = max(range(3), key=lambda i: (slic[i]["gold_reward"], -i))
  assert mon[("slic", 0.1)]["gold_peak_step"] == slic[best]["step"]
  with open(os.path.join(workdir, "analysis", "scaling.md")) as f:
    assert "## Reward-hacking monitors" in f.read()
  # Best-of-N's measured KL is its axis, the bound beside it; best-of-1 stays the shared KL = 0.
  with open(os.path.join(workdir, "bon_xs", "best_of_n.jsonl")) as f:
    logged = {b["n"]: b for b in map(json.loads, f)}
  bon_rows = [r for r in rows if r["method"] == "bon"]
  assert [r["step"] for r in bon_rows] == [1, 2, 4] and bon_rows[0]["kl"] == 0.0
  for r in bon_rows:
    assert r["kl"] == r["kl_measured"] == logged[r["step"]]["kl_measured"]
    assert r["kl_bound"] == pytest.approx(math.log(r["step"]) - (r["step"] - 1) / r["step"], abs=1e-12)
  analytic = sweep_results.collect_results(micro_sweep_config(methods=c.methods, bon={**bon, "kl": "analytic"}),
                                           workdir)
  assert [r["kl"] for r in analytic if r["method"] == "bon"] == [r["kl_bound"] for r in bon_rows]
  with pytest.raises(ConfigError, match="bon.kl='exact'"):
    sweep_results.collect_results(micro_sweep_config(methods=c.methods, bon={**bon, "kl": "exact"}), workdir)


def test_every_stage_records_the_directory_it_ran_in(micro_sweep_dir):
  """Provenance: a stage's config.json names its own directory, not the base config's default
  workdir (runs/ppo_tiny and the like)."""
  trainer_stages = [d for d in os.listdir(micro_sweep_dir) if d.split("_")[0] in ("lm", "sft", "pm", "ppo")]
  assert len(trainer_stages) >= 5
  for stage in trainer_stages:
    with open(os.path.join(micro_sweep_dir, stage, "config.json")) as f:
      assert json.load(f)["workdir"] == os.path.abspath(os.path.join(micro_sweep_dir, stage)), stage


def test_evals_stage_writes_the_alignment_tax_table_and_elo_of_each_snapshot(micro_sweep_dir):
  from rlhf_jax.evals.suite import headline
  with open(os.path.join(micro_sweep_dir, "evals_xs", "evals.json")) as f:
    ev = json.load(f)
  before, after = headline(ev["initial"]), headline(ev["rlhf"])
  assert set(before) == set(after) and {"bbq.acc_ambig", "winogender.pearson_r", "ood.auroc_mahalanobis",
                                        "bias_cloze.mean_abs_bias", "mc.acc"} <= set(before)
  with open(os.path.join(micro_sweep_dir, "analysis", "alignment_tax.md")) as f:
    table = f.read()
  for metric, (b, _) in before.items():  # each row: before, after and their difference
    a = after[metric][0]
    row = next(line for line in table.splitlines() if f"| {metric} |" in line)
    assert row.startswith("| xs |") and f"{a - b:+.3f}" in row and f"{b:.3f}" in row, row
  # Elo: the initial policy, every saved PPO snapshot with its logged KL, best-of-2 with its analytic KL.
  logged = {m["step"]: m["eval_kl"] for m in metrics.read_metrics(os.path.join(micro_sweep_dir, "ppo_xs"))
            if "eval_kl" in m}
  elo = {r["name"]: r for r in ev["elo"]}
  assert set(elo) == {"initial", "ppo@2", "ppo@4", "bon@2"}
  assert elo["initial"]["kl"] == 0.0 and elo["ppo@4"]["kl"] == logged[4]
  assert elo["bon@2"]["kl"] == pytest.approx(math.log(2) - 0.5, abs=1e-12)
  assert sum(r["elo"] for r in elo.values()) == pytest.approx(0.0, abs=1e-6)
  assert all(r["elo_lo"] <= r["elo"] <= r["elo_hi"] for r in elo.values())
  for name in ("alignment_tax.png", "bias_before_after.png", "elo_vs_sqrt_kl.png"):
    assert os.path.getsize(os.path.join(micro_sweep_dir, "analysis", name)) > 1000
  for name in ("bias_cloze_initial.png", "winogender_rlhf.png", "evals.md"):
    assert os.path.getsize(os.path.join(micro_sweep_dir, "evals_xs", name)) > 0


def test_paper_sweep_evaluates_every_size_on_whole_data_sets(tmp_path):
  c = load_module(os.path.join(ROOT, "experiments", "paper_sweep.py")).get_config()
  names = [s.name for s in sweep.plan(c, str(tmp_path))]
  assert [n for n in names if n.startswith("evals_")] == [f"evals_{size}" for size in c.sizes]
  ev = sweep.evals_config(c)
  assert ev.full and "elo" in ev.suites and tuple(ev.elo.bon_ns) == (4, 16, 64)
  for size in c.sizes:
    assert {f"ppo_{size}", f"rloo_{size}", f"grpo_{size}", stage_configs.dpo_stage_name(size, 0.1)} <= set(names)
  with pytest.raises(ValueError, match=r"evals\.bbq\.max_per_categry: no such setting"):
    sweep.plan(micro_sweep_config(evals={"bbq": {"max_per_categry": 3}}), str(tmp_path))


def _independent_kl(stage_dir):
  """KL(policy || initial) of a run's last checkpoint on its evaluation prompts, recomputed here:
  the evaluator's samples (same mesh, prompts, seed), then per-token log-ratios from the two
  models' logits with a float64 log-softmax, summed over each response and averaged."""
  import functools

  from rlhf_jax.data.batching import Encoded
  from rlhf_jax.data.prompts import PromptBatcher, prompt_texts
  from rlhf_jax.data.tokenizer import same_tokenizer
  from rlhf_jax.model.sampling import generate
  from rlhf_jax.training import sharding as shd
  from rlhf_jax.training.saved_runs import FrozenModel, load_policy, load_run_config
  cfg = load_run_config(stage_dir)
  mesh = shd.make_mesh(cfg.mesh.shape)
  tok = same_tokenizer(cfg.policy_from)
  _, texts = prompt_texts(cfg, stage_dir)
  prompts = PromptBatcher([Encoded(tok.encode(t), []) for t in texts[:cfg.eval.num_prompts]],
                          batch_size=cfg.eval.num_prompts, seq_len=cfg.sampling.prompt_len, seed=cfg.train.seed,
                          pad_id=tok.pad_id).in_order()[0]
  policy, initial = load_policy(stage_dir, mesh), FrozenModel(cfg.policy_from, mesh)
  gen = functools.partial(generate, model=initial.model, max_new_tokens=cfg.sampling.max_new_tokens,
                          temperature=cfg.sampling.temperature, top_k=cfg.sampling.top_k, top_p=cfg.sampling.top_p,
                          eos_id=tok.eos_id, pad_id=tok.pad_id)(
      policy.params, prompts["tokens"], prompts["attention_mask"], jax.random.PRNGKey(cfg.eval.seed))
  tokens = np.concatenate([np.asarray(gen.prompt_tokens), np.asarray(gen.tokens)], axis=1)
  mask = np.concatenate([np.asarray(gen.prompt_mask), np.asarray(gen.mask)], axis=1)
  p, response, valid = gen.prompt_tokens.shape[1], np.asarray(gen.tokens), np.asarray(gen.mask)

  def token_logp(params):
    logits = np.asarray(initial.model.apply({"params": params}, tokens, attention_mask=mask).logits, np.float64)
    logits = logits[:, p - 1:-1]
    logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    return np.take_along_axis(logits, response[..., None], axis=-1)[..., 0] - logz

  ratio = np.where(valid, token_logp(policy.params) - token_logp(initial.params), 0.0)
  return ratio.sum(axis=1).mean()


def test_every_method_is_measured_on_the_same_axes(micro_sweep_dir):
  rows = load_results(micro_sweep_dir)
  by_method = {m: [r for r in rows if r["method"] == m] for m in ("ppo", "rloo", "grpo", "dpo")}
  assert all(len(rs) == 3 for rs in by_method.values()), {m: len(rs) for m, rs in by_method.items()}
  assert {r["beta"] for r in by_method["dpo"]} == {0.1}
  # Step 0 is the initial policy, evaluated by one function on the same prompts with the same seeds.
  start = {m: next((r["kl"], r["proxy_reward"], r["gold_reward"]) for r in rs if r["step"] == 0)
           for m, rs in by_method.items()}
  assert start["ppo"][0] == 0.0 and len(set(start.values())) == 1, start
  # Best-of-1 scores those same samples (the evaluation's prompts and seed): one KL = 0 point.
  # The same PM programs on the same tokens; only compilation may reorder a float32 sum.
  bon1 = next(r for r in rows if r["method"] == "bon" and r["step"] == 1)
  np.testing.assert_allclose([bon1["kl"], bon1["proxy_reward"], bon1["gold_reward"]], start["ppo"], rtol=1e-5,
                             atol=1e-6)
  # The logged KL of the last point is the k1 sum over sampled tokens, whichever trainer logged it.
  for stage, method in (("rloo_xs", "rloo"), ("dpo_xs_beta0.1", "dpo")):
    logged = max(by_method[method], key=lambda r: r["step"])["kl"]
    assert abs(logged) > 1e-3, f"{method} never moved: the check below would be vacuous"
    # float32 log-softmax in the evaluator: ~1e-6 per token, 8 tokens, against a KL far larger.
    assert logged == pytest.approx(_independent_kl(os.path.join(micro_sweep_dir, stage)), abs=2e-4), method
  with open(os.path.join(micro_sweep_dir, "analysis", "methods.md")) as f:
    table = f.read()
  for method in ("ppo", "rloo", "grpo", "dpo", "bon"):
    assert f"| xs | {method} |" in table
