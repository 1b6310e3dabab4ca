"""Iterated online RLHF (Bai et al. 2022, section 4.5), the gold PM standing in for crowdworkers.

  python -m rlhf_jax online --config=experiments/online_tiny.py [--workdir=runs/online_tiny]

From the sweep's base stages (tokenizer, LMs, initial policies, gold PM; rlhf_jax.experiments.sweep), for each
seed, size and arm, rounds r = 0 .. R-1:
  labels  n pairs of samples on fresh training prompts (slice r of them), labelled by a noisy
          simulated labeller over the gold PM (rlhf_jax.experiments.simulated_labeller) whose tau gives the
          configured agreement with the gold ranking. Arm "online" samples round r >= 1 from the
          newest policy (round r - 1's; a fraction `mix_earlier` from earlier ones), arm "static"
          always from the initial policy: the same label budget, no fresh distribution.
  pm      a proxy PM on the union of the arm's labels so far (from the pretrained LM, or "warm" from
          the previous round's PM).
  ppo     a policy trained against it, from the initial policy (the paper's choice) or continuing
          the previous round's ("previous"); the KL reference is always the initial policy.
  eval    held-out proxy and gold reward and KL (PPO's last evaluation), and the PM's accuracy on
          gold-ranked pairs sampled from this round's policy and from the initial policy.
Round 0 is the same for both arms (the initial policy's first labels) and runs once. Last, per
size and seed, the Elo of every round's policy judged by the gold PM. Rows go to
<workdir>/online.jsonl and the analysis (rlhf_jax.analysis.online) to <workdir>/analysis/.
Stages are the sweep's (rlhf_jax.experiments.stages): cached, resumable, SIGTERM-safe, refusing changed settings,
rerun when a stage they read from runs again.
"""
from __future__ import annotations

import json
from typing import Any, Callable

import jax
import ml_collections
import numpy as np

from rlhf_jax import hosts, storage
from rlhf_jax.data.chat import with_chat_format
from rlhf_jax.errors import ConfigError
from rlhf_jax.experiments import stage_configs, sweep
from rlhf_jax.experiments.simulated_labeller import expected_agreement, noisy_preferences, tau_for_agreement
from rlhf_jax.experiments.stages import (
  STAGE_DONE,
  Stage,
  barrier,
  experiment_main,
  override,
  read_jsonl,
  run_stages,
  write_jsonl,
)
from rlhf_jax.training import sharding as shd
from rlhf_jax.training.metrics import read_metrics

ONLINE_FILE = "online.jsonl"
ARMS = ("online", "static")


def online_section() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({
      "rounds": 3,
      "pairs_per_round": 256,
      "agreement": 0.7,  # the labeller's expected agreement with the gold ranking (humans: ~0.63-0.73)
      "mix_earlier": 0.0,  # online arm: fraction of a round's pairs from earlier rounds' policies
      "pm_init": "lm",  # "lm": each round's PM from the pretrained LM; "warm": from the previous round's PM
      "policy_init": "initial",  # "initial" (Bai et al.) or "previous": continue the last round's policy
      "arms": ARMS,
      "seeds": (0,),
      "eval_pairs": 64,  # held-out gold-ranked pairs per policy for the PM-accuracy measurement
      "elo_prompts": 64,
  })


def online_config(config) -> ml_collections.ConfigDict:
  c = online_section()
  override(c, config.get("online", {}), "online")
  unknown = sorted(set(c.arms) - set(ARMS))
  if unknown or not c.arms:
    raise ConfigError(f"online.arms={tuple(c.arms)}: expected some of {ARMS}")
  if c.pm_init not in ("lm", "warm") or c.policy_init not in ("initial", "previous"):
    raise ConfigError(f"online.pm_init={c.pm_init!r} (expected 'lm' or 'warm'), online.policy_init="
                      f"{c.policy_init!r} (expected 'initial' or 'previous')")
  if c.rounds < 1 or c.pairs_per_round < 1 or not 0.0 <= c.mix_earlier <= 1.0:
    raise ConfigError(f"online: rounds={c.rounds} and pairs_per_round={c.pairs_per_round} must be >= 1, "
                      f"mix_earlier={c.mix_earlier} in [0, 1]")
  return c


def stage_name(kind: str, arm: str, size: str, seed: int, r: int) -> str:
  """Round 0 (the initial policy's labels) is shared by every arm."""
  return f"{kind}_{'shared' if r == 0 else arm}_{size}_s{seed}_r{r}"


def _dir(workdir: str, *name) -> str:
  return storage.join(workdir, stage_name(*name))


def _sources(arm: str, r: int, n: int, mix: float, workdir: str, size: str, seed: int, initial: str) -> list[str]:
  """The policy run each of a round's n pairs is sampled from."""
  if arm == "static" or r == 0:
    return [initial] * n
  earlier = [initial] + [_dir(workdir, "ppo", arm, size, seed, q) for q in range(r - 1)]
  rng = np.random.default_rng([seed, r])
  mixed = rng.random(n) < mix
  return [earlier[rng.integers(len(earlier))] if m else _dir(workdir, "ppo", arm, size, seed, r - 1) for m in mixed]


def apply_labeller(records: list[dict], agreement: float, rng: np.random.Generator) -> tuple[list[dict], dict]:
  """records are gold-ranked (chosen = the gold PM's pick, gold_margin >= 0); the labeller keeps a
  pair's order with probability sigmoid(margin / tau) and swaps it otherwise."""
  margins = np.array([r["gold_margin"] for r in records], np.float64)
  tau = tau_for_agreement(margins, agreement)
  keep = noisy_preferences(margins, np.zeros_like(margins), tau, rng)
  out = [r if k else {**r, "chosen": r["rejected"], "rejected": r["chosen"]} for r, k in zip(records, keep)]
  return out, {"tau": tau, "agreement": float(keep.mean()) if len(keep) else float("nan"),
               "expected_agreement": expected_agreement(margins, tau)}


def _labels_stage(config, workdir: str, arm: str, size: str, seed: int, r: int) -> Stage:
  rl, on = stage_configs.ppo_config(config, workdir, size), online_config(config)
  initial, gold_dir = stage_configs.policy_dir(config, workdir, size), storage.join(workdir, f"pm_{stage_configs.GOLD}")
  n = on.pairs_per_round
  sources = _sources(arm, r, n, on.mix_earlier, workdir, size, seed, initial)
  # Only what this round's labels depend on: more rounds or seeds later leave it valid.
  settings = {"labels": config.labels.to_dict(), "data": rl.data.to_dict(), "prompt_len": rl.sampling.prompt_len,
              "sources": sorted(set(sources)), "seed": seed,
              **{k: on[k] for k in ("pairs_per_round", "agreement", "mix_earlier")}}

  def run(d):
    from rlhf_jax.data.prompts import prompt_texts
    from rlhf_jax.data.tokenizer import same_tokenizer
    from rlhf_jax.training.saved_runs import load_policy
    mesh = shd.make_mesh(rl.mesh.shape)
    tok = with_chat_format(same_tokenizer(initial, gold_dir), rl)
    train_prompts, _ = prompt_texts(rl, d)
    start = r * n  # fresh prompts every round (cycling when they run out)
    prompts = [train_prompts[(start + i) % len(train_prompts)] for i in range(n)]
    gold = sweep._frozen(gold_dir, mesh)
    records, ties = [], 0
    for source in sorted(set(sources)):
      mine = [p for p, s in zip(prompts, sources) if s == source]
      got, report = sweep.gold_labels(
          load_policy(source, mesh), gold, tok, mine, num_pairs=len(mine), prompt_len=rl.sampling.prompt_len,
          max_new_tokens=config.labels.max_new_tokens or rl.sampling.max_new_tokens,
          temperature=config.labels.temperature, batch_size=config.labels.batch_size, seed=1000 * seed + r)
      records += [{**x, "round": r, "source": storage.basename(source)} for x in got]
      ties += report["ties_not_written"]
    records, report = apply_labeller(records, on.agreement, np.random.default_rng([seed, r, 7]))
    union = [x for q in range(r) for x in read_jsonl(storage.join(_dir(workdir, "labels", arm, size, seed, q),
                                                                  "labels.jsonl"))]
    if hosts.is_lead():
      write_jsonl(storage.join(d, "labels.jsonl"), records)
      write_jsonl(storage.join(d, "union.jsonl"), union + records)
    barrier(f"labels {arm} {size} {seed} {r}")
    return {**report, "num_pairs": len(records), "ties_not_written": ties, "labels_so_far": len(union) + len(records)}
  reads = (*sorted({storage.basename(s) for s in sources}), storage.basename(gold_dir),
           *(stage_name("labels", arm, size, seed, q) for q in range(r)))
  return Stage(stage_name("labels", arm, size, seed, r), settings, run, reads)


def _summary(stage_dir: str) -> dict:
  return json.loads(storage.read_text(storage.join(stage_dir, STAGE_DONE)))["summary"]


def _sampling_kwargs(rl, tok) -> dict:
  return {"max_new_tokens": rl.sampling.max_new_tokens, "temperature": rl.sampling.temperature,
          "eos_id": tok.eos_id, "pad_id": tok.pad_id, "eoc_id": tok.eoc_id}


def pair_accuracy(pm_scores: np.ndarray, gold_scores: np.ndarray) -> tuple[float, int]:
  """How often a PM orders pairs [n, 2] as the gold PM does (gold ties left out, PM ties half)."""
  pm_d = np.asarray(pm_scores, np.float64)[:, 0] - np.asarray(pm_scores, np.float64)[:, 1]
  gold_d = np.asarray(gold_scores, np.float64)[:, 0] - np.asarray(gold_scores, np.float64)[:, 1]
  ranked = gold_d != 0
  agree = np.where(pm_d[ranked] == 0, 0.5, (np.sign(pm_d[ranked]) == np.sign(gold_d[ranked])).astype(float))
  return (float(agree.mean()) if agree.size else float("nan")), int(ranked.sum())


def _eval_stage(config, workdir: str, arm: str, size: str, seed: int, r: int) -> Stage:
  rl, on = stage_configs.ppo_config(config, workdir, size), online_config(config)
  settings = {"eval_pairs": on.eval_pairs, "data": rl.data.to_dict(), "ppo": rl.ppo.to_dict(),
              "sampling": rl.sampling.to_dict(), "seed": seed}

  def run(d):
    from rlhf_jax.data.prompts import held_out_prompts
    from rlhf_jax.data.tokenizer import same_tokenizer
    from rlhf_jax.trainers.best_of_n import sample_scores
    from rlhf_jax.training.saved_runs import FrozenModel, load_policy
    mesh = shd.make_mesh(rl.mesh.shape)
    initial = stage_configs.policy_dir(config, workdir, size)
    gold_dir = storage.join(workdir, f"pm_{stage_configs.GOLD}")
    ppo_dir, pm_dir = _dir(workdir, "ppo", arm, size, seed, r), _dir(workdir, "pm", arm, size, seed, r)
    tok = same_tokenizer(initial, gold_dir)
    cfg = rl.copy_and_resolve_references()
    cfg.eval.num_prompts = on.eval_pairs
    held_out = held_out_prompts(cfg, tok, d)
    judges = {"pm": FrozenModel(pm_dir, mesh), "gold": FrozenModel(gold_dir, mesh)}
    acc = {}
    for tag, run_dir in (("policy", ppo_dir), ("initial", initial)):
      s = sample_scores(load_policy(run_dir, mesh), judges, held_out.in_order()[0], 2,
                        jax.random.PRNGKey(seed), **_sampling_kwargs(rl, tok))
      acc[tag], _ = pair_accuracy(s["pm"], s["gold"])
    evals = {m["step"]: m for m in read_metrics(ppo_dir) if "eval_kl" in m}
    last, first = evals[max(evals)], evals[min(evals)]
    labels = _summary(_dir(workdir, "labels", arm, size, seed, r))
    row = {"arm": arm, "size": size, "seed": seed, "round": r, "labels_so_far": labels["labels_so_far"],
           "kl": float(last["eval_kl"]), "sqrt_kl": float(np.sqrt(max(last["eval_kl"], 0.0))),
           "proxy": float(last["eval_pm_reward"]), "gold": float(last[f"eval_pm_{stage_configs.GOLD}_reward"]),
           "gold_initial": float(first[f"eval_pm_{stage_configs.GOLD}_reward"]),
           "pm_acc_on_policy": acc["policy"], "pm_acc_on_initial": acc["initial"],
           "agreement": labels["agreement"], "tau": labels["tau"]}
    return row
  reads = (storage.basename(stage_configs.policy_dir(config, workdir, size)), f"pm_{stage_configs.GOLD}",
           *(stage_name(kind, arm, size, seed, r) for kind in ("labels", "pm", "ppo")))
  return Stage(stage_name("eval", arm, size, seed, r), settings, run, reads)


def _round_stages(config, workdir: str, arm: str, size: str, seed: int, r: int) -> list[Stage]:
  from rlhf_jax.trainers import train_pm, train_ppo
  on = online_config(config)
  pm = stage_configs.pm_config(config, workdir, size)
  pm.data.path = storage.join(_dir(workdir, "labels", arm, size, seed, r), "union.jsonl")
  pm.train.seed = seed
  if on.pm_init == "warm" and r > 0:
    pm.init_from = _dir(workdir, "pm", arm, size, seed, r - 1)
  ppo = stage_configs.ppo_config(config, workdir, size)
  ppo.pm_dir = _dir(workdir, "pm", arm, size, seed, r)
  ppo.train.seed = seed
  if on.policy_init == "previous" and r > 0:
    ppo.init_policy_from = _dir(workdir, "ppo", arm, size, seed, r - 1)
  return [_labels_stage(config, workdir, arm, size, seed, r),
          sweep.trained(stage_name("pm", arm, size, seed, r), train_pm.train, pm, workdir),
          sweep.trained(stage_name("ppo", arm, size, seed, r), train_ppo.train, ppo, workdir),
          _eval_stage(config, workdir, arm, size, seed, r)]


def contestants(config, workdir: str, size: str, seed: int) -> dict[str, str]:
  """{name: policy run} of every round's policy, the initial policy first."""
  on = online_config(config)
  out = {"initial": stage_configs.policy_dir(config, workdir, size)}
  for arm in on.arms:
    for r in range(on.rounds):
      out.setdefault("r0" if r == 0 else f"{arm}_r{r}", _dir(workdir, "ppo", arm, size, seed, r))
  return out


def _elo_stage(config, workdir: str, size: str, seed: int) -> Stage:
  rl, on = stage_configs.ppo_config(config, workdir, size), online_config(config)
  runs = contestants(config, workdir, size, seed)
  settings = {"elo_prompts": on.elo_prompts, "contestants": runs, "data": rl.data.to_dict(), "seed": seed}

  def run(d):
    from rlhf_jax.data.prompts import held_out_prompts
    from rlhf_jax.data.tokenizer import same_tokenizer
    from rlhf_jax.evals import policy_elo
    from rlhf_jax.training.saved_runs import load_policy
    mesh = shd.make_mesh(rl.mesh.shape)
    gold_dir = storage.join(workdir, f"pm_{stage_configs.GOLD}")
    tok = same_tokenizer(runs["initial"], gold_dir)
    cfg = rl.copy_and_resolve_references()
    cfg.eval.num_prompts = on.elo_prompts
    held_out = held_out_prompts(cfg, tok, d)
    players = [policy_elo.Contestant(name, load_policy(path, mesh)) for name, path in runs.items()]
    result = policy_elo.evaluate(players, sweep._frozen(gold_dir, mesh), held_out.in_order()[0],
                                 jax.random.PRNGKey(seed), **_sampling_kwargs(rl, tok))
    return {"elo": result["elo"], "elo_ci": result["elo_ci"]}
  reads = (*dict.fromkeys(storage.basename(path) for path in runs.values()), f"pm_{stage_configs.GOLD}")
  return Stage(f"elo_{size}_s{seed}", settings, run, reads)


def plan(config, workdir: str) -> list[Stage]:
  if config.setup != "gold_pm":
    raise ConfigError(f"setup={config.setup!r}: iterated online RLHF labels with the gold PM (setup='gold_pm')")
  on = online_config(config)
  stages = sweep.base_stages(config, workdir)
  for seed in on.seeds:
    for size in config.sizes:
      for r in range(on.rounds):
        for arm in on.arms if r else on.arms[:1]:
          stages += _round_stages(config, workdir, arm, size, seed, r)
      stages.append(_elo_stage(config, workdir, size, seed))
  return stages


def collect(config, workdir: str) -> list[dict]:
  """One row per (seed, size, arm, round), round 0 repeated under every arm, with its Elo."""
  on, rows = online_config(config), []
  for seed in on.seeds:
    for size in config.sizes:
      elo = _summary(storage.join(workdir, f"elo_{size}_s{seed}"))
      for arm in on.arms:
        for r in range(on.rounds):
          row = {**_summary(_dir(workdir, "eval", arm, size, seed, r)), "arm": arm}
          name = "r0" if r == 0 else f"{arm}_r{r}"
          rows.append({**row, "elo": elo["elo"][name], "elo_ci": elo["elo_ci"][name],
                       "elo_initial": elo["elo"]["initial"]})
  return rows


def run_online(config, workdir: str, *, stop_after: str = "") -> dict[str, Any]:
  timings = run_stages(plan(config, workdir), workdir, stop_after=stop_after)
  if stop_after:
    return {"stopped_after": stop_after, "timings": timings}
  out = {"results": storage.join(workdir, ONLINE_FILE), "timings": timings}
  if hosts.is_lead():
    write_jsonl(out["results"], collect(config, workdir))
    from rlhf_jax.analysis import online as online_analysis
    out["analysis"] = online_analysis.analyse(workdir)
  return out


def main_factory() -> Callable:
  return experiment_main(run_online, "experiments/online_tiny.py")

