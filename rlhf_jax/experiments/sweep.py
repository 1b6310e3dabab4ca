"""The scaling experiment: reward against sqrt(KL) across model sizes, every stage cached.

  python -m rlhf_jax sweep --config=experiments/tiny_sweep.py [--workdir=runs/sweep_tiny]

For every size in config.sizes the sweep runs the whole pipeline and collects each
(size, method, step, KL, sqrt KL, proxy reward, gold reward) point into <workdir>/results.jsonl,
then fits and plots them (rlhf_jax.analysis.report) into <workdir>/analysis/.

Two setups (config.setup):
- "gold_pm" (Gao, Schulman and Hilton 2022): a larger gold PM trained on the human comparisons
  labels pairs of samples from each size's initial policy; that size's proxy PM is trained on the
  gold labels; the policy is optimised against the proxy while the gold PM scores it too.
- "halves" (Bai et al. 2022, section 4.3): proxy ("train") PMs on one half of the human
  comparisons, the gold-size "test" PM on the other half.

RL methods (config.methods): "ppo" (Bai et al.: value model, GAE), and the critic-free "rloo",
"grpo", "dr_grpo", "gspo" and "dapo" (config.<method> overrides config.rl for each; the variants'
formulas in rlhf_jax.objectives.critic_free), all through rlhf_jax.trainers.train_ppo with the
same KL-penalised reward; "dpo" (rlhf_jax.trainers.train_dpo, one stage per beta in config.dpo.betas) on
the comparisons the proxy PM is trained on, and "ipo" and "slic", the same with their losses. Every method is evaluated by the same function on the
same held-out prompts (KL against the initial policy, proxy and gold PM), beside best-of-N.

A size may name a checkpoint instead of a model to pretrain (config.models.<size> = {"from":
"hf:DIR"} or {"from": "gguf:FILE"}, rlhf_jax.experiments.checkpoint_sizes): its lm_<size> stage imports
it, and the sweep's tokenizer is the checkpoints' (every size and gold then names one, all with one
tokenizer); its results rows carry `source` and `source_hash`.

Each size's initial policy is its pretrained LM, or, with config.sft.objective = "sft" or
"distill", that LM fine-tuned on the Assistant turns or context-distilled (Bai et al. start RLHF
from context-distilled models); PMs start from the pretrained LM.

Seeds (config.seeds, default (0,)): every seed reruns the stages whose randomness matters, with
their seeds offset by it: pm_<size>, the RL and DPO runs and bon_<size>; a seed s > 0 suffixes
their names with _seed<s>. The LMs, SFT, gold PM, labels and evaluations (of the first seed's
PPO policy) are shared. Results rows carry their seed, and the analysis reports means over seeds
with 95% bootstrap intervals (rlhf_jax.analysis.intervals).

Stages (rlhf_jax.experiments.stages), each in its own subdirectory: [tokenizer], lm_<size>, [sft_<size>],
pm_gold, [labels_<size>], per seed: pm_<size>, ppo_<size>, [<method>_<size> for each critic-free
method, <dpo|ipo|slic>_<size>_beta<b>], bon_<size>; then [evals_<size>: rlhf_jax.evals.stage].
A finished stage is skipped on a rerun and an interrupted one resumes from its last checkpoint, so
a killed sweep is resumed by running the same command again; a stage that runs again (deleted by
hand) reruns the stages downstream of it too.
"""
from __future__ import annotations

import time
from typing import Any, Callable

import jax
import ml_collections
import numpy as np

from rlhf_jax import hosts, storage
from rlhf_jax.data.chat import with_chat_format
from rlhf_jax.data.lm_data import tokenizer_texts
from rlhf_jax.data.tokenizer import Tokenizer, train_tokenizer
from rlhf_jax.errors import ConfigError
from rlhf_jax.experiments import checkpoint_sizes
from rlhf_jax.experiments.stage_configs import (
  DIRECT_METHODS,
  GOLD,
  dpo_config,
  dpo_stage_name,
  lm_config,
  methods,
  model_config,
  pm_config,
  policy_dir,
  ppo_config,
  seeded,
  seeds,
  sft_config,
)
from rlhf_jax.experiments.stages import (
  Stage,
  StageInterrupted,
  barrier,
  config_inputs,
  experiment_main,
  override,
  run_stages,
  trainer_stage,
  write_jsonl,
)
from rlhf_jax.experiments.sweep_results import collect_results
from rlhf_jax.model.config import param_counts
from rlhf_jax.model.sampling import generate
from rlhf_jax.trainers.best_of_n import best_of_n
from rlhf_jax.trainers.ppo_steps import pm_score_jitted
from rlhf_jax.training import sharding as shd
from rlhf_jax.training.metrics import read_metrics

RESULTS_FILE = "results.jsonl"
SweepInterrupted = StageInterrupted  # the name older callers know


# --- configs of the stages ---------------------------------------------------------------------


# --- stages ------------------------------------------------------------------------------------


def _tokenizer_stage(config, workdir: str) -> Stage:
  cfg = lm_config(config, workdir, config.sizes[0])

  def run(d):
    texts = tokenizer_texts(cfg, d)  # the training dialogues, or a sample of data.corpus
    tok = train_tokenizer(texts, cfg.model.vocab_size, d)
    return {"vocab_size": tok.vocab_size, "num_texts": len(texts)}
  return Stage("tokenizer", {"data": cfg.data.to_dict(), "vocab_size": cfg.model.vocab_size}, run)


def _frozen(run_dir: str, mesh, normalised: bool = False):
  from rlhf_jax.training.saved_runs import FrozenModel
  return FrozenModel(run_dir, mesh, with_normalisation=normalised)


def gold_labels(policy, gold, tok: Tokenizer, prompts: list[str], *, num_pairs: int, prompt_len: int,
                max_new_tokens: int, temperature: float, batch_size: int, seed: int) -> tuple[list[dict], dict]:
  """Pairs of samples from `policy` for prompts (cycled), labelled by the gold PM: the response
  it scores higher is "chosen". Records are in the hh-rlhf format; pairs whose two responses are
  the same text cannot be labelled and are counted, not written."""
  from rlhf_jax.data.batching import Encoded
  from rlhf_jax.data.prompts import PromptBatcher
  rng = jax.random.PRNGKey(seed)
  records, ties, margins, start = [], 0, [], 0
  while len(records) + ties < num_pairs:
    chunk = [prompts[(start + i) % len(prompts)] for i in range(min(batch_size, num_pairs - len(records) - ties))]
    start += len(chunk)
    batch = PromptBatcher([Encoded(tok.encode_prompt(p), []) for p in chunk], batch_size=len(chunk),
                          seq_len=prompt_len, seed=0, pad_id=tok.pad_id).in_order()[0]
    rng, key = jax.random.split(rng)
    gen = generate(policy.params, np.repeat(batch["tokens"], 2, axis=0),
                   np.repeat(batch["attention_mask"], 2, axis=0), key, model=policy.model,
                   max_new_tokens=max_new_tokens, temperature=temperature, eos_id=tok.eos_id,
                   pad_id=tok.pad_id)
    scores = shd.to_host(pm_score_jitted(gold.model, gold.params, gen.prompt_tokens, gen.prompt_mask, gen.tokens,
                                         gen.mask, tok.eoc_id)).astype(np.float64).reshape(-1, 2)
    tokens, mask = shd.to_host(gen.tokens), shd.to_host(gen.mask)  # every host writes the same labels
    special = (tok.eos_id, tok.pad_id, tok.eoc_id)
    texts = [tok.decode([t for t, m in zip(row, ok) if m and t not in special]) for row, ok in zip(tokens, mask)]
    for i, prompt in enumerate(chunk):
      a, b = texts[2 * i], texts[2 * i + 1]
      if a == b:
        ties += 1
        continue
      first = scores[i, 0] >= scores[i, 1]
      records.append({"chosen": prompt + (a if first else b), "rejected": prompt + (b if first else a),
                      "gold_margin": float(abs(scores[i, 0] - scores[i, 1]))})
      margins.append(abs(scores[i, 0] - scores[i, 1]))
  return records, {"num_pairs": len(records), "ties_not_written": ties,
                   "mean_gold_margin": float(np.mean(margins)) if margins else float("nan")}


def _labels_stage(config, workdir: str, name: str) -> Stage:
  rl = ppo_config(config, workdir, name)
  lab = config.labels
  policy_name = lab.policy or name
  # labels.budgets {size: pairs} varies the proxy PM's label budget by size (Gao et al. 2023's other
  # axis); a size it does not name takes labels.num_pairs.
  budgets = dict(lab.get("budgets", None) or {})
  unknown = sorted(set(budgets) - set(config.sizes))
  if unknown:
    raise ConfigError(f"labels.budgets names {unknown}, which are not sizes of this sweep ({list(config.sizes)})")
  bad = {k: v for k, v in budgets.items() if not isinstance(v, int) or isinstance(v, bool) or v < 1}
  if bad:
    raise ConfigError(f"labels.budgets {bad}: each budget must be a positive number of pairs")
  num_pairs = int(budgets.get(name, lab.num_pairs))
  labels = lab.to_dict() if not budgets else {**lab.to_dict(), "budgets": None, "num_pairs": num_pairs}
  settings = {"labels": labels, "policy": policy_name, "data": rl.data.to_dict(),
              "prompt_len": rl.sampling.prompt_len}

  def run(d):
    from rlhf_jax.data.prompts import prompt_texts
    from rlhf_jax.data.tokenizer import same_tokenizer
    mesh = shd.make_mesh(rl.mesh.shape)
    policy, gold_dir = policy_dir(config, workdir, policy_name), storage.join(workdir, f"pm_{GOLD}")
    tok = with_chat_format(same_tokenizer(policy, gold_dir), rl)
    train_prompts, _ = prompt_texts(rl, d)  # labels only on training prompts; PPO evaluates on the rest
    records, report = gold_labels(
        _frozen(policy, mesh), _frozen(gold_dir, mesh), tok, train_prompts, num_pairs=num_pairs,
        prompt_len=rl.sampling.prompt_len, max_new_tokens=lab.max_new_tokens or rl.sampling.max_new_tokens,
        temperature=lab.temperature, batch_size=lab.batch_size, seed=lab.seed)
    if hosts.is_lead():
      write_jsonl(storage.join(d, "labels.jsonl"), records)
    barrier(f"labels_{name}")
    return report
  policy_stage = storage.basename(policy_dir(config, workdir, policy_name))
  return Stage(f"labels_{name}", settings, run, (policy_stage, f"pm_{GOLD}"))


def _bon_stage(config, workdir: str, name: str, seed: int = 0) -> Stage:
  rl = ppo_config(config, workdir, name, seed=seed)
  bon = config.bon
  settings = {"bon": bon.to_dict(), "ppo": rl.ppo.to_dict(), "sampling": rl.sampling.to_dict(),
              "data": rl.data.to_dict()}
  if seed:
    settings["seed"] = seed

  def run(d):
    from rlhf_jax.data.prompts import held_out_prompts
    from rlhf_jax.data.tokenizer import same_tokenizer
    mesh = shd.make_mesh(rl.mesh.shape)
    tok = same_tokenizer(rl.policy_from, rl.pm_dir, *rl.eval.pm_dirs)
    cfg = rl.copy_and_resolve_references()
    cfg.eval.num_prompts = bon.num_prompts or rl.eval.num_prompts
    eval_prompts = held_out_prompts(cfg, tok, d)  # the prompts PPO is evaluated on
    extra = {f"pm_{GOLD}": _frozen(rl.eval.pm_dirs[0], mesh, True)}
    policy, prompts = _frozen(rl.policy_from, mesh), eval_prompts.in_order()[0]
    first = None  # on the RL evaluation's prompts, its own samples: one KL = 0 point for every method
    if cfg.eval.num_prompts == rl.eval.num_prompts:
      from rlhf_jax.trainers.policy_eval import make_sampler
      first = make_sampler(rl.sampling, policy.model, tok)(policy.params, prompts["tokens"], prompts["attention_mask"],
                                                           jax.random.PRNGKey(rl.eval.seed))
    rows = best_of_n(policy, _frozen(rl.pm_dir, mesh, True), extra, prompts, list(bon.ns),
                     jax.random.PRNGKey(bon.seed + seed), max_new_tokens=rl.sampling.max_new_tokens,
                     temperature=rl.sampling.temperature, eos_id=tok.eos_id, pad_id=tok.pad_id, eoc_id=tok.eoc_id,
                     first=first, kl_reference=int(bon.get("kl_reference", 0)))
    if hosts.is_lead():
      write_jsonl(storage.join(d, "best_of_n.jsonl"), rows)
    return {"max_n": max(bon.ns)}
  # Its inputs are the initial policy and this seed's PMs, not PPO's run.
  return Stage(seeded(f"bon_{name}", seed), settings, run, config_inputs(rl, workdir))


def evals_config(config) -> ml_collections.ConfigDict:
  """configs/evaluate.py's suite settings, overridden by the sweep's `evals` section."""
  from configs.evaluate import evals_section
  c = evals_section()
  c.elo = ml_collections.ConfigDict({"bon_ns": (4, 16), "games": "soft"})  # judged by the gold PM
  override(c, config.get("evals", {}), "evals")
  return c


def _with_evals(config) -> bool:
  return config.get("evals") is not None and bool(evals_config(config).suites)


def _evals_stage(config, workdir: str, name: str) -> Stage:
  """The evaluations of the initial policy and of the first seed's PPO policy."""
  seed = seeds(config)[0]
  rl = ppo_config(config, workdir, name, seed=seed)
  ev = evals_config(config)
  settings = {"evals": ev.to_dict(), "ppo": rl.ppo.to_dict(), "sampling": rl.sampling.to_dict(),
              "data": rl.data.to_dict(), "eval": rl.eval.to_dict()}
  if seed:
    settings["seed"] = seed
  ppo_stage = seeded(f"ppo_{name}", seed)

  def run(d):
    from rlhf_jax.data.prompts import held_out_prompts
    from rlhf_jax.data.tokenizer import same_tokenizer
    from rlhf_jax.evals import stage, suite
    from rlhf_jax.training.saved_runs import load_policy
    mesh = shd.make_mesh(rl.mesh.shape)
    tok = same_tokenizer(rl.policy_from, rl.pm_dir, *rl.eval.pm_dirs)
    ppo_dir = storage.join(workdir, ppo_stage)
    initial = load_policy(rl.policy_from, mesh)
    out = {"size": name, "params": param_counts(model_config(config, name))["non_embedding"]}
    out |= stage.policy_evals({"initial": initial, "rlhf": load_policy(ppo_dir, mesh)}, tok, ev, d, mesh,
                              progress=config.progress_bar)
    if "elo" in suite.parse_suites(ev.suites):
      eval_prompts = held_out_prompts(rl, tok, d)  # the held-out prompts PPO is evaluated on
      kl = {m["step"]: float(m["eval_kl"]) for m in read_metrics(ppo_dir) if "eval_kl" in m}
      out["elo"] = stage.snapshot_elo(
          initial, ppo_dir, _frozen(rl.eval.pm_dirs[0], mesh), _frozen(rl.pm_dir, mesh), eval_prompts.in_order()[0],
          kl, mesh, bon_ns=tuple(ev.elo.bon_ns), games=ev.elo.games, seed=ev.seed,
          sampling={"max_new_tokens": rl.sampling.max_new_tokens, "temperature": rl.sampling.temperature,
                    "eos_id": tok.eos_id, "pad_id": tok.pad_id, "eoc_id": tok.eoc_id})
    if hosts.is_lead():
      suite.write_json(storage.join(d, "evals.json"), out)
      table = suite.markdown({"initial": out["initial"], "rlhf": out["rlhf"]})
      storage.write_atomic(storage.join(d, "evals.md"), table)
    return {tag: {k: v for k, (v, _) in suite.headline(out[tag]).items()} for tag in ("initial", "rlhf")}
  return Stage(f"evals_{name}", settings, run, (*config_inputs(rl, workdir), ppo_stage))


def base_stages(config, workdir: str) -> list[Stage]:
  """What every experiment on these sizes starts from: the tokenizer, each size's LM and gold LM
  (or, for checkpoint sizes, their imports and no tokenizer stage), the initial policies (SFT /
  distilled) and the gold PM."""
  from rlhf_jax.trainers import train_lm, train_pm
  if config.setup not in ("gold_pm", "halves"):
    raise ConfigError(f"setup={config.setup!r}: expected 'gold_pm' or 'halves'")
  if not config.sizes:
    raise ConfigError("config.sizes is empty")
  if GOLD in config.sizes:
    raise ConfigError(f"{GOLD!r} names the gold PM's size; rename that entry of config.sizes")
  # One tokenizer for every size, checked now rather than after hours of earlier stages.
  checkpoints = checkpoint_sizes.all_checkpoints(config, (*config.sizes, GOLD))
  vocab = {name: model_config(config, name).vocab_size for name in (*config.sizes, GOLD)}
  if checkpoints:
    # A family pads its embedding table to different sizes over one tokenizer (Qwen2.5: 151936 up
    # to 3B, 152064 from 7B); the gold PM scores every size's samples, so its table must hold their ids.
    larger = {name: v for name, v in vocab.items() if v > vocab[GOLD]}
    if larger:
      raise ConfigError(f"the gold model's vocab_size {vocab[GOLD]} is below that of sizes {larger}: it "
                        f"could not score their samples")
  elif len(set(vocab.values())) > 1:
    raise ConfigError(f"every size shares one tokenizer, but vocab_size differs: {vocab}")
  if checkpoints:  # each LM is its checkpoint, imported; the tokenizer is theirs
    stages = [checkpoint_sizes.import_stage(config, workdir, n, lm_config(config, workdir, n).mesh.shape)
              for n in (*config.sizes, GOLD)]
  else:
    stages = [_tokenizer_stage(config, workdir)]
    stages += [trained(f"lm_{n}", train_lm.train, lm_config(config, workdir, n), workdir)
               for n in (*config.sizes, GOLD)]
  if config.sft.objective:
    stages += [trained(f"sft_{n}", train_lm.train, sft_config(config, workdir, n), workdir) for n in config.sizes]
  stages.append(trained(f"pm_{GOLD}", train_pm.train, pm_config(config, workdir, GOLD), workdir))
  return stages


def trained(name: str, train: Callable, cfg, workdir: str) -> Stage:
  """A trainer stage whose inputs are the stages its config's paths point into (config_inputs)."""
  return trainer_stage(name, train, cfg, config_inputs(cfg, workdir))


def plan(config, workdir: str) -> list[Stage]:
  """The stages of the sweep, in the order they run."""
  from rlhf_jax.trainers import train_dpo, train_pm, train_ppo
  stages = base_stages(config, workdir)
  for n in config.sizes:
    if config.setup == "gold_pm":
      stages.append(_labels_stage(config, workdir, n))
    for seed in seeds(config):
      stages.append(trained(seeded(f"pm_{n}", seed), train_pm.train, pm_config(config, workdir, n, seed), workdir))
      for method in methods(config):
        if method in DIRECT_METHODS:
          stages += [trained(dpo_stage_name(n, b, seed, method), train_dpo.train,
                             dpo_config(config, workdir, n, b, seed, method), workdir) for b in config.dpo.betas]
        else:
          stages.append(trained(seeded(f"{method}_{n}", seed), train_ppo.train,
                                ppo_config(config, workdir, n, method, seed), workdir))
      stages.append(_bon_stage(config, workdir, n, seed))
    if _with_evals(config):
      stages.append(_evals_stage(config, workdir, n))
  return stages


# --- running and collecting --------------------------------------------------------------------


def run_sweep(config, workdir: str, *, stop_after: str = "") -> dict[str, Any]:
  """Runs (or resumes) every stage, then collects and analyses the results. stop_after names a
  stage to stop after (for partial runs)."""
  t_start = time.perf_counter()
  timings = run_stages(plan(config, workdir), workdir, stop_after=stop_after)
  if stop_after:
    return {"stopped_after": stop_after, "timings": timings}
  rows = collect_results(config, workdir)
  out = {"results": storage.join(workdir, RESULTS_FILE), "timings": timings,
         "seconds_this_run": time.perf_counter() - t_start}
  if hosts.is_lead():
    write_jsonl(out["results"], rows)
    from rlhf_jax.analysis import report  # matplotlib: imported only when there is something to plot
    out["analysis"] = report.analyse(workdir)
    if _with_evals(config):
      from rlhf_jax.analysis import evals as evals_analysis
      out["analysis"] |= evals_analysis.analyse(workdir, list(config.sizes))
  return out


# --- command line ------------------------------------------------------------------------------


def main_factory() -> Callable:
  return experiment_main(run_sweep, "experiments/tiny_sweep.py")

