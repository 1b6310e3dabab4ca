"""SentencePiece tokenizer trained on the corpus in use, with the special tokens RLHF needs.

Fixed ids: 0 = padding, 1 = unknown, 2 = end of text (EOS, ends every response), 3 = end of
context (EOC: appended to a dialogue, the position where the preference model reads its score).
Byte fallback means no text is ever unrepresentable, the identity normaliser keeps the
"\\n\\nHuman: " markers (newlines, repeated spaces) exactly, so decode(encode(x)) == x, and with
no dummy prefix, encoding a text in pieces and concatenating decodes to the whole text.

A pretrained model's tokenizer.model (imported by rlhf_jax.hf) keeps its own ids, written by the
import into tokenizer_specials.json beside it: BOS, EOS and pad from the model's config.json
(pad, when it names none, is the tokenizer's pad piece, else its unknown piece: never produced
from text with byte fallback, and pads are always masked), and EOC = EOS (such a vocabulary has
no spare piece; the preference model then reads its score at an EOS appended after the one that
ends the response). `encode` never adds BOS, nor SentencePiece's dummy-prefix space (Llama's
tokenizer adds one to every text: the turns of a dialogue are encoded one by one), for either kind.
"""
from __future__ import annotations

import io
import json
import os
from typing import Iterable, Sequence

import sentencepiece as spm

from rlhf_jax import hosts, storage
from rlhf_jax.data.json_tokenizer import CHAT_TEMPLATE_FILE, JSON_FILE, SPECIALS_FILE, JsonTokenizer
from rlhf_jax.data.sequence_start import SequenceStart
from rlhf_jax.errors import ConfigError

PAD_ID, UNK_ID, EOS_ID, EOC_ID = 0, 1, 2, 3
EOC_PIECE = "<|endofcontext|>"
MODEL_FILE = "tokenizer.model"
TOKENIZER_FILES = (MODEL_FILE, JSON_FILE)  # a run directory holds one of them


class Tokenizer(SequenceStart):

  def __init__(self, model_path: str):
    self.path = os.fspath(model_path)
    proto = storage.read_bytes(self.path)  # from bytes: the file may be an object in a bucket
    self._sp = spm.SentencePieceProcessor(model_proto=proto)
    specials = storage.join(storage.dirname(self.path), SPECIALS_FILE)
    self.bos_id, self.add_bos = None, False
    self.pretrained = storage.exists(specials)  # a model's own vocabulary, not one trained here
    if self.pretrained:
      self._read_specials(specials)
      self._sp = _without_dummy_prefix(self._sp, proto)
    elif self._sp.piece_to_id(EOC_PIECE) != EOC_ID or self._sp.pad_id() != PAD_ID or self._sp.eos_id() != EOS_ID:
      raise ValueError(f"{self.path} was not trained by rlhf_jax.data.tokenizer.train_tokenizer "
                       f"(expected pad={PAD_ID}, eos={EOS_ID}, {EOC_PIECE}={EOC_ID}), and has no "
                       f"{SPECIALS_FILE} beside it (a pretrained model's: rlhf_jax.hf imports one)")
    self._special = {self.pad_id, self.unk_id, self.eos_id, self.eoc_id, self.bos_id} - {None}

  def _read_specials(self, path: str) -> None:
    ids = json.loads(storage.read_text(path))
    self.add_bos = bool(ids.get("add_bos", False))
    for key in ("pad_id", "unk_id", "eos_id", "eoc_id", "bos_id"):
      value = ids.get(key)
      if value is None and key == "bos_id":
        continue
      if not isinstance(value, int) or not 0 <= value < self.vocab_size:
        raise ConfigError(f"{path}: {key}={value!r} is not a token id of {self.path} "
                          f"({self.vocab_size} pieces)")
      setattr(self, key, value)

  @property
  def vocab_size(self) -> int:
    return self._sp.get_piece_size()

  pad_id, unk_id, eos_id, eoc_id = PAD_ID, UNK_ID, EOS_ID, EOC_ID  # an imported model's: its own

  def chat_template(self) -> None:
    return None  # SentencePiece models imported here carry none

  def token_text(self, token_id: int) -> str:
    return self._sp.id_to_piece(token_id)

  def encode(self, text: str) -> list[int]:
    return self._sp.encode(text)

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    return self._sp.encode(list(texts))

  def decode(self, ids: Iterable[int]) -> str:
    """Text of the ids, special tokens (pad, unknown, BOS, EOS, EOC) left out."""
    return self._sp.decode([int(i) for i in ids if int(i) not in self._special])

  def copy_to(self, directory: str) -> None:
    """Writes this tokenizer (and an imported one's special ids) into a run directory."""
    storage.copy(self.path, storage.join(directory, MODEL_FILE))
    for stale in (JSON_FILE, CHAT_TEMPLATE_FILE):  # another kind of tokenizer's, left by an earlier run
      if storage.exists(storage.join(directory, stale)):
        storage.remove(storage.join(directory, stale))
    specials = storage.join(storage.dirname(self.path), SPECIALS_FILE)
    target = storage.join(directory, SPECIALS_FILE)
    if storage.exists(specials):
      storage.copy(specials, target)
    elif storage.exists(target):  # left by another tokenizer: it would relabel this one's ids
      storage.remove(target)


def _without_dummy_prefix(sp: spm.SentencePieceProcessor, model: bytes) -> spm.SentencePieceProcessor:
  # Llama's tokenizer.model prepends a space ("dummy prefix") to every text it encodes: the turns
  # of a dialogue, encoded one by one, would each gain one. Within a document the model saw none.
  from sentencepiece import sentencepiece_model_pb2
  proto = sentencepiece_model_pb2.ModelProto()
  proto.ParseFromString(model)
  if not proto.normalizer_spec.add_dummy_prefix:
    return sp
  proto.normalizer_spec.add_dummy_prefix = False
  return spm.SentencePieceProcessor(model_proto=proto.SerializeToString())


def _training_sentences(texts: Iterable[str]) -> Iterable[str]:
  # SentencePiece skips sentences over max_sentence_length; whole dialogues can be long, so
  # it learns from their turns (markers included) instead.
  for text in texts:
    for part in text.split("\n\n"):
      if part:
        yield "\n\n" + part


def train_tokenizer(texts: Iterable[str], vocab_size: int, output_dir: str) -> Tokenizer:
  """Trains a BPE model on texts, writes <output_dir>/tokenizer.model, returns it loaded. The
  trainer writes the model to memory, so output_dir may be in a bucket. Every process of a job
  calls it alike: the lead's model is the one written and loaded."""
  storage.makedirs(output_dir)
  model = io.BytesIO()
  sentences = list(_training_sentences(texts))
  try:
    _train_bpe(sentences, vocab_size, model)
  except RuntimeError as e:
    if "Vocabulary size too high" not in str(e):
      raise
    limit = str(e).split("<=")[-1].strip(" .") if "<=" in str(e) else "fewer"
    raise ConfigError(f"model.vocab_size={vocab_size} is more than a tokenizer trained on these "
                      f"{len(sentences)} texts can hold (at most {limit}): lower model.vocab_size, or "
                      f"reuse a tokenizer (tokenizer.path, or init_from a run that has one)") from None
  path = storage.join(output_dir, MODEL_FILE)
  if hosts.is_lead():
    if storage.exists(storage.join(output_dir, SPECIALS_FILE)):  # an earlier, imported tokenizer's
      storage.remove(storage.join(output_dir, SPECIALS_FILE))
    storage.write_atomic(path, model.getvalue())  # a killed run never leaves a half-written model behind
  hosts.barrier(f"tokenizer {path}")
  return Tokenizer(path)


def _train_bpe(sentences: list[str], vocab_size: int, model: io.BytesIO) -> None:
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(sentences), model_writer=model,
      vocab_size=vocab_size, model_type="bpe", character_coverage=0.9995, byte_fallback=True,
      pad_id=PAD_ID, unk_id=UNK_ID, eos_id=EOS_ID, bos_id=-1, user_defined_symbols=[EOC_PIECE, "\n"],
      normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=False,
      split_digits=True,
      allow_whitespace_only_pieces=True, max_sentence_length=16384, num_threads=1,
      shuffle_input_sentence=False, minloglevel=2)


def tokenizer_file(directory: str) -> str:
  """The tokenizer a run or model directory holds: tokenizer.model, else tokenizer.json."""
  for name in TOKENIZER_FILES:
    if storage.exists(storage.join(directory, name)):
      return storage.join(directory, name)
  raise ConfigError(f"{directory}: no tokenizer ({' or '.join(TOKENIZER_FILES)})")


def has_tokenizer(directory: str) -> bool:
  return any(storage.exists(storage.join(directory, name)) for name in TOKENIZER_FILES)


def load_tokenizer(path: str):
  """The tokenizer of a run / model directory, or of a tokenizer file: SentencePiece (.model) or a
  pretrained model's tokenizer.json; both answer the same calls."""
  path = tokenizer_file(path) if storage.isdir(path) else os.fspath(path)
  return JsonTokenizer(path) if path.endswith(".json") else Tokenizer(path)


def same_tokenizer(*run_dirs: str):
  paths = [tokenizer_file(d) for d in run_dirs]
  first = storage.read_bytes(paths[0])
  for p in paths[1:]:
    if storage.read_bytes(p) != first:
      raise ConfigError(f"{p} differs from {paths[0]}: the policy and PMs must share one tokenizer")
  return load_tokenizer(paths[0])
