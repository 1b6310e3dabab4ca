"""A HuggingFace config.json as a ModelConfig (and back), and the tokenizer's special ids.

Our Transformer is Llama's computation exactly: RMSNorm with the checkpoint's eps, rotary
embeddings on the two halves of head_dim (HF's `rotate_half` layout, which is also ours, so q/k
weights load unpermuted) with base rope_theta, softmax scaled by head_dim ** -0.5, SwiGLU, GQA,
tied or untied embeddings. Mistral is the same without a sliding window; Gemma adds three small
switches (ModelConfig.scale_embeddings, norm_offset = 1, mlp_activation = "gelu_tanh").
Everything else in a config.json either has no effect on the forward pass (listed in
NO_EFFECT) or is refused with a ConfigError naming the file and field: nothing is approximated.
"""
from __future__ import annotations

import json
import os
from typing import Any, Optional

from rlhf_jax.data.tokenizer import EOC_PIECE
from rlhf_jax.errors import ConfigError
from rlhf_jax.model.config import ModelConfig

PREFIX = "hf:"  # a run reference naming a HuggingFace directory: init_from=hf:DIR
CONFIG_FILE = "config.json"
ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "gemma": "GemmaForCausalLM"}
# Settings of how a run computes, not of the checkpoint: the importing run chooses them.
RUNTIME_FIELDS = ("dtype", "param_dtype", "scan_layers", "remat", "attention_impl")
NO_EFFECT = {"_name_or_path", "architectures", "model_type", "transformers_version", "torch_dtype", "dtype",
             "initializer_range", "use_cache", "bos_token_id", "eos_token_id", "pad_token_id",
             "output_attentions", "output_hidden_states", "return_dict",
             "pretraining_tp"}  # pretraining_tp > 1 only slices HF's matmuls: the same maths
SHAPE = {"vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
         "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings",
         "rope_theta", "rope_scaling", "rope_parameters", "hidden_act"}
MUST_BE = {  # field: the values that mean "what our Transformer computes"
    "attention_bias": (False,), "mlp_bias": (False,), "attention_dropout": (0, 0.0),
    "use_bidirectional_attention": (None, False), "quantization_config": (None,),
}
GEMMA_TANH_GELU = ("gelu_pytorch_tanh", "gelu")  # HF maps Gemma's legacy "gelu" to the tanh form


def read_json(path: str) -> dict:
  if not os.path.isfile(path):
    raise ConfigError(f"{path}: not found (a HuggingFace model directory has config.json, *.safetensors "
                      f"and tokenizer.model)")
  with open(path, encoding="utf-8") as f:
    try:
      return json.load(f)
    except json.JSONDecodeError as e:
      raise ConfigError(f"{path}: not valid JSON ({e})") from None


def _rope_theta(hf: dict, path: str) -> float:
  scaling = hf.get("rope_scaling")
  if scaling is not None:
    kind = scaling.get("rope_type", scaling.get("type")) if isinstance(scaling, dict) else scaling
    if kind != "default":
      raise ConfigError(f"{path}: unsupported: rope_scaling.type={kind} (only unscaled rotary embeddings "
                        f"are implemented)")
  params = hf.get("rope_parameters") or {}
  kind = params.get("rope_type", "default")
  if kind != "default":
    raise ConfigError(f"{path}: unsupported: rope_scaling.type={kind} (rope_parameters.rope_type; only "
                      f"unscaled rotary embeddings are implemented)")
  extra = sorted(set(params) - {"rope_type", "rope_theta"})
  if extra:
    raise ConfigError(f"{path}: unsupported: rope_parameters.{extra[0]}")
  return float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))


def _check_fields(hf: dict, model_type: str, path: str) -> None:
  known = NO_EFFECT | SHAPE | set(MUST_BE) | ({"sliding_window"} if model_type == "mistral" else set())
  if model_type == "gemma":
    known |= {"hidden_activation"}
  unknown = sorted(set(hf) - known)
  if unknown:
    raise ConfigError(f"{path}: unsupported field {unknown[0]}={hf[unknown[0]]!r} for model_type="
                      f"{model_type} (rlhf_jax cannot tell whether it changes the model)")
  for field, allowed in MUST_BE.items():
    if field in hf and hf[field] not in allowed:
      raise ConfigError(f"{path}: unsupported: {field}={hf[field]!r} (rlhf_jax implements {allowed[0]!r})")
  window = hf.get("sliding_window")
  if window is not None and window < hf.get("max_position_embeddings", 0):
    raise ConfigError(f"{path}: unsupported: sliding_window={window} < max_position_embeddings="
                      f"{hf['max_position_embeddings']} (sliding-window attention is not implemented)")


def _activation(hf: dict, model_type: str, path: str) -> str:
  act = hf.get("hidden_act", "silu" if model_type != "gemma" else "gelu_pytorch_tanh")
  if model_type == "gemma":
    if hf.get("hidden_activation") not in (None, "gelu_pytorch_tanh") or act not in GEMMA_TANH_GELU:
      field = "hidden_activation" if hf.get("hidden_activation") is not None else "hidden_act"
      raise ConfigError(f"{path}: unsupported: {field}={hf[field]!r} (Gemma's gelu_pytorch_tanh is implemented)")
    return "gelu_tanh"
  if act != "silu":
    raise ConfigError(f"{path}: unsupported: hidden_act={act!r} (SwiGLU with silu is implemented)")
  return "silu"


def model_config(hf_dir: str, runtime: Optional[dict] = None) -> ModelConfig:
  """The ModelConfig of a HuggingFace model directory; runtime: values of RUNTIME_FIELDS."""
  path = os.path.join(hf_dir, CONFIG_FILE)
  hf = read_json(path)
  model_type = hf.get("model_type")
  if model_type not in ARCHITECTURES:
    raise ConfigError(f"{path}: unsupported: model_type={model_type} (supported: {', '.join(ARCHITECTURES)})")
  archs = hf.get("architectures") or [ARCHITECTURES[model_type]]
  if archs != [ARCHITECTURES[model_type]]:
    raise ConfigError(f"{path}: unsupported: architectures={archs} (a {ARCHITECTURES[model_type]} is imported)")
  _check_fields(hf, model_type, path)
  try:
    d, heads = hf["hidden_size"], hf["num_attention_heads"]
    fields = dict(
        vocab_size=hf["vocab_size"], d_model=d, num_layers=hf["num_hidden_layers"], num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads, head_dim=hf.get("head_dim") or d // heads,
        mlp_dim=hf["intermediate_size"], max_seq_len=hf["max_position_embeddings"],
        rope_theta=_rope_theta(hf, path), norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", model_type == "gemma")),
        mlp_activation=_activation(hf, model_type, path), scale_embeddings=model_type == "gemma",
        norm_offset=1.0 if model_type == "gemma" else 0.0)
  except KeyError as e:
    raise ConfigError(f"{path}: missing field {e.args[0]}") from None
  fields.update({k: v for k, v in (runtime or {}).items() if k in RUNTIME_FIELDS})
  try:
    return ModelConfig(**fields)
  except ValueError as e:
    raise ConfigError(f"{path}: {e}") from None


def model_of_reference(ref: str, field: str) -> dict:
  """The model an `hf:DIR` reference describes (runtime fields at their defaults), checked
  without reading a weight: what config_checks needs before a run starts."""
  hf_dir = ref[len(PREFIX):]
  if not os.path.isdir(hf_dir):
    raise ConfigError(f"{field}={ref}: {hf_dir} is not a directory")
  try:
    return model_config(hf_dir).to_dict()
  except ConfigError as e:
    raise ConfigError(f"{field}={ref}: {e}") from None


def special_ids(hf_dir: str, sp) -> dict[str, Any]:
  """tokenizer_specials.json's ids (see rlhf_jax.data.tokenizer): BOS, EOS and pad of config.json,
  else of the tokenizer; pad, when neither names one, is the unknown piece; EOC is EOS (or our
  end-of-context piece, in a tokenizer trained by rlhf_jax)."""
  path = os.path.join(hf_dir, CONFIG_FILE)
  hf = read_json(path)
  vocab = sp.get_piece_size()

  def pick(field: str, fallback: int) -> Optional[int]:
    value = hf.get(field)
    if isinstance(value, list):
      raise ConfigError(f"{path}: unsupported: {field}={value} (one id expected)")
    value = fallback if value is None or value < 0 else value
    if value is not None and not 0 <= value < vocab:
      raise ConfigError(f"{path}: {field}={value} is not an id of tokenizer.model ({vocab} pieces)")
    return value

  own = lambda i: i if i >= 0 else None
  eos = pick("eos_token_id", own(sp.eos_id()))
  if eos is None:
    raise ConfigError(f"{path}: no eos_token_id, and tokenizer.model has no end-of-text piece")
  pad = pick("pad_token_id", sp.pad_id() if sp.pad_id() >= 0 else sp.unk_id())
  eoc = sp.piece_to_id(EOC_PIECE)  # a model trained here and exported keeps its own EOC
  return {"bos_id": pick("bos_token_id", own(sp.bos_id())), "eos_id": eos, "pad_id": pad,
          "unk_id": sp.unk_id(), "eoc_id": eoc if eoc != sp.unk_id() else eos, "source": os.path.abspath(path)}


def llama_config(cfg: ModelConfig, specials: dict, dtype: str) -> dict:
  """config.json for a model trained here from scratch (our defaults are Llama's architecture)."""
  if (cfg.mlp_activation, cfg.scale_embeddings, cfg.norm_offset) != ("silu", False, 0.0):
    raise ConfigError("only a model with Llama's defaults (mlp_activation=silu, no embedding scale, "
                      "norm_offset=0) is exported without the config.json of the model it was imported from")
  return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": cfg.vocab_size,
          "hidden_size": cfg.d_model, "intermediate_size": cfg.mlp_dim, "num_hidden_layers": cfg.num_layers,
          "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads,
          "head_dim": cfg.head_dim, "hidden_act": "silu", "max_position_embeddings": cfg.max_seq_len,
          "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta, "rope_scaling": None,
          "tie_word_embeddings": cfg.tie_embeddings, "attention_bias": False, "mlp_bias": False,
          "attention_dropout": 0.0, "bos_token_id": specials["bos_id"], "eos_token_id": specials["eos_id"],
          "pad_token_id": specials["pad_id"], "torch_dtype": dtype}
