"""A HuggingFace model directory as an rlhf_jax run directory, imported once and reused.

`--config.init_from=hf:DIR` (train_lm, train_pm) and `--config.policy_from=hf:DIR` (train_ppo)
name a HuggingFace directory; `resolve` imports it into <cache>/<name>-<hash>/ and puts that path
in the config, so everything that reads runs (run_model, load_run_config, restore_params,
load_or_train_tokenizer, FrozenModel, load_policy) works unchanged. The cache is
$RLHF_JAX_HF_IMPORT_DIR if set (share it between runs: each import is a float32 copy of the
weights), else <workdir>/hf_import. The hash covers the source files' sizes and times and the
settings below, so a changed checkpoint or another layout is imported afresh.

An imported run directory holds config.json (an LM run's config whose model is the checkpoint's),
checkpoints/0 (the params, including a fresh scalar head: zeros, as a new model's), tokenizer.model
with tokenizer_specials.json, and hf/ (the source's config.json and tokenizer files, which the
export writes back, and import.json: the source and each tensor's dtype).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from typing import Optional, Sequence

import jax
import ml_collections
import sentencepiece as spm

from rlhf_jax.data.tokenizer import MODEL_FILE, SPECIALS_FILE
from rlhf_jax.errors import ConfigError
from rlhf_jax.hf import config as hf_config
from rlhf_jax.hf import tensor_files, weights
from rlhf_jax.model.config import ModelConfig
from rlhf_jax.training import sharding as shd
from rlhf_jax.training.checkpointing import Checkpointer

PREFIX = hf_config.PREFIX
CACHE_ENV = "RLHF_JAX_HF_IMPORT_DIR"
HF_SUBDIR = "hf"
RECORD = "import.json"
# Files of an HF directory that travel through a run unchanged (the tokenizer as HF tools load it).
PASSED_THROUGH = ("generation_config.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.json")


def is_hf(ref: Optional[str]) -> bool:
  return bool(ref) and ref.startswith(PREFIX)


def _fingerprint(hf_dir: str, runtime: dict) -> str:
  files = sorted(f for f in os.listdir(hf_dir) if f.endswith((".safetensors", ".json", ".model")))
  stats = [(f, os.stat(os.path.join(hf_dir, f)).st_size, os.stat(os.path.join(hf_dir, f)).st_mtime_ns)
           for f in files]
  text = json.dumps([os.path.abspath(hf_dir), stats, sorted(runtime.items())])
  return hashlib.sha256(text.encode()).hexdigest()[:12]


def _run_config(cfg: ModelConfig, hf_dir: str) -> dict:
  from configs import lm  # the LM run config every run-reading tool expects
  c = lm.get_config("13m")
  c.preset, c.init_from, c.train.steps = "", "", 0
  c.model = ml_collections.ConfigDict(cfg.to_dict())
  c.workdir = ""
  return dict(c.to_dict(), hf_import={"source": os.path.abspath(hf_dir)})


def _barrier(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def import_model(hf_dir: str, out_dir: str, runtime: Optional[dict] = None,
                 mesh_shape: Sequence[int] = (1, -1, 1)) -> str:
  """Imports hf_dir as the run directory out_dir (which must not exist): every check first, then
  the weights straight onto a mesh of mesh_shape and into an orbax checkpoint. Returns out_dir."""
  if os.path.exists(out_dir):
    raise ConfigError(f"{out_dir} exists: import into a new directory")
  runtime = {k: v for k, v in (runtime or {}).items() if k in hf_config.RUNTIME_FIELDS}
  cfg = hf_config.model_config(hf_dir, runtime)
  tok_path = os.path.join(hf_dir, MODEL_FILE)
  if not os.path.isfile(tok_path):
    raise ConfigError(f"{hf_dir}: no {MODEL_FILE} (only SentencePiece tokenizers are supported; a "
                      f"tokenizer.json-only model such as Llama 3 is not)")
  sp = spm.SentencePieceProcessor(model_file=tok_path)
  if sp.get_piece_size() != cfg.vocab_size:
    raise ConfigError(f"{os.path.join(hf_dir, hf_config.CONFIG_FILE)}: vocab_size={cfg.vocab_size} but "
                      f"{tok_path} has {sp.get_piece_size()} pieces (added tokens are not supported)")
  specials = hf_config.special_ids(hf_dir, sp)
  infos = tensor_files.index_directory(hf_dir)
  params = weights.load_params(hf_dir, cfg, shd.make_mesh(mesh_shape))  # checks every tensor first

  partial = out_dir.rstrip("/") + ".partial"
  lead = jax.process_index() == 0
  if lead:
    shutil.rmtree(partial, ignore_errors=True)  # an earlier import that was killed
    os.makedirs(os.path.join(partial, HF_SUBDIR))
    _write_json(os.path.join(partial, "config.json"), _run_config(cfg, hf_dir))
    shutil.copyfile(tok_path, os.path.join(partial, MODEL_FILE))
    _write_json(os.path.join(partial, SPECIALS_FILE), specials)
    shutil.copyfile(os.path.join(hf_dir, hf_config.CONFIG_FILE), os.path.join(partial, HF_SUBDIR, "config.json"))
    for name in PASSED_THROUGH:
      if os.path.exists(os.path.join(hf_dir, name)):
        shutil.copyfile(os.path.join(hf_dir, name), os.path.join(partial, HF_SUBDIR, name))
    _write_json(os.path.join(partial, HF_SUBDIR, RECORD), {
        "source": os.path.abspath(hf_dir), "runtime": runtime,
        "dtypes": {name: tensor_files.NAMES[info.dtype] for name, info in infos.items()
                   if name in weights.hf_names(cfg)}})
  _barrier("hf import: directory")
  with Checkpointer(os.path.join(partial, "checkpoints"), async_save=False) as ckpt:
    ckpt.save(0, {"params": params}, {"hf_import": os.path.abspath(hf_dir)})
  if lead:
    os.replace(partial, out_dir)
  _barrier("hf import: done")
  return out_dir


def _write_json(path: str, value) -> None:
  with open(path, "w", encoding="utf-8") as f:
    json.dump(value, f, indent=2)
    f.write("\n")


def imported(ref: str, cache_dir: str, runtime: Optional[dict] = None,
             mesh_shape: Sequence[int] = (1, -1, 1)) -> str:
  """The run directory of `hf:DIR` in cache_dir, imported now unless it already is."""
  hf_dir = ref[len(PREFIX):] if is_hf(ref) else ref
  defaults = ModelConfig()  # unset runtime fields at their defaults: one import for equal settings
  runtime = {k: (runtime or {}).get(k, getattr(defaults, k)) for k in hf_config.RUNTIME_FIELDS}
  name = os.path.basename(os.path.normpath(os.path.abspath(hf_dir)))
  out = os.path.join(cache_dir, f"{name}-{_fingerprint(hf_dir, runtime)}")
  if not os.path.isdir(out):
    print(f"importing {hf_dir} into {out}", flush=True)
    os.makedirs(cache_dir, exist_ok=True)
    import_model(hf_dir, out, runtime, mesh_shape)
  return out


def resolve(config, workdir: str, fields: Sequence[str]) -> ml_collections.ConfigDict:
  """config with every `hf:DIR` among fields replaced by its imported run directory. The import
  takes the run's own runtime settings (dtype, scan_layers, ...) so the model it inherits is the
  one it asked for."""
  refs = {f: config.get(f) for f in fields if is_hf(config.get(f))}
  if not refs:
    return config
  cache = os.environ.get(CACHE_ENV) or os.path.join(workdir, "hf_import")
  runtime = config.model.to_dict() if "model" in config else {}
  out = config.copy_and_resolve_references()
  with out.unlocked():
    for field, ref in refs.items():
      out[field] = imported(ref, cache, runtime, tuple(config.mesh.shape))
  return out


def import_source(run_dir: str) -> Optional[str]:
  """The imported run directory a run descends from (through policy_from / init_from), if any."""
  seen = set()
  while run_dir and run_dir not in seen:
    seen.add(run_dir)
    if os.path.exists(os.path.join(run_dir, HF_SUBDIR, RECORD)):
      return run_dir
    with open(os.path.join(run_dir, "config.json"), encoding="utf-8") as f:
      config = json.load(f)
    run_dir = config.get("policy_from") or config.get("init_from")
  return None
