"""A tokenizer.json model's special ids and chat template, read from its config.json,
tokenizer_config.json and tokenizer.json (see rlhf_jax.data.json_tokenizer for how they are used).

EOS and pad come from config.json, else from the tokenizer config's token strings, BOS from the
tokenizer config where it names one (even as null: Qwen's config.json has an unused id); an EOS
list (Llama 3.x instruct models end on any of several) keeps the tokenizer config's EOS if it is
one of them, else the first. Pad falls back to EOS (pads are always masked), unk to pad (byte-level
BPE has no unknown token), EOC is EOS. BOS opens every sequence where the tokenizer config says so
(add_bos_token) or, failing that, where tokenizer.json's post-processor puts it before a single text.
"""
from __future__ import annotations

import json
from typing import Any, Optional

from rlhf_jax import storage
from rlhf_jax.errors import ConfigError
from rlhf_jax.hf.config import CONFIG_FILE, read_json

TOKENIZER_CONFIG = "tokenizer_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"  # transformers >= 4.47 saves the template beside the config


def _token_name(value: Any) -> Optional[str]:
  return value.get("content") if isinstance(value, dict) else value  # a string, or an AddedToken dict


def _post_processor_adds(tokenizer_json: dict, token: Optional[str]) -> bool:
  """Whether the post-processor puts `token` before a single text (Llama 3's TemplateProcessing)."""
  post = tokenizer_json.get("post_processor") or {}
  steps = post.get("processors", [post]) if post.get("type") == "Sequence" else [post]
  for step in steps:
    single = (step.get("single") or []) if step.get("type") == "TemplateProcessing" else []
    if single and single[0].get("SpecialToken", {}).get("id") == token:
      return True
  return False


def special_ids(hf_dir: str, tokenizer_path: str) -> dict[str, Any]:
  import tokenizers
  config_path = storage.join(hf_dir, CONFIG_FILE)
  hf = read_json(config_path)
  tc_path = storage.join(hf_dir, TOKENIZER_CONFIG)
  tc = read_json(tc_path) if storage.exists(tc_path) else {}
  text = storage.read_text(tokenizer_path)
  try:
    tok = tokenizers.Tokenizer.from_str(text)
  except Exception as e:  # the library raises a bare Exception for malformed files
    raise ConfigError(f"{tokenizer_path}: not a tokenizer.json the tokenizers library reads ({e})") from None
  vocab = tok.get_vocab_size(with_added_tokens=True)
  named = lambda field: tok.token_to_id(_token_name(tc.get(field)) or "") if tc.get(field) else None

  def pick(field: str, token_field: str) -> Optional[int]:
    value = hf.get(field)
    if isinstance(value, list):
      value = named(token_field) if named(token_field) in value else (value[0] if value else None)
    if value is None or value < 0:
      value = named(token_field)
    if value is not None and not 0 <= value < vocab:
      raise ConfigError(f"{config_path}: {field}={value} is not an id of {tokenizer_path} ({vocab} tokens)")
    return value

  eos = pick("eos_token_id", "eos_token")
  if eos is None:
    raise ConfigError(f"{config_path}: no eos_token_id, and {TOKENIZER_CONFIG} names no eos_token")
  # Qwen's config.json names a bos_token_id its tokenizer never uses (bos_token: null): the
  # tokenizer config, where it says, decides.
  bos = named("bos_token") if "bos_token" in tc else pick("bos_token_id", "bos_token")
  pad = pick("pad_token_id", "pad_token")
  pad = eos if pad is None else pad
  unk = named("unk_token")
  bos_name = tok.id_to_token(bos) if bos is not None else None
  add_bos = tc.get("add_bos_token")
  add_bos = _post_processor_adds(json.loads(text), bos_name) if add_bos is None else bool(add_bos)
  return {"bos_id": bos, "eos_id": eos, "pad_id": pad, "unk_id": pad if unk is None else unk, "eoc_id": eos,
          "add_bos": bool(add_bos and bos is not None), "vocab_size": vocab, "source": storage.absolute(config_path)}


def chat_template(hf_dir: str) -> Optional[str]:
  """The model's chat template (Jinja), if it has one: chat_template.jinja, else the tokenizer config's."""
  path = storage.join(hf_dir, CHAT_TEMPLATE_FILE)
  if storage.exists(path):
    return storage.read_text(path)
  tc_path = storage.join(hf_dir, TOKENIZER_CONFIG)
  template = read_json(tc_path).get("chat_template") if storage.exists(tc_path) else None
  if isinstance(template, list):  # named templates: the default one
    template = next((t.get("template") for t in template if t.get("name") == "default"), None)
  return template if isinstance(template, str) else None
