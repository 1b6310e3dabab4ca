"""A GGUF file (llama.cpp's format) as the pieces of an import: the ModelConfig its metadata
describes, and its tensors dequantised to float32 under HuggingFace's names and layouts, so that
rlhf_jax.hf.weights loads them onto a mesh exactly as it loads a safetensors checkpoint.

Only general.architecture = llama is read (Llama 1-3, Mistral, SmolLM, ... as llama.cpp converts
them). A llama.* metadata key we do not know is refused rather than ignored: we cannot tell whether
it changes the model. GGUF lists a tensor's dimensions innermost first, so an HF [out, in] matrix
has shape [in, out] there; `gguf.quants.dequantize` returns it in (out, in) row order, HF's layout.

llama.cpp's converter (convert_hf_to_gguf.py, LlamaModel.permute) reorders the rows of each q and
k head from HF's rotate-half layout (row j pairs with row j + head_dim / 2) to GGML's interleaved
one (rows 2j and 2j + 1 pair); `unpermute` is its inverse, so the rows reach our rotary embedding
as an HF checkpoint's would.
"""
from __future__ import annotations

import functools
import os
from typing import Any, Callable, Optional

import numpy as np

from rlhf_jax.errors import ConfigError, DataError, UserError
from rlhf_jax.hf.config import RUNTIME_FIELDS
from rlhf_jax.model.config import ModelConfig

PREFIX = "gguf:"  # a run reference naming a GGUF file: init_from=gguf:FILE
ARCHITECTURE = "llama"
# Tensor types dequantised here (gguf.quants has numpy code for each); a file of any other is refused.
TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q6_K")
STORED_AS = {"F16": "F16", "BF16": "BF16"}  # exact in a safetensors export; the rest become F32
TOP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
LAYER = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
         "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
         "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
KNOWN_KEYS = {  # llama.* metadata read or checked here
    "context_length", "embedding_length", "block_count", "feed_forward_length", "vocab_size",
    "attention.head_count", "attention.head_count_kv", "attention.layer_norm_rms_epsilon",
    "attention.key_length", "attention.value_length", "rope.freq_base", "rope.dimension_count",
    "rope.scaling.type", "rope.scaling.factor", "rope.scale_linear", "rope.scaling.original_context_length",
    "rope.scaling.finetuned", "expert_count", "expert_used_count"}
_MISSING = object()


def _decimal(value: float) -> float:
  # GGUF keeps floats as float32: 1e-5 reads back as 9.99999974e-06. The shortest decimal that is
  # the same float32 is the value the converter was given (config.json's), and the same computation.
  return float(str(np.float32(value)))


def _library():
  try:
    import gguf
  except ImportError:
    raise ConfigError("reading a GGUF file needs the gguf package (pip install 'gguf>=0.19'; it is in "
                      "rlhf_jax's test extra)") from None
  return gguf


class GGUFFile:
  """A GGUF file's metadata and tensors (memory-mapped by the gguf package's reader)."""

  def __init__(self, path: str):
    gguf = _library()
    self.path = os.fspath(path)
    if not os.path.isfile(self.path):
      raise ConfigError(f"{self.path}: no such file")
    try:
      self._reader = gguf.GGUFReader(self.path)
    except Exception as e:  # the reader fails in numpy (reshape, index) on a short file
      raise DataError(f"{self.path}: not a readable GGUF file (truncated?): {type(e).__name__}: {e}") from None
    self.tensors = {t.name: t for t in self._reader.tensors}

  def get(self, key: str, default: Any = _MISSING) -> Any:
    field = self._reader.fields.get(key)
    if field is None:
      if default is _MISSING:
        raise ConfigError(f"{self.path}: missing metadata {key}")
      return default
    return field.contents()

  def keys(self) -> list[str]:
    return list(self._reader.fields)


def _rope(f: GGUFFile, meta: dict) -> dict:
  # As llama.cpp reads them: a scaling factor without a type is linear, a factor of 0 or 1 is none.
  factor = meta.get("rope.scaling.factor", meta.get("rope.scale_linear"))
  kind = meta.get("rope.scaling.type", "linear" if factor else "none")
  if kind not in ("none", "linear"):
    raise ConfigError(f"{f.path}: unsupported: {ARCHITECTURE}.rope.scaling.type={kind} (implemented: none, linear)")
  out = {"rope_theta": _decimal(meta.get("rope.freq_base", 10000.0))}
  if kind == "linear" and factor not in (None, 0, 1):
    out.update(rope_scaling="linear", rope_factor=_decimal(factor))
  return out


def _heads(f: GGUFFile, meta: dict, d: int) -> dict:
  heads = meta["attention.head_count"]
  kv = meta.get("attention.head_count_kv", heads)
  if isinstance(heads, list) or isinstance(kv, list):
    raise ConfigError(f"{f.path}: unsupported: a head count per layer ({ARCHITECTURE}.attention.head_count"
                      f"{'_kv' if isinstance(kv, list) else ''} is a list)")
  head_dim = meta.get("attention.key_length", d // heads)
  for key in ("attention.value_length", "rope.dimension_count"):
    if meta.get(key, head_dim) != head_dim:
      raise ConfigError(f"{f.path}: unsupported: {ARCHITECTURE}.{key}={meta[key]} differs from the head size "
                        f"{head_dim} (rotary embeddings on part of a head are not implemented)")
  return dict(num_heads=heads, num_kv_heads=kv, head_dim=head_dim)


def model_config(f: GGUFFile, runtime: Optional[dict] = None) -> ModelConfig:
  """The ModelConfig of a GGUF file's metadata; runtime: values of RUNTIME_FIELDS."""
  arch = f.get("general.architecture")
  if arch != ARCHITECTURE:
    raise ConfigError(f"{f.path}: unsupported: general.architecture={arch} (only {ARCHITECTURE} is imported)")
  if f.get("split.count", 1) > 1:
    raise ConfigError(f"{f.path}: split.count={f.get('split.count')}: one part of a split GGUF model (merge "
                      f"the parts first: llama-gguf-split --merge)")
  meta = {k[len(arch) + 1:]: f.get(k) for k in f.keys() if k.startswith(arch + ".")}
  unknown = sorted(set(meta) - KNOWN_KEYS)
  if unknown:
    raise ConfigError(f"{f.path}: unsupported metadata {arch}.{unknown[0]}={meta[unknown[0]]!r} (rlhf_jax "
                      f"cannot tell whether it changes the model)")
  if meta.get("expert_count", 0):
    raise ConfigError(f"{f.path}: unsupported: {arch}.expert_count={meta['expert_count']} (mixture of experts)")
  vocab = len(f.get("tokenizer.ggml.tokens"))
  if meta.get("vocab_size", vocab) != vocab:
    raise ConfigError(f"{f.path}: {arch}.vocab_size={meta['vocab_size']} but tokenizer.ggml.tokens has {vocab}")
  try:
    fields = dict(vocab_size=vocab, d_model=meta["embedding_length"], num_layers=meta["block_count"],
                  mlp_dim=meta["feed_forward_length"], max_seq_len=meta["context_length"],
                  norm_eps=_decimal(meta["attention.layer_norm_rms_epsilon"]),
                  tie_embeddings="output.weight" not in f.tensors,
                  **_heads(f, meta, meta["embedding_length"]), **_rope(f, meta))
  except KeyError as e:
    raise ConfigError(f"{f.path}: missing metadata {arch}.{e.args[0]}") from None
  fields.update({k: v for k, v in (runtime or {}).items() if k in RUNTIME_FIELDS})
  try:
    return ModelConfig(**fields)
  except ValueError as e:
    raise ConfigError(f"{f.path}: {e}") from None


def gguf_names(cfg: ModelConfig) -> dict[str, str]:
  """{GGUF tensor name: HF tensor name} of every weight of a model of this config."""
  out = {f"{g}.weight": f"{h}.weight" for g, h in TOP.items() if g != "output" or not cfg.tie_embeddings}
  for i in range(cfg.num_layers):
    out |= {f"blk.{i}.{g}.weight": f"model.layers.{i}.{h}.weight" for g, h in LAYER.items()}
  return out


def shape(tensor) -> tuple[int, ...]:
  """A GGUF tensor's shape in numpy (row-major) order."""
  return tuple(int(n) for n in reversed(tensor.shape))


def check_tensors(f: GGUFFile, cfg: ModelConfig) -> dict[str, str]:
  """Every tensor the metadata implies is there, of a type we dequantise, with its shape, and
  nothing else is. Returns {HF name: GGUF name}."""
  from rlhf_jax.hf import weights  # here, not above: config_checks reads metadata without importing jax
  names, expected = gguf_names(cfg), weights.hf_names(cfg)
  for name, tensor in f.tensors.items():
    if name not in names:
      why = ("per-frequency rotary factors: Llama 3.1's rope scaling, not implemented for GGUF"
             if name.startswith("rope_freqs") else f"not a weight of a {ARCHITECTURE} model the metadata describes")
      raise ConfigError(f"{f.path}: unexpected tensor {name} ({why})")
    kind = tensor.tensor_type.name
    if kind not in TYPES:
      raise ConfigError(f"{f.path}: tensor {name} has type {kind} (dequantised here: {', '.join(TYPES)})")
    want = expected[names[name]][0].hf_shape
    if shape(tensor) != want:
      raise ConfigError(f"{f.path}: tensor {name} has shape {list(shape(tensor))} but the metadata implies "
                        f"{list(want)}")
  missing = [name for name in names if name not in f.tensors]
  if missing:
    raise ConfigError(f"{f.path}: missing tensor {missing[0]} (implied by the metadata)")
  return {hf: name for name, hf in names.items()}


def unpermute(w: np.ndarray, heads: int) -> np.ndarray:
  """HF's row order of a q or k projection [heads * head_dim, in] that llama.cpp's permute put in
  GGML's interleaved rotary order."""
  return w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def dequantize(tensor) -> np.ndarray:
  """A GGUF tensor as float32, in numpy order."""
  from gguf import quants
  return np.asarray(quants.dequantize(tensor.data, tensor.tensor_type), np.float32).reshape(shape(tensor))


def fetcher(f: GGUFFile, cfg: ModelConfig, names: dict[str, str]) -> Callable[[str], np.ndarray]:
  """fetch(HF name): that tensor as an HF checkpoint holds it, for weights.params_from."""
  heads = {"q_proj": cfg.num_heads, "k_proj": cfg.num_kv_heads}

  # The shards of one param are built one after another: each dequantises its tensor once, not
  # once a shard. A stacked (scan_layers) param reads every layer's tensor for each shard: keep them
  # all, as much memory as the param being built.
  @functools.lru_cache(maxsize=cfg.num_layers if cfg.scan_layers else 1)
  def fetch(hf: str) -> np.ndarray:
    w = dequantize(f.tensors[names[hf]])
    kind = hf.split(".")[-2]
    return unpermute(w, heads[kind]) if kind in heads else w

  return fetch


def tensor_record(f: GGUFFile, names: dict[str, str]) -> dict[str, dict]:
  """What the import records: each HF tensor's dtype in an export (import.json's "dtypes", as for a
  safetensors source), and each GGUF tensor's type."""
  types = {g: f.tensors[g].tensor_type.name for g in names.values()}
  return {"dtypes": {hf: STORED_AS.get(types[g], "F32") for hf, g in names.items()}, "gguf_types": types}


def model_of_reference(ref: str, field: str) -> dict:
  """The model a `gguf:FILE` reference describes (runtime fields at their defaults), read from its
  metadata alone: what config_checks needs before a run starts."""
  path = ref[len(PREFIX):]
  try:
    return model_config(GGUFFile(path)).to_dict()
  except UserError as e:
    raise ConfigError(f"{field}={ref}: {e}") from None


def is_gguf(ref: Optional[str]) -> bool:
  return bool(ref) and ref.startswith(PREFIX)

