"""Evaluates a trained policy: bias, abilities, OOD detection, Elo (rlhf_jax.evals).

  python -m rlhf_jax evaluate --config=configs/evaluate.py --config.policy_dir=runs/sweep_tiny/ppo_m \\
      [--config.suites=bias_cloze,winogender,bbq,ood,mc,elo] [--config.out_dir=DIR]
      [--config.elo.policies=runs/sweep_tiny/sft_m,runs/sweep_tiny/ppo_m@20 --config.elo.judge_dir=runs/sweep_tiny/pm_gold]

Writes <out_dir>/evals.json (every number), evals.md (the headline table with 95% intervals) and
PNG plots (bias_cloze_policy.png, winogender_policy.png).
"""
from __future__ import annotations

import jax
from absl import flags, logging
from ml_collections import config_flags

from rlhf_jax import hosts, storage
from rlhf_jax.data.tokenizer import Tokenizer, load_tokenizer
from rlhf_jax.errors import ConfigError
from rlhf_jax.evals import policy_elo, suite
from rlhf_jax.evals.loglik import Scorer
from rlhf_jax.training import sharding as shd


def _policy_ref(ref: str) -> tuple[str, int | None]:
  """RUN or RUN@STEP."""
  path, _, step = ref.partition("@")
  if step and not step.isdigit():
    raise ConfigError(f"{ref!r}: expected RUN or RUN@STEP with an integer step")
  return path, int(step) if step else None


def elo_prompts(tok: Tokenizer, texts: list[str], prompt_len: int) -> dict:
  from rlhf_jax.data.batching import Encoded
  from rlhf_jax.data.prompts import PromptBatcher
  return PromptBatcher([Encoded(tok.encode_prompt(t), []) for t in texts], batch_size=len(texts), seq_len=prompt_len,
                       seed=0, pad_id=tok.pad_id).in_order()[0]


def run_elo(config, mesh, tok: Tokenizer) -> dict:
  from rlhf_jax.evals.ood import load_prompt_texts
  from rlhf_jax.training.saved_runs import FrozenModel, load_policy
  c = config.elo
  if not c.judge_dir:
    raise ConfigError("suite elo needs elo.judge_dir (a PM run, e.g. a sweep's pm_gold)")
  others = [p.strip() for p in c.policies.split(",") if p.strip()]
  refs = [f"{config.policy_dir}@{config.step}" if config.step >= 0 else config.policy_dir, *others]
  contestants = []
  for ref in refs:
    path, step = _policy_ref(ref)
    contestants.append(policy_elo.Contestant(ref, load_policy(path, mesh, step)))
  texts = suite.sample(load_prompt_texts(c.prompts_path or suite.harmless_prompts_path()), c.num_prompts, config.seed)
  return policy_elo.evaluate(contestants, FrozenModel(c.judge_dir, mesh), elo_prompts(tok, texts, c.prompt_len),
                             jax.random.PRNGKey(config.seed), soft=c.games == "soft",
                             max_new_tokens=c.max_new_tokens, temperature=c.temperature, eos_id=tok.eos_id,
                             pad_id=tok.pad_id, eoc_id=tok.eoc_id)


def evaluate(config) -> dict:
  from rlhf_jax.training.saved_runs import load_policy
  if not config.policy_dir:
    raise ConfigError("--config.policy_dir is required (an LM, SFT or PPO run directory)")
  suites = suite.parse_suites(config.suites)
  mesh = shd.make_mesh(config.mesh.shape)
  policy = load_policy(config.policy_dir, mesh, None if config.step < 0 else config.step)
  tok = load_tokenizer(policy.tokenizer_dir)
  out_dir = config.out_dir or storage.join(config.policy_dir, "evals")
  scorer = Scorer(policy.params, policy.model.cfg, mesh, batch_size=config.batch_size, progress=config.progress_bar)
  results = {"policy_dir": storage.absolute(config.policy_dir), "step": policy.step}
  results |= suite.run_suites(suites, scorer, tok, config, out_dir, "policy")
  if "elo" in suites:
    results["elo"] = run_elo(config, mesh, tok)
  if hosts.is_lead():
    suite.write_json(storage.join(out_dir, "evals.json"), results)
    storage.write_atomic(storage.join(out_dir, "evals.md"),
                         suite.markdown({storage.basename(config.policy_dir): results}))
  return {"out_dir": out_dir, "results": results}


def main_factory():
  config_flag = config_flags.DEFINE_config_file("config", "configs/evaluate.py", "Evaluation config.",
                                                lock_config=True)

  def main(argv):
    del argv
    if not flags.FLAGS["verbosity"].present:
      logging.set_verbosity(logging.WARNING)
    out = evaluate(config_flag.value)
    print(storage.read_text(storage.join(out["out_dir"], "evals.md")))
    if "elo" in out["results"]:
      for name, elo in out["results"]["elo"]["elo"].items():
        print(f"elo {name}: {elo:+.0f}")
    print(f"written to {out['out_dir']}")

  return main

