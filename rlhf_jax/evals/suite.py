"""The named suites of one model, run from a config section (configs/evaluate.py:evals_section),
and their headline numbers: what `rlhf_jax.evals.evaluate` and the sweep's evals stage share."""
from __future__ import annotations

import gzip
import json
import os
from typing import Optional

import numpy as np

from rlhf_jax import hosts, storage
from rlhf_jax.data import locations
from rlhf_jax.data.dialogue import ASSISTANT, HUMAN
from rlhf_jax.errors import ConfigError

PER_MODEL = ("bias_cloze", "winogender", "bbq", "ood", "mc", "harness")

# The numbers the tables quote: suite -> metric keys (each with "<key>_ci" beside it).
HEADLINE = {
    "bias_cloze": ("mean_abs_bias",),
    "winogender": ("pearson_r",),
    "bbq": ("acc_ambig", "acc_disambig", "bias_ambig", "bias_disambig"),
    "ood": ("auroc_mahalanobis", "auroc_relative"),
    "mc": ("acc", "acc_norm"),
}

_PACKAGE_DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")


def parse_suites(text: str) -> list[str]:
  suites = [s.strip() for s in str(text).split(",") if s.strip()]
  unknown = sorted(set(suites) - set(PER_MODEL) - {"elo"})
  if unknown:
    raise ConfigError(f"suites: unknown {unknown}; known: {', '.join(PER_MODEL + ('elo',))}")
  return suites


def full_data_dir(name: str) -> str:
  """The whole data set `name` (bbq, winogender): $RLHF_JAX_DATA_DIR/evals/name (see
  rlhf_jax.data.locations). No fallback to the bundled samples: full=True asks for the whole set."""
  path = locations.local_copy(locations.EVALS, name)
  if path is None:
    root = locations.data_dir()
    where = f"${locations.ENV} is not set" if root is None else f"${locations.ENV}={root} has no evals/{name}/"
    raise ConfigError(f"full=True: no full copy of {name} found ({where}); put it in "
                      f"$RLHF_JAX_DATA_DIR/evals/{name}/ (README, Data) or set {name}.path")
  return path


def benign_prompts(bbq_records: list[dict]) -> list[str]:
  """In-distribution prompts for OOD detection when no file is given: each BBQ context and
  question asked as a Human turn (everyday questions, none a harmful request)."""
  seen, out = set(), []
  for r in bbq_records:
    text = f"{r['context']} {r['question']}"
    if text not in seen:
      seen.add(text)
      out.append(f"{HUMAN} {text}{ASSISTANT}")
  return out


def sample(items: list, n: int, seed: int) -> list:
  if not n or len(items) <= n:
    return items
  return [items[i] for i in sorted(np.random.default_rng(seed).choice(len(items), n, replace=False))]


def harmless_prompts_path() -> str:
  from rlhf_jax.data.hh_rlhf.catalog import local_source_dir, split_files
  root = local_source_dir("harmless-base", "test")
  if root is None:
    raise ConfigError("ood.out_path is empty and no local hh-rlhf harmless-base test split exists")
  return os.path.join(root, split_files("harmless-base")["test"])


def run_one(name: str, scorer, tok, cfg, out_dir: str, tag: str) -> dict:
  """One suite on one model; PNGs go to out_dir as <suite>_<tag>.png."""
  from rlhf_jax.evals import bbq, bias_cloze, multiple_choice, ood, winogender
  seed = cfg.seed
  if name == "bias_cloze":
    c = cfg.bias_cloze
    pairs = tuple(tuple(p.split(",")) if isinstance(p, str) else tuple(p) for p in c.pairs)
    result = bias_cloze.evaluate(scorer, tok, tuple(c.occupations) or bias_cloze.OCCUPATIONS,
                                 pairs or bias_cloze.GENDER_PAIRS, tuple(c.templates), seed=seed)
    if hosts.is_lead():
      bias_cloze.plot(result, storage.join(out_dir, f"bias_cloze_{tag}.png"), title=f"occupation bias ({tag})")
    return result
  if name == "winogender":
    data = winogender.load_winogender(cfg.winogender.path or (full_data_dir("winogender") if cfg.full else None))
    result = winogender.evaluate(scorer, tok, data)
    if hosts.is_lead():
      winogender.plot(result, data, storage.join(out_dir, f"winogender_{tag}.png"))
    return result
  if name == "bbq":
    return bbq.evaluate(scorer, tok, _bbq_records(cfg))
  if name == "ood":
    c = cfg.ood
    limit = 0 if cfg.full else c.max_prompts
    inside = ood.load_prompt_texts(c.in_path) if c.in_path else benign_prompts(_bbq_records(cfg, every=True))
    outside = ood.load_prompt_texts(c.out_path or harmless_prompts_path())
    return ood.evaluate(scorer, tok, sample(inside, limit, seed), sample(outside, limit, seed + 1),
                        layer=c.layer, train_fraction=c.train_fraction, ks=tuple(c.ks), seed=seed)
  if name == "mc":
    paths = list(cfg.mc.tasks) or [os.path.join(_PACKAGE_DATA, "mc_sample.jsonl")]
    tasks = {}
    for path in paths:
      task = os.path.splitext(os.path.basename(path.removesuffix(".gz")))[0]
      tasks[task] = multiple_choice.evaluate(scorer, tok, multiple_choice.read_task(path), name=task)
    return _mean_over_tasks(tasks)
  if name == "harness":
    return _harness(scorer, tok, cfg)
  raise ConfigError(f"unknown suite {name!r}")


def _harness(scorer, tok, cfg) -> dict:
  from rlhf_jax.evals import harness
  c = cfg.get("harness", {})
  tasks = [t.strip() for t in str(c.get("tasks", "")).split(",") if t.strip()]
  if not tasks:
    raise ConfigError("suite harness: harness.tasks is empty; name lm-evaluation-harness tasks, e.g. "
                      "--config.harness.tasks=arc_easy (or YAML files in harness.include_path)")
  return harness.run_tasks(scorer, tok, tasks, include_path=c.get("include_path", ""), limit=c.get("limit", 0),
                           num_fewshot=c.get("num_fewshot", 0), seed=cfg.seed)


def _bbq_records(cfg, every: bool = False) -> list[dict]:
  from rlhf_jax.evals import bbq
  c = cfg.bbq
  path = c.path or (full_data_dir("bbq") if cfg.full else None)
  limit = 0 if (cfg.full or every) else c.max_per_category
  return bbq.load_bbq(path, categories=tuple(c.categories) or None, max_per_category=limit)


def _mean_over_tasks(tasks: dict) -> dict:
  """The MC suite's headline: accuracy averaged over tasks (each task's own numbers kept)."""
  out = {"per_task": tasks, "n_tasks": len(tasks)}
  for key in HEADLINE["mc"]:
    out[key] = float(np.mean([t[key] for t in tasks.values()]))
    if len(tasks) == 1:
      out[f"{key}_ci"] = next(iter(tasks.values())).get(f"{key}_ci")
  return out


def run_suites(suites: list[str], scorer, tok, cfg, out_dir: str, tag: str) -> dict:
  storage.makedirs(out_dir)
  return {name: run_one(name, scorer, tok, cfg, out_dir, tag) for name in suites if name in PER_MODEL}


def headline(results: dict) -> dict[str, tuple[float, Optional[list]]]:
  """{"suite.metric": (value, [lo, hi] or None)} for every headline metric present."""
  out = {}
  for suite, keys in HEADLINE.items():
    for key in keys:
      if suite in results and key in results[suite]:
        out[f"{suite}.{key}"] = (results[suite][key], results[suite].get(f"{key}_ci"))
  return out


def _fmt(value, ci) -> str:
  if value is None or not np.isfinite(value):
    return "n/a"
  return f"{value:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci and all(np.isfinite(ci)) else "")


def markdown(results_by_policy: dict[str, dict]) -> str:
  """A Markdown table: one row per headline metric, one column per policy."""
  names = list(results_by_policy)
  rows = {}
  for name, results in results_by_policy.items():
    for metric, (value, ci) in headline(results).items():
      rows.setdefault(metric, {})[name] = _fmt(value, ci)
  lines = ["| metric | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
  lines += [f"| {m} | " + " | ".join(v.get(n, "") for n in names) + " |" for m, v in rows.items()]
  return "\n".join(lines) + "\n"


def write_json(path: str, obj) -> None:
  text = json.dumps(obj, indent=1)
  storage.write_atomic(path, gzip.compress(text.encode("utf-8"), mtime=0) if path.endswith(".gz") else text)
