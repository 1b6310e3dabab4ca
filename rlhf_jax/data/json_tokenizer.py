"""A pretrained model's tokenizer.json (HF `tokenizers`: byte-level BPE of Llama 3, Qwen, SmolLM2),
behind the interface of rlhf_jax.data.tokenizer.Tokenizer.

Its ids sit in tokenizer_specials.json beside it, written by the import (rlhf_jax.hf): BOS, EOS
and pad from the model's config, EOC = EOS (a pretrained vocabulary has no spare token; the PM
reads its score at an EOS appended after the one that ends the response), unk = pad where the
vocabulary has no unknown token (byte-level BPE never needs one), and `add_bos` where the family
was pretrained with a BOS at the start of every sequence. `encode` adds no special token: a
dialogue is encoded turn by turn, and BOS, where it belongs, goes once at the start (bos_prefix).
"""
from __future__ import annotations

import json
import os
from typing import Iterable, Sequence

from rlhf_jax import storage
from rlhf_jax.data.sequence_start import SequenceStart
from rlhf_jax.errors import ConfigError

JSON_FILE = "tokenizer.json"
SPECIALS_FILE = "tokenizer_specials.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"  # the model's chat template, where it has one
COPIED = (JSON_FILE, SPECIALS_FILE, CHAT_TEMPLATE_FILE)


def read_specials(path: str, vocab_size: int, tokenizer_path: str) -> dict:
  """tokenizer_specials.json's ids, each checked to be an id of the tokenizer."""
  ids = json.loads(storage.read_text(path))
  out = {"add_bos": bool(ids.get("add_bos", False))}
  for key in ("pad_id", "unk_id", "eos_id", "eoc_id", "bos_id"):
    value = ids.get(key)
    if value is None and key == "bos_id":
      out[key] = None
      continue
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < vocab_size:
      raise ConfigError(f"{path}: {key}={value!r} is not a token id of {tokenizer_path} ({vocab_size} tokens)")
    out[key] = value
  if out["add_bos"] and out["bos_id"] is None:
    raise ConfigError(f"{path}: add_bos is set but bos_id is not")
  return out


class JsonTokenizer(SequenceStart):

  def __init__(self, path: str):
    import tokenizers  # Rust, no torch; only imported models need it
    self.path = os.fspath(path)
    try:  # read here and parsed from memory: the file may be an object in a bucket
      data = storage.read_bytes(self.path)
    except FileNotFoundError:
      raise ConfigError(f"{self.path}: no such file") from None
    try:
      self._tok = tokenizers.Tokenizer.from_buffer(data)
    except Exception as e:  # the library raises a bare Exception for malformed files
      raise ConfigError(f"{self.path}: not a tokenizer.json the tokenizers library reads ({e})") from None
    specials = storage.join(storage.dirname(self.path), SPECIALS_FILE)
    if not storage.exists(specials):
      raise ConfigError(f"{self.path}: no {SPECIALS_FILE} beside it (a model's tokenizer.json is used through "
                        f"rlhf_jax.hf's import, which writes its special ids)")
    ids = read_specials(specials, self.vocab_size, self.path)
    self.pad_id, self.unk_id, self.eos_id, self.eoc_id = ids["pad_id"], ids["unk_id"], ids["eos_id"], ids["eoc_id"]
    self.bos_id, self.add_bos = ids["bos_id"], ids["add_bos"]
    self.pretrained = True
    self._special = {self.pad_id, self.unk_id, self.eos_id, self.eoc_id, self.bos_id} - {None}

  @property
  def vocab_size(self) -> int:
    return self._tok.get_vocab_size(with_added_tokens=True)

  def token_text(self, token_id: int) -> str:
    return self._tok.id_to_token(token_id)

  def encode(self, text: str) -> list[int]:
    return self._tok.encode(text, add_special_tokens=False).ids

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

  def decode(self, ids: Iterable[int]) -> str:
    """Text of the ids, special tokens (pad, unknown, BOS, EOS, EOC) left out."""
    return self._tok.decode([int(i) for i in ids if int(i) not in self._special], skip_special_tokens=False)

  def chat_template(self) -> str | None:
    path = storage.join(storage.dirname(self.path), CHAT_TEMPLATE_FILE)
    return storage.read_text(path) if storage.exists(path) else None

  def copy_to(self, directory: str) -> None:
    """Writes this tokenizer, its ids and chat template into a run directory."""
    source = storage.dirname(self.path)
    if storage.exists(storage.join(directory, "tokenizer.model")):  # another kind's, left by an earlier run
      storage.remove(storage.join(directory, "tokenizer.model"))
    for name in COPIED:
      if storage.exists(storage.join(source, name)):
        storage.copy(storage.join(source, name), storage.join(directory, name))
