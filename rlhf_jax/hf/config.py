"""A HuggingFace config.json as a ModelConfig (and back), and the tokenizer's special ids.

Our Transformer is Llama's computation exactly: RMSNorm with the checkpoint's eps, rotary
embeddings on the two halves of head_dim (HF's `rotate_half` layout, which is also ours, so q/k
weights load unpermuted) with base rope_theta, softmax scaled by head_dim ** -0.5, SwiGLU, GQA,
tied or untied embeddings, and Llama 3.1's or linear rotary scaling (ModelConfig.rope_scaling).
Mistral is the same without a sliding window; Gemma adds three small switches
(ModelConfig.scale_embeddings, norm_offset = 1, mlp_activation = "gelu_tanh"); Qwen2 / 2.5 adds
biases to q, k and v (qkv_bias), Qwen3 an RMSNorm of each query and key head (qk_norm), both
without a sliding window.
Everything else in a config.json either has no effect on the forward pass (listed in
NO_EFFECT) or is refused with a ConfigError naming the file and field: nothing is approximated.
"""
from __future__ import annotations

import json
import os
from typing import Any, Optional

from rlhf_jax import storage
from rlhf_jax.data.tokenizer import EOC_PIECE
from rlhf_jax.errors import ConfigError
from rlhf_jax.model.config import ModelConfig

PREFIX = "hf:"  # a run reference naming a HuggingFace directory: init_from=hf:DIR
CONFIG_FILE = "config.json"
ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "gemma": "GemmaForCausalLM",
                 "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
NOT_IMPLEMENTED = {  # families asked for often, and what of theirs we do not compute
    "gemma2": "logit soft-capping, alternating sliding-window layers, post-attention and post-MLP norms",
    "gemma3": "a vision tower, alternating sliding-window layers with two rotary bases, four norms a layer",
    "gemma3_text": "alternating sliding-window layers with two rotary bases, four norms a layer"}
# Keys of rope_scaling / rope_parameters that each rotary type reads (the rest is refused).
ROPE_KEYS = {"default": set(), "linear": {"factor"},
             "llama3": {"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}}
QWEN_WINDOW = {"use_sliding_window", "sliding_window", "max_window_layers", "layer_types"}
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
  """A model directory's JSON file: a source's on local disk, or an imported run's (maybe in a bucket)."""
  if not storage.isfile(path):
    raise ConfigError(f"{path}: not found (a HuggingFace model directory has config.json, *.safetensors "
                      f"and tokenizer.model)")
  try:
    return json.loads(storage.read_text(path))
  except json.JSONDecodeError as e:
    raise ConfigError(f"{path}: not valid JSON ({e})") from None


def _rope(hf: dict, path: str) -> dict:
  """ModelConfig's rotary fields, from rope_theta and rope_scaling (transformers 4's config.json) or
  rope_parameters (transformers 5's)."""
  if hf.get("rope_scaling") is not None and hf.get("rope_parameters") is not None:
    raise ConfigError(f"{path}: unsupported: both rope_scaling and rope_parameters (one of them expected)")
  field = "rope_parameters" if hf.get("rope_parameters") is not None else "rope_scaling"
  spec = hf.get(field) or {}
  if not isinstance(spec, dict):
    raise ConfigError(f"{path}: unsupported: {field}={spec!r} (a dict expected)")
  key = "type" if "type" in spec and "rope_type" not in spec else "rope_type"
  kind = spec.get(key, "default")
  if kind not in ROPE_KEYS:
    raise ConfigError(f"{path}: unsupported: {field}.{key}={kind} (implemented: {', '.join(ROPE_KEYS)})")
  extra = sorted(set(spec) - ROPE_KEYS[kind] - {"rope_type", "type", "rope_theta"})
  if extra:
    raise ConfigError(f"{path}: unsupported: {field}.{extra[0]}={spec[extra[0]]!r} for rope_type={kind}")
  # transformers' default for a llama3 config without original_max_position_embeddings
  spec = {"original_max_position_embeddings": hf.get("max_position_embeddings"), **spec}
  missing = sorted(k for k in ROPE_KEYS[kind] if spec.get(k) is None)
  if missing:
    raise ConfigError(f"{path}: {field}.{missing[0]} missing (rope_type={kind} needs it)")
  out = {"rope_theta": float(spec.get("rope_theta", hf.get("rope_theta", 10000.0))),
         "rope_scaling": "none" if kind == "default" else kind}
  if kind != "default":
    out["rope_factor"] = float(spec["factor"])
  if kind == "llama3":
    out.update(rope_low_freq_factor=float(spec["low_freq_factor"]),
               rope_high_freq_factor=float(spec["high_freq_factor"]),
               rope_original_max_len=int(spec["original_max_position_embeddings"]))
  return out


def _check_fields(hf: dict, model_type: str, path: str) -> None:
  known = NO_EFFECT | SHAPE | set(MUST_BE) | {"mistral": {"sliding_window"}, "gemma": {"hidden_activation"},
                                              "qwen2": QWEN_WINDOW, "qwen3": QWEN_WINDOW}.get(model_type, set())
  unknown = sorted(set(hf) - known)
  if unknown:
    raise ConfigError(f"{path}: unsupported field {unknown[0]}={hf[unknown[0]]!r} for model_type="
                      f"{model_type} (rlhf_jax cannot tell whether it changes the model)")
  for field, allowed in MUST_BE.items():
    if field in hf and hf[field] not in allowed:
      raise ConfigError(f"{path}: unsupported: {field}={hf[field]!r} (rlhf_jax implements {allowed[0]!r})")
  window = hf.get("sliding_window")
  if model_type in ("qwen2", "qwen3"):
    window = _qwen_window(hf, path)
  if window is not None and window < hf.get("max_position_embeddings", 0):
    raise ConfigError(f"{path}: unsupported: sliding_window={window} < max_position_embeddings="
                      f"{hf['max_position_embeddings']} (sliding-window attention is not implemented)")


def _qwen_window(hf: dict, path: str) -> Optional[int]:
  """The sliding window some Qwen layer attends through, None when every layer attends to all: as
  transformers' Qwen2/3 configs, the window only with use_sliding_window, in the layers layer_types
  marks, by default those from max_window_layers on."""
  kinds = hf.get("layer_types")
  if kinds is not None and not set(kinds) <= {"full_attention", "sliding_attention"}:
    raise ConfigError(f"{path}: unsupported: layer_types={kinds}")
  if not hf.get("use_sliding_window"):
    return None
  if kinds is None:
    kinds = ["sliding_attention" if i >= hf.get("max_window_layers", 28) else "full_attention"
             for i in range(hf.get("num_hidden_layers", 0))]
  return hf.get("sliding_window") if "sliding_attention" in kinds else None


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
  path = storage.join(hf_dir, CONFIG_FILE)
  hf = read_json(path)
  model_type = hf.get("model_type")
  if model_type not in ARCHITECTURES:
    why = f"not implemented: {NOT_IMPLEMENTED[model_type]}; " if model_type in NOT_IMPLEMENTED else ""
    raise ConfigError(f"{path}: unsupported: model_type={model_type} ({why}supported: {', '.join(ARCHITECTURES)})")
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
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", model_type == "gemma")),
        mlp_activation=_activation(hf, model_type, path), scale_embeddings=model_type == "gemma",
        norm_offset=1.0 if model_type == "gemma" else 0.0, qkv_bias=model_type == "qwen2",
        qk_norm=model_type == "qwen3", **_rope(hf, path))
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
  path = storage.join(hf_dir, CONFIG_FILE)
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
          "unk_id": sp.unk_id(), "eoc_id": eoc if eoc != sp.unk_id() else eos, "source": storage.absolute(path)}


FAMILIES = {  # (Gemma's three switches, qkv_bias, qk_norm): the family whose computation that is
    (False, False, False): "llama", (True, False, False): "gemma", (False, True, False): "qwen2",
    (False, False, True): "qwen3"}


def _family(cfg: ModelConfig) -> str:
  switches = (cfg.mlp_activation, cfg.scale_embeddings, cfg.norm_offset)
  gemma = switches == ("gelu_tanh", True, 1.0)
  family = FAMILIES.get((gemma, cfg.qkv_bias, cfg.qk_norm))
  if family is None or not gemma and switches != ("silu", False, 0.0):
    raise ConfigError(f"no HuggingFace family computes mlp_activation={cfg.mlp_activation}, scale_embeddings="
                      f"{cfg.scale_embeddings}, norm_offset={cfg.norm_offset}, qkv_bias={cfg.qkv_bias}, "
                      f"qk_norm={cfg.qk_norm}: such a model is exported only with the config.json it was "
                      f"imported from")
  return family


def _rope_json(cfg: ModelConfig) -> Optional[dict]:
  if cfg.rope_scaling == "none":
    return None
  out = {"rope_type": cfg.rope_scaling, "factor": cfg.rope_factor}
  if cfg.rope_scaling == "llama3":
    out.update(low_freq_factor=cfg.rope_low_freq_factor, high_freq_factor=cfg.rope_high_freq_factor,
               original_max_position_embeddings=cfg.rope_original_max_len)
  return out


def config_json(cfg: ModelConfig, specials: dict, dtype: str) -> dict:
  """config.json for a model with none of its own (trained here from scratch): the family its
  switches are (Llama for our defaults), rotary settings as rope_theta and rope_scaling, which
  transformers 4 and 5 both read."""
  family = _family(cfg)
  hf = {"architectures": [ARCHITECTURES[family]], "model_type": family, "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model, "intermediate_size": cfg.mlp_dim, "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim,
        "hidden_act": "silu" if cfg.mlp_activation == "silu" else "gelu_pytorch_tanh",
        "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta,
        "rope_scaling": _rope_json(cfg), "tie_word_embeddings": cfg.tie_embeddings}
  if family in ("llama", "qwen3"):
    hf["attention_bias"] = False
  if family == "llama":
    hf["mlp_bias"] = False
  if family in ("qwen2", "qwen3"):
    hf.update(use_sliding_window=False, sliding_window=None)
  return hf | {"attention_dropout": 0.0, "bos_token_id": specials["bos_id"], "eos_token_id": specials["eos_id"],
               "pad_token_id": specials["pad_id"], "torch_dtype": dtype}
