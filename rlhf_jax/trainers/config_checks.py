"""A run's config checked before anything is built: impossible values, the model a run inherits
from the run it starts from, the runs PPO reads, and batches larger than the data.

Every failure is a ConfigError naming the setting (`train.steps=-3: ...`), reported by the entry
points as one line with exit status 2, instead of a failure deep inside orbax or a batcher.
"""
from __future__ import annotations

import json
import math

import ml_collections

from rlhf_jax import storage
from rlhf_jax.errors import ConfigError
from rlhf_jax.hf import config as hf_config
from rlhf_jax.hf import gguf_model
from rlhf_jax.model.config import ModelConfig, get_preset

TRAIN_COUNTS = ("steps", "batch_size", "log_every", "eval_every", "checkpoint_every", "keep_checkpoints")
PPO_COUNTS = ("rollout_batch", "num_minibatches", "epochs")
SAMPLING_COUNTS = ("prompt_len", "max_new_tokens")
OBJECTIVES = ("pretrain", "sft", "distill")
# rlhf_jax.trainers.ppo_steps.ALGORITHMS (not imported: no jax here)
ALGORITHMS = ("ppo", "rloo", "grpo", "dr_grpo", "gspo", "dapo")


def _positive(section, key: str, where: str) -> None:
  value = section[key]
  if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
    raise ConfigError(f"{where}.{key}={value!r}: must be a positive integer")


def run_model(run_dir: str, field: str) -> dict:
  """The `model` section of a finished run's config.json (or of a HuggingFace model's, for
  `hf:DIR`, or a GGUF file's, for `gguf:FILE`); `field` names the setting that points there, for the error."""
  if not run_dir:
    raise ConfigError(f"{field} is not set: it must name a finished run directory")
  if run_dir.startswith(hf_config.PREFIX):  # a HuggingFace directory, imported when the run starts
    return hf_config.model_of_reference(run_dir, field)
  if gguf_model.is_gguf(run_dir):  # a GGUF file, likewise
    return gguf_model.model_of_reference(run_dir, field)
  path = storage.join(run_dir, "config.json")
  if not storage.isfile(path):
    raise ConfigError(f"{field}={run_dir}: no config.json there (not a run directory)")
  ckpt_dir = storage.join(run_dir, "checkpoints")
  if not storage.isdir(ckpt_dir) or not any(p.isdigit() for p in storage.listdir(ckpt_dir)):
    raise ConfigError(f"{field}={run_dir}: no checkpoint in {ckpt_dir} (the run never saved one)")
  return json.loads(storage.read_text(path))["model"]


def _model(model: dict, where: str) -> ModelConfig:
  try:
    return ModelConfig.from_dict(model)
  except (ValueError, TypeError) as e:
    raise ConfigError(f"{where}: {e}") from None


def _check_common(config, kind: str) -> None:
  t = config.train
  for key in TRAIN_COUNTS + {"ppo": (), "dpo": ("seq_len",)}.get(kind, ("seq_len", "grad_accum")):
    _positive(t, key, "train")
  if kind in ("lm", "pm") and t.batch_size % t.grad_accum:
    raise ConfigError(f"train.batch_size={t.batch_size} must be divisible by train.grad_accum={t.grad_accum}")
  if t.get("max_nonfinite_skips", 0) < 0:
    raise ConfigError(f"train.max_nonfinite_skips={t.max_nonfinite_skips}: must be >= 0")
  lr = config.optimizer.learning_rate
  if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
    raise ConfigError(f"optimizer.learning_rate={lr!r}: must be a positive finite number")
  d = config.data
  split_by_fraction = not d.get("eval_split") or (kind == "ppo" and d.get("prompts_path"))
  if split_by_fraction and not 0 < d.eval_fraction < 1:
    raise ConfigError(f"data.eval_fraction={d.eval_fraction!r}: must lie strictly between 0 and 1 "
                      f"(the held-out share of the data)")


def validate(config, kind: str) -> None:
  """kind: "lm", "pm", "ppo" or "dpo" (which trainer runs the config)."""
  if kind not in ("lm", "pm", "ppo", "dpo"):
    raise ValueError(f"kind={kind!r}")
  _check_common(config, kind)
  if kind == "dpo":
    _check_dpo(config)
    return
  if kind == "lm" and config.objective not in OBJECTIVES:
    raise ConfigError(f"objective={config.objective!r}: expected one of {OBJECTIVES}")
  if kind != "ppo":
    cfg = _model(config.model.to_dict(), "model")
    if config.train.seq_len > cfg.max_seq_len:
      raise ConfigError(f"train.seq_len={config.train.seq_len} is beyond model.max_seq_len={cfg.max_seq_len}")
    if config.get("init_from"):
      run_model(config.init_from, "init_from")
    return
  c = config.ppo
  for key in PPO_COUNTS:
    _positive(c, key, "ppo")
  for key in SAMPLING_COUNTS:
    _positive(config.sampling, key, "sampling")
  if c.rollout_batch % c.num_minibatches:
    raise ConfigError(f"ppo.rollout_batch={c.rollout_batch} must be divisible by "
                      f"ppo.num_minibatches={c.num_minibatches}")
  algorithm, k = config.get("algorithm", "ppo"), c.get("samples_per_prompt", 1)
  if algorithm not in ALGORITHMS:
    raise ConfigError(f"algorithm={algorithm!r}: expected one of {ALGORITHMS}")
  if "samples_per_prompt" in c:
    _positive(c, "samples_per_prompt", "ppo")
  if algorithm != "ppo" and k < 2:
    raise ConfigError(f"algorithm={algorithm} compares samples of one prompt: ppo.samples_per_prompt={k} "
                      f"must be at least 2")
  if c.rollout_batch % k:
    raise ConfigError(f"ppo.rollout_batch={c.rollout_batch} must be divisible by ppo.samples_per_prompt={k}")
  _check_clip_and_overlong(c, config.sampling)
  if config.value_from not in ("pm", "shared"):
    raise ConfigError(f"value_from={config.value_from!r}: expected 'pm' or 'shared'")
  _check_ppo_runs(config)


def _check_dpo(config) -> None:
  for key in SAMPLING_COUNTS:
    _positive(config.sampling, key, "sampling")
  beta, loss = config.dpo.beta, config.dpo.loss
  if not (isinstance(beta, (int, float)) and not isinstance(beta, bool) and math.isfinite(beta) and beta > 0):
    raise ConfigError(f"dpo.beta={beta!r}: must be a positive finite number")
  if loss not in ("dpo", "ipo", "slic"):
    raise ConfigError(f"dpo.loss={loss!r}: expected 'dpo', 'ipo' or 'slic'")
  _check_ppo_runs(config)
  policy = _model(run_model(config.policy_from, "policy_from"), f"policy_from={config.policy_from}")
  if config.train.seq_len > policy.max_seq_len:
    raise ConfigError(f"train.seq_len={config.train.seq_len} is beyond the max_seq_len={policy.max_seq_len} "
                      f"of policy_from={config.policy_from}")


def _check_clip_and_overlong(c, sampling) -> None:
  high, buffer = c.get("clip_eps_high", 0.0), c.get("overlong_buffer", 0)
  if not c.clip_eps > 0:
    raise ConfigError(f"ppo.clip_eps={c.clip_eps} must be positive")
  if high < 0:
    raise ConfigError(f"ppo.clip_eps_high={high} must be positive (0 = the same as clip_eps)")
  if high and high < c.clip_eps:
    raise ConfigError(f"ppo.clip_eps_high={high} is below ppo.clip_eps={c.clip_eps}: clip-higher (DAPO) "
                      f"widens the upper clip only (0 = the same as clip_eps)")
  if not c.get("tis_cap", 1.0) > 0:
    raise ConfigError(f"ppo.tis_cap={c.tis_cap} must be positive: the largest importance weight kept")
  if not 0 <= buffer <= sampling.max_new_tokens:
    raise ConfigError(f"ppo.overlong_buffer={buffer} must be in [0, sampling.max_new_tokens="
                      f"{sampling.max_new_tokens}] (0 = no overlong penalty)")


def _check_ppo_runs(config) -> None:
  runs = {"policy_from": config.policy_from, "pm_dir": config.pm_dir}
  runs |= {f"eval.pm_dirs[{i}]": d for i, d in enumerate(config.eval.pm_dirs)}
  models = {field: _model(run_model(d, field), f"{field}={d}") for field, d in runs.items()}
  vocab = {f"{field}={runs[field]}": m.vocab_size for field, m in models.items()}
  if len(set(vocab.values())) > 1:
    raise ConfigError(f"the policy and the PMs must share one vocabulary; vocab_size: {vocab}")
  # Sequences are [prompt | response | end-of-context] for the PMs, [prompt | response] for the policy.
  length = config.sampling.prompt_len + config.sampling.max_new_tokens + 1
  for field, m in models.items():
    if length > m.max_seq_len:
      raise ConfigError(f"sampling.prompt_len + sampling.max_new_tokens + 1 = {length} is beyond the "
                        f"max_seq_len={m.max_seq_len} of {field}={runs[field]}")


def inherit_model_config(config) -> ml_collections.ConfigDict:
  """config with the model of the run in config.init_from (a run starting from another's weights
  has that run's shape). A model field set explicitly (different from the preset's default) that
  contradicts the inherited one is an error naming it."""
  if not config.get("init_from"):
    return config
  inherited = run_model(config.init_from, "init_from")
  mine = config.model.to_dict()
  defaults = get_preset(config.preset).to_dict() if config.get("preset") else {}
  conflicts = {k: (v, inherited.get(k)) for k, v in mine.items()
               if k in defaults and v != defaults[k] and v != inherited.get(k)}
  if conflicts:
    detail = ", ".join(f"model.{k}={a!r} but {b!r} there" for k, (a, b) in sorted(conflicts.items()))
    raise ConfigError(f"init_from={config.init_from} has another model shape: {detail}; drop the "
                      f"override or start from a run of that shape")
  out = config.copy_and_resolve_references()
  with out.unlocked():
    out.model = ml_collections.ConfigDict({**mine, **inherited})
  return out


def check_batch_fits(num_examples: int, batch_size: int, field: str, what: str) -> None:
  """A batch must not be larger than the data it is drawn from (it would repeat examples)."""
  if batch_size > num_examples:
    raise ConfigError(f"{field}={batch_size} is larger than the {num_examples} {what}")
