"""Exports a run's model as a HuggingFace directory that standard tools load and serve.

  python -m rlhf_jax hf_export --run=RUN --out=DIR [--step=N] [--dtype=bfloat16]

RUN is any run with a policy: an LM / SFT run, or a PPO run (its policy). DIR gets
model.safetensors, config.json and tokenizer.model. A model imported from HuggingFace (through
init_from / policy_from) is written back with its source's config.json and tokenizer files and
each tensor in its source dtype (so an import exported untrained reproduces the source's tensors
exactly); a model trained here from scratch is written as a LlamaForCausalLM (or the family its
ModelConfig switches name: Gemma, Qwen2, Qwen3) in float32. A LoRA policy is written with its
adapters merged into the base's weights. A PM's
scalar head is not part of that layout and is left out. One tensor at a time is gathered to the
host while the file is written. RUN may be in a bucket (gs://...), and so may DIR (its
model.safetensors is then written on local disk first and uploaded as one object).
"""
from __future__ import annotations

import json
from typing import Optional

from absl import flags, logging

from rlhf_jax import hosts, storage
from rlhf_jax.data.tokenizer import Tokenizer, load_tokenizer
from rlhf_jax.errors import ConfigError
from rlhf_jax.hf import config as hf_config
from rlhf_jax.hf import runs, tensor_files, weights
from rlhf_jax.model import lora
from rlhf_jax.training import sharding as shd

WEIGHTS_FILE = "model.safetensors"
DTYPE_NAMES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}
# For a tokenizer trained here: no BOS, no dummy-prefix space, our special pieces (rlhf_jax.data.tokenizer).
OWN_TOKENIZER_CONFIG = {"tokenizer_class": "LlamaTokenizer", "add_bos_token": False, "add_eos_token": False,
                        "add_prefix_space": False, "legacy": False, "bos_token": None, "eos_token": "</s>",
                        "unk_token": "<unk>", "pad_token": "<pad>"}


def _source_files(run_dir: str, dtype: str, tok: Tokenizer, cfg) -> tuple[dict, dict[str, str], Optional[str]]:
  """(config.json, {tensor: safetensors dtype}, directory of files to pass through)."""
  source = runs.import_source(run_dir)
  if source is None:
    hf = hf_config.config_json(cfg, {"bos_id": tok.bos_id, "eos_id": tok.eos_id, "pad_id": tok.pad_id},
                               dtype or "float32")
    return hf, {}, None
  hf_dir = storage.join(source, runs.HF_SUBDIR)
  hf = hf_config.read_json(storage.join(hf_dir, "config.json"))
  dtypes = json.loads(storage.read_text(storage.join(hf_dir, runs.RECORD)))["dtypes"]
  if dtype:
    hf["torch_dtype" if "torch_dtype" in hf else "dtype"] = dtype
  return hf, dtypes, hf_dir


def export_run(run_dir: str, out_dir: str, step: Optional[int] = None, dtype: str = "") -> str:
  """Writes the policy of run_dir (at step, default the last) as a HuggingFace model into out_dir."""
  from rlhf_jax.training.saved_runs import load_policy
  if dtype and dtype not in DTYPE_NAMES:
    raise ConfigError(f"--dtype={dtype}: expected one of {sorted(DTYPE_NAMES)} (or nothing: as imported)")
  if storage.exists(out_dir) and storage.listdir(out_dir):
    raise ConfigError(f"--out={out_dir} is not empty")
  policy = load_policy(run_dir, shd.make_mesh((1, -1, 1)), step)
  cfg = policy.model.cfg
  params = policy.params
  if policy.model.lora is not None:  # a LoRA policy leaves as dense weights: W + (alpha/rank) A B
    params = lora.merge(params, policy.model.lora)
  tok = load_tokenizer(policy.tokenizer_dir)
  hf, dtypes, passed_through = _source_files(run_dir, dtype, tok, cfg)
  names = weights.hf_names(cfg)
  kind = lambda name: tensor_files.DTYPES[DTYPE_NAMES[dtype] if dtype else dtypes.get(name, "F32")]
  fetch = lambda name: weights.hf_tensor(params, cfg, name).astype(kind(name))
  if not hosts.is_lead():
    for name in names:  # the gathers are collective: every host takes part, one writes
      fetch(name)
    return out_dir
  storage.makedirs(out_dir)
  tensor_files.write(storage.join(out_dir, WEIGHTS_FILE),
                     [(name, kind(name), slot.hf_shape) for name, (slot, _) in names.items()], fetch,
                     {"format": "pt"})
  storage.write_atomic(storage.join(out_dir, "config.json"), json.dumps(hf, indent=2) + "\n")
  storage.copy(tok.path, storage.join(out_dir, storage.basename(tok.path)))  # tokenizer.model or .json
  if passed_through:
    for name in runs.PASSED_THROUGH:
      if storage.exists(storage.join(passed_through, name)):
        storage.copy(storage.join(passed_through, name), storage.join(out_dir, name))
  else:
    storage.write_atomic(storage.join(out_dir, "tokenizer_config.json"), json.dumps(OWN_TOKENIZER_CONFIG, indent=2))
  return out_dir


def main_factory():
  run_flag = flags.DEFINE_string("run", None, "Run directory (LM, SFT or PPO).", required=True)
  out_flag = flags.DEFINE_string("out", None, "HuggingFace model directory to write.", required=True)
  step_flag = flags.DEFINE_integer("step", None, "Checkpoint step (default: the last).")
  dtype_flag = flags.DEFINE_string("dtype", "", "float32 | bfloat16 | float16 (default: as imported; "
                                   "float32 for a model trained from scratch).")

  def main(argv):
    del argv
    if not flags.FLAGS["verbosity"].present:
      logging.set_verbosity(logging.WARNING)
    print(f"exported: {export_run(run_flag.value, out_flag.value, step_flag.value, dtype_flag.value)}")

  return main

