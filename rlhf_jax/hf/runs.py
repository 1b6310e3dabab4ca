"""A HuggingFace model directory as an rlhf_jax run directory, imported once and reused.

`--config.init_from=hf:DIR` (train_lm, train_pm) and `--config.policy_from=hf:DIR` (train_ppo)
name a HuggingFace directory; `resolve` imports it into <cache>/<name>-<hash>/ and puts that path
in the config, so everything that reads runs (run_model, load_run_config, restore_params,
load_or_train_tokenizer, FrozenModel, load_policy) works unchanged. The cache is
$RLHF_JAX_HF_IMPORT_DIR if set (share it between runs: each import is a float32 copy of the
weights), else <workdir>/hf_import. The hash covers the source files' sizes and times and the
settings below, so a changed checkpoint or another layout is imported afresh. `gguf:FILE` names a
llama.cpp GGUF file instead (rlhf_jax.hf.gguf_model, gguf_tokenizer), imported into the same cache.
A sweep size that is a checkpoint (rlhf_jax.experiments.checkpoint_sizes) is imported with
`import_into` into its own stage directory instead, named in its settings by `content_hash`.

An imported run directory holds config.json (an LM run's config whose model is the checkpoint's),
checkpoints/0 (the params, including a fresh scalar head: zeros, as a new model's), tokenizer.model
with tokenizer_specials.json, and hf/ (the source's config.json and tokenizer files, which the
export writes back, and import.json: the source and each tensor's dtype).

The run directory and the cache may be in a bucket (gs://...); the source is read from local disk
(its safetensors and GGUF files are memory-mapped). Locally an import is written into
<out>.partial and renamed into place; a bucket has no rename (it would copy every object), so there
the import writes into <out> itself, marked by .importing until done, and writes its config.json
last: a directory with config.json is a complete import, anything else a killed one, redone.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Optional, Sequence

import ml_collections
import sentencepiece as spm

from rlhf_jax import hosts, storage
from rlhf_jax.data.tokenizer import CHAT_TEMPLATE_FILE, JSON_FILE, MODEL_FILE, SPECIALS_FILE, tokenizer_file
from rlhf_jax.errors import ConfigError
from rlhf_jax.hf import config as hf_config
from rlhf_jax.hf import gguf_model, gguf_tokenizer, tensor_files, weights
from rlhf_jax.hf import tokens as hf_tokens
from rlhf_jax.model.config import ModelConfig
from rlhf_jax.training import sharding as shd
from rlhf_jax.training.checkpointing import Checkpointer

PREFIX = hf_config.PREFIX
CACHE_ENV = "RLHF_JAX_HF_IMPORT_DIR"
HF_SUBDIR = "hf"
RECORD = "import.json"
RUN_CONFIG = "config.json"
IMPORTING = ".importing"  # in a bucket, an import's directory until it is complete
# Files of an HF directory that travel through a run unchanged (the tokenizer as HF tools load it).
PASSED_THROUGH = ("generation_config.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.json",
                  "chat_template.jinja")


def is_hf(ref: Optional[str]) -> bool:
  return bool(ref) and ref.startswith(PREFIX)


def _fingerprint(hf_dir: str, runtime: dict) -> str:
  paths = [hf_dir] if os.path.isfile(hf_dir) else [  # a GGUF file, or a directory's checkpoint and tokenizer
      os.path.join(hf_dir, f) for f in sorted(os.listdir(hf_dir)) if f.endswith((".safetensors", ".json", ".model"))]
  stats = [(os.path.basename(p), os.stat(p).st_size, os.stat(p).st_mtime_ns) for p in paths]
  text = json.dumps([os.path.abspath(hf_dir), stats, sorted(runtime.items())])
  return hashlib.sha256(text.encode()).hexdigest()[:12]


def _run_config(cfg: ModelConfig, hf_dir: str) -> dict:
  from configs import lm  # the LM run config every run-reading tool expects
  c = lm.get_config("13m")
  c.preset, c.init_from, c.train.steps = "", "", 0
  c.model = ml_collections.ConfigDict(cfg.to_dict())
  c.workdir = ""
  return dict(c.to_dict(), hf_import={"source": storage.absolute(hf_dir)})


def import_model(hf_dir: str, out_dir: str, runtime: Optional[dict] = None,
                 mesh_shape: Sequence[int] = (1, -1, 1)) -> str:
  """Imports hf_dir as the run directory out_dir (which must not exist): every check first, then
  the weights straight onto a mesh of mesh_shape and into an orbax checkpoint. Returns out_dir."""
  _check_local(hf_dir, hf_dir)
  _check_new(out_dir)
  runtime = {k: v for k, v in (runtime or {}).items() if k in hf_config.RUNTIME_FIELDS}
  cfg = hf_config.model_config(hf_dir, runtime)
  tok_path, specials = _tokenizer(hf_dir, cfg)
  infos = tensor_files.index_directory(hf_dir)
  params = weights.load_params(hf_dir, cfg, shd.make_mesh(mesh_shape))  # checks every tensor first

  partial, lead = _start_run(out_dir)
  if lead:
    storage.copy(tok_path, storage.join(partial, os.path.basename(tok_path)))
    _write_json(storage.join(partial, SPECIALS_FILE), specials)
    template = hf_tokens.chat_template(hf_dir)
    if template is not None:
      storage.write_atomic(storage.join(partial, CHAT_TEMPLATE_FILE), template)
    storage.copy(os.path.join(hf_dir, hf_config.CONFIG_FILE), storage.join(partial, HF_SUBDIR, "config.json"))
    for name in PASSED_THROUGH:
      if os.path.exists(os.path.join(hf_dir, name)):
        storage.copy(os.path.join(hf_dir, name), storage.join(partial, HF_SUBDIR, name))
    _write_json(storage.join(partial, HF_SUBDIR, RECORD), {
        "source": storage.absolute(hf_dir), "runtime": runtime,
        "dtypes": {name: tensor_files.NAMES[info.dtype] for name, info in infos.items()
                   if name in weights.hf_names(cfg)}})
  return _finish_run(partial, out_dir, params, hf_dir, cfg)


def is_complete(run_dir: str) -> bool:
  """Whether run_dir holds a finished import (or any run): its config.json, written last."""
  return storage.isfile(storage.join(run_dir, RUN_CONFIG))


def _check_local(source: str, ref: str) -> None:
  if storage.is_remote(source):
    raise ConfigError(f"{ref}: an import reads its source from local disk (its weights are memory-mapped): "
                      f"copy {source} to this host and name the copy")


def _check_new(out_dir: str) -> None:
  """An import makes a new directory; in a bucket it may also redo one a killed import left."""
  killed = storage.is_remote(out_dir) and storage.exists(storage.join(out_dir, IMPORTING))
  if storage.exists(out_dir) and not (killed and not is_complete(out_dir)):
    raise ConfigError(f"{out_dir} exists: import into a new directory")


def _start_run(out_dir: str) -> tuple[str, bool]:
  """(the directory an import writes into, whether this process writes files). Locally
  out_dir.partial, renamed to out_dir by _finish_run once everything is in it, so a killed import
  leaves no run; in a bucket out_dir itself, marked as an import under way (see the module's doc)."""
  remote = storage.is_remote(out_dir)
  partial = out_dir.rstrip("/") + ("" if remote else ".partial")
  lead = hosts.is_lead()
  if lead:
    if storage.exists(partial):
      storage.rmtree(partial)  # an earlier import that was killed
    storage.makedirs(storage.join(partial, HF_SUBDIR))
    if remote:
      storage.write_atomic(storage.join(partial, IMPORTING), "")
  return partial, lead


def _finish_run(partial: str, out_dir: str, params, source: str, cfg: ModelConfig) -> str:
  hosts.barrier("hf import: directory")
  with Checkpointer(storage.join(partial, "checkpoints"), async_save=False) as ckpt:
    ckpt.save(0, {"params": params}, {"hf_import": storage.absolute(source)})
  if hosts.is_lead():
    _write_json(storage.join(partial, RUN_CONFIG), _run_config(cfg, source))  # last: it makes the run
    if storage.is_remote(out_dir):
      storage.remove(storage.join(out_dir, IMPORTING))
    else:
      storage.move(partial, out_dir)
  hosts.barrier("hf import: done")
  return out_dir


def import_gguf(path: str, out_dir: str, runtime: Optional[dict] = None,
                mesh_shape: Sequence[int] = (1, -1, 1)) -> str:
  """Imports a GGUF file as the run directory out_dir, as import_model does a HuggingFace directory:
  its tensors dequantised to float32, its vocabulary as tokenizer.json, and in hf/ a config.json
  and tokenizer_config.json of the same model, from which hf_export writes it as safetensors."""
  _check_local(path, path)
  _check_new(out_dir)
  runtime = {k: v for k, v in (runtime or {}).items() if k in hf_config.RUNTIME_FIELDS}
  f = gguf_model.GGUFFile(path)
  cfg = gguf_model.model_config(f, runtime)
  names = gguf_model.check_tensors(f, cfg)
  specials, tokenizer = gguf_tokenizer.special_ids(f), gguf_tokenizer.tokenizer_json(f)
  params = weights.params_from(gguf_model.fetcher(f, cfg, names), cfg, shd.make_mesh(mesh_shape))
  partial, lead = _start_run(out_dir)
  if lead:
    hf_tokenizer = gguf_tokenizer.tokenizer_config(f, specials, cfg.max_seq_len)  # for an export
    files = {(JSON_FILE,): tokenizer, (CHAT_TEMPLATE_FILE,): gguf_tokenizer.chat_template(f),
             (HF_SUBDIR, "tokenizer_config.json"): hf_tokenizer}
    for name, text in files.items():
      if text is not None:
        storage.write_atomic(storage.join(partial, *name), text)
    _write_json(storage.join(partial, SPECIALS_FILE), specials)
    _write_json(storage.join(partial, HF_SUBDIR, "config.json"), hf_config.config_json(cfg, specials, "float32"))
    _write_json(storage.join(partial, HF_SUBDIR, RECORD), {"source": storage.absolute(path), "runtime": runtime,
                                                           **gguf_model.tensor_record(f, names)})
  return _finish_run(partial, out_dir, params, path, cfg)


def _tokenizer(hf_dir: str, cfg: ModelConfig) -> tuple[str, dict]:
  """(the model's tokenizer file, its special ids): tokenizer.model (SentencePiece), else tokenizer.json."""
  config_path = os.path.join(hf_dir, hf_config.CONFIG_FILE)
  if os.path.isfile(os.path.join(hf_dir, MODEL_FILE)):
    tok_path = os.path.join(hf_dir, MODEL_FILE)
    sp = spm.SentencePieceProcessor(model_file=tok_path)
    if sp.get_piece_size() != cfg.vocab_size:
      raise ConfigError(f"{config_path}: vocab_size={cfg.vocab_size} but {tok_path} has {sp.get_piece_size()} "
                        f"pieces (added tokens are not supported)")
    return tok_path, hf_config.special_ids(hf_dir, sp)
  tok_path = os.path.join(hf_dir, JSON_FILE)
  if not os.path.isfile(tok_path):
    raise ConfigError(f"{hf_dir}: no tokenizer ({MODEL_FILE} or {JSON_FILE})")
  specials = hf_tokens.special_ids(hf_dir, tok_path)
  if specials["vocab_size"] > cfg.vocab_size:  # a larger embedding is common (rows padded to a round size)
    raise ConfigError(f"{config_path}: vocab_size={cfg.vocab_size} but {tok_path} has {specials['vocab_size']} "
                      f"tokens")
  return tok_path, specials


def _write_json(path: str, value) -> None:
  storage.write_atomic(path, json.dumps(value, indent=2) + "\n")


def source_path(ref: str) -> str:
  """The directory of `hf:DIR`, the file of `gguf:FILE` (a bare path: itself), checked to exist."""
  gguf = gguf_model.is_gguf(ref)
  path = ref[len(gguf_model.PREFIX if gguf else PREFIX):] if gguf or is_hf(ref) else ref
  _check_local(path, ref)
  if not os.path.exists(path):
    raise ConfigError(f"{ref}: {path} does not exist")
  return path


def import_into(ref: str, out_dir: str, runtime: Optional[dict] = None,
                mesh_shape: Sequence[int] = (1, -1, 1)) -> str:
  """Imports `hf:DIR` or `gguf:FILE` as the new run directory out_dir."""
  path = source_path(ref)
  return (import_gguf if gguf_model.is_gguf(ref) else import_model)(path, out_dir, runtime, mesh_shape)


def reference_model(ref: str, runtime: Optional[dict] = None) -> ModelConfig:
  """The ModelConfig of `hf:DIR` or `gguf:FILE` (its metadata alone, no weight read), with runtime fields."""
  path = source_path(ref)
  if gguf_model.is_gguf(ref):
    return gguf_model.model_config(gguf_model.GGUFFile(path), runtime)
  return hf_config.model_config(path, runtime)


def tokenizer_bytes(ref: str) -> bytes:
  """The tokenizer file an import of `ref` writes into its run directory, as the bytes that
  data.tokenizer.same_tokenizer compares between runs."""
  path = source_path(ref)
  if gguf_model.is_gguf(ref):
    return gguf_tokenizer.tokenizer_json(gguf_model.GGUFFile(path)).encode("utf-8")
  return storage.read_bytes(tokenizer_file(path))


def _file_sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 24), b""):
      digest.update(block)
  return digest.hexdigest()


def content_hash(ref: str) -> str:
  """The sha256 of what an import of `ref` reads: a GGUF file's bytes; of a directory, the name,
  size and sha256 of each of its config, tokenizer and weight files. Unlike the import cache's key
  (sizes and times) it names the checkpoint itself: a copy elsewhere hashes the same, an edited
  byte does not. Every byte is read, each time."""
  path = source_path(ref)
  if os.path.isfile(path):
    return _file_sha256(path)
  files = sorted(f for f in os.listdir(path) if f.endswith((".safetensors", ".json", ".model", ".jinja")))
  text = json.dumps([(f, os.path.getsize(os.path.join(path, f)), _file_sha256(os.path.join(path, f)))
                     for f in files])
  return hashlib.sha256(text.encode()).hexdigest()


def imported(ref: str, cache_dir: str, runtime: Optional[dict] = None,
             mesh_shape: Sequence[int] = (1, -1, 1)) -> str:
  """The run directory of `hf:DIR` (or `gguf:FILE`) in cache_dir, imported now unless it already is."""
  gguf = gguf_model.is_gguf(ref)
  hf_dir = source_path(ref)
  defaults = ModelConfig()  # unset runtime fields at their defaults: one import for equal settings
  runtime = {k: (runtime or {}).get(k, getattr(defaults, k)) for k in hf_config.RUNTIME_FIELDS}
  name = os.path.basename(os.path.normpath(os.path.abspath(hf_dir))).removesuffix(".gguf")
  out = storage.join(cache_dir, f"{name}-{_fingerprint(hf_dir, runtime)}")
  if not is_complete(out):
    print(f"importing {hf_dir} into {out}", flush=True)
    storage.makedirs(cache_dir)
    (import_gguf if gguf else import_model)(hf_dir, out, runtime, mesh_shape)
  return out


def resolve(config, workdir: str, fields: Sequence[str]) -> ml_collections.ConfigDict:
  """config with every `hf:DIR` or `gguf:FILE` among fields replaced by its imported run directory. The import
  takes the run's own runtime settings (dtype, scan_layers, ...) so the model it inherits is the
  one it asked for."""
  refs = {f: config.get(f) for f in fields if is_hf(config.get(f)) or gguf_model.is_gguf(config.get(f))}
  if not refs:
    return config
  cache = os.environ.get(CACHE_ENV) or storage.join(workdir, "hf_import")
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
    if storage.exists(storage.join(run_dir, HF_SUBDIR, RECORD)):
      return run_dir
    config = json.loads(storage.read_text(storage.join(run_dir, RUN_CONFIG)))
    run_dir = config.get("policy_from") or config.get("init_from")
  return None
