"""A GGUF file's vocabulary as the tokenizer files of a run directory: tokenizer.json (built with
HF `tokenizers`), tokenizer_specials.json and chat_template.jinja, as rlhf_jax.data.json_tokenizer
reads them.

tokenizer.ggml.model = gpt2 is byte-level BPE: tokens already in GPT-2's byte-to-unicode alphabet,
merges as "left right", token types (3 = control, 4 = user-defined: added tokens, matched whole
before BPE) and tokenizer.ggml.pre, which names the pre-tokenizer without storing it. PRE_SPLITS
holds the names we know, each with the split llama.cpp applies for it (llama-vocab.cpp) written as
the model's own tokenizer.json writes it: smollm (and the StarCoder family whose regex it shares)
splits digits one by one and then applies GPT-2's regex; llama-bpe is Llama 3's split, whose BPE
also looks a whole pre-token up in the vocabulary before merging (ignore_merges), and which starts
every sequence with BOS. Other names, and SentencePiece vocabularies (tokenizer.ggml.model = llama),
are refused.

Special ids: BOS, EOS, pad and unknown from tokenizer.ggml.*_token_id; pad falls back to EOS and
unknown to pad (byte-level BPE never needs one), EOC is EOS (see rlhf_jax.data.json_tokenizer).
"""
from __future__ import annotations

import json
import os
from typing import Any, Optional

from rlhf_jax.errors import ConfigError
from rlhf_jax.hf.gguf_model import GGUFFile

LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_SPLITS = {"gpt-2": "gpt2", "smollm": "digits", "starcoder": "digits", "refact": "digits", "llama-bpe": "llama3"}
CONTROL, USER_DEFINED = 3, 4  # tokenizer.ggml.token_type values (llama.cpp's llama_token_type)


def _pre_tokenizer(split: str):
  from tokenizers import Regex, pre_tokenizers
  byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=split != "llama3")
  if split == "gpt2":
    return byte_level
  first = (pre_tokenizers.Digits(individual_digits=True) if split == "digits"
           else pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated", invert=False))
  return pre_tokenizers.Sequence([first, byte_level])


def _merges(f: GGUFFile) -> list[tuple[str, str]]:
  out = []
  for i, merge in enumerate(f.get("tokenizer.ggml.merges")):
    cut = merge.find(" ", 1)  # as llama.cpp splits them: a left part may itself start with a space
    if cut < 0:
      raise ConfigError(f"{f.path}: tokenizer.ggml.merges[{i}]={merge!r} is not two tokens")
    out.append((merge[:cut], merge[cut + 1:]))
  return out


def _split_kind(f: GGUFFile) -> str:
  model = f.get("tokenizer.ggml.model", None)
  if model is None:
    raise ConfigError(f"{f.path}: missing metadata tokenizer.ggml.model (the file carries no tokenizer)")
  if model != "gpt2":
    raise ConfigError(f"{f.path}: unsupported: tokenizer.ggml.model={model} (only gpt2, byte-level BPE, is "
                      f"converted to a tokenizer.json)")
  pre = f.get("tokenizer.ggml.pre", "default")
  if pre not in PRE_SPLITS:
    raise ConfigError(f"{f.path}: unsupported: tokenizer.ggml.pre={pre} (known: {', '.join(PRE_SPLITS)})")
  return PRE_SPLITS[pre]


def tokenizer_json(f: GGUFFile) -> str:
  """tokenizer.json (the HF tokenizers library's serialisation) of the file's vocabulary."""
  import tokenizers
  from tokenizers import decoders, models, processors
  split = _split_kind(f)
  tokens, types = f.get("tokenizer.ggml.tokens"), f.get("tokenizer.ggml.token_type", None)
  vocab = {token: i for i, token in enumerate(tokens)}
  if len(vocab) != len(tokens):
    twice = next(t for i, t in enumerate(tokens) if vocab[t] != i)
    raise ConfigError(f"{f.path}: tokenizer.ggml.tokens holds {twice!r} twice")
  tok = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=_merges(f), ignore_merges=split == "llama3",
                                        fuse_unk=False, byte_fallback=False))
  tok.pre_tokenizer = _pre_tokenizer(split)
  tok.decoder = decoders.ByteLevel()
  tok.post_processor = processors.ByteLevel(trim_offsets=False)
  if types is not None:
    added = [tokenizers.AddedToken(tokens[i], special=kind == CONTROL, normalized=False)
             for i, kind in enumerate(types) if kind in (CONTROL, USER_DEFINED)]
    tok.add_special_tokens([a for a in added if a.special])
    tok.add_tokens([a for a in added if not a.special])
  return tok.to_str()


def special_ids(f: GGUFFile) -> dict[str, Any]:
  """tokenizer_specials.json's ids (see the module docstring)."""
  vocab = len(f.get("tokenizer.ggml.tokens"))

  def read(name: str) -> Optional[int]:
    value = f.get(f"tokenizer.ggml.{name}_token_id", None)
    if value is not None and not 0 <= value < vocab:
      raise ConfigError(f"{f.path}: tokenizer.ggml.{name}_token_id={value} is not an id of tokenizer.ggml.tokens "
                        f"({vocab} tokens)")
    return value

  eos = read("eos")
  if eos is None:
    raise ConfigError(f"{f.path}: missing metadata tokenizer.ggml.eos_token_id")
  bos, pad, unk = read("bos"), read("padding"), read("unknown")
  pad = eos if pad is None else pad
  add_bos = f.get("tokenizer.ggml.add_bos_token", _split_kind(f) == "llama3")
  return {"bos_id": bos, "eos_id": eos, "pad_id": pad, "unk_id": pad if unk is None else unk, "eoc_id": eos,
          "add_bos": bool(add_bos and bos is not None), "vocab_size": vocab, "source": os.path.abspath(f.path)}


def chat_template(f: GGUFFile) -> Optional[str]:
  return f.get("tokenizer.chat_template", None)


def tokenizer_config(f: GGUFFile, specials: dict, max_len: int) -> str:
  """tokenizer_config.json for an export of the imported model: its special tokens by name."""
  tokens = f.get("tokenizer.ggml.tokens")
  name = lambda key: None if specials[key] is None else tokens[specials[key]]
  own_unk = f.get("tokenizer.ggml.unknown_token_id", None) is not None  # not pad standing in for one
  config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": name("bos_id"), "eos_token": name("eos_id"),
            "pad_token": name("pad_id"), "unk_token": name("unk_id") if own_unk else None,
            "add_bos_token": specials["add_bos"], "add_eos_token": False, "model_max_length": max_len}
  if chat_template(f) is not None:
    config["chat_template"] = chat_template(f)
  return json.dumps(config, indent=2) + "\n"
