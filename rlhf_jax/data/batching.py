"""From dialogues to fixed-shape token batches: encoding with loss masks, truncation, packing,
and a deterministic, resumable example order.

Every batch is a pure function of (examples, seed, position): position counts examples consumed
since the start of training, is stored in the train state, and is all a resumed run needs.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np

from rlhf_jax.data.dialogue import parse_turns
from rlhf_jax.data.tokenizer import Tokenizer


class Encoded(NamedTuple):
  tokens: list[int]
  loss_mask: list[bool]  # loss_mask[t]: token t is a training target


def encode_dialogue(tok: Tokenizer, dialogue: str, *, assistant_only: bool) -> Encoded:
  """Turn by turn (markers and texts encoded separately, so spans are exact), then EOS.

  assistant_only: targets are the Assistant turns' texts and the final EOS (SFT);
  otherwise every token is a target (pretraining, distillation).
  """
  if hasattr(tok, "encode_chat_dialogue"):  # data.chat_template: the model's own format
    return Encoded(*tok.encode_chat_dialogue(dialogue, assistant_only=assistant_only))
  tokens = tok.bos_prefix()
  mask = [False] * len(tokens)
  for turn in parse_turns(dialogue):
    marker, text = tok.encode(f"\n\n{turn.role}:"), tok.encode(turn.raw)
    target = not assistant_only or turn.role == "Assistant"
    tokens += marker + text
    mask += [not assistant_only] * len(marker) + [target] * len(text)
  return Encoded(tokens + [tok.eos_id], mask + [True])


def fit_to_length(example: Encoded, seq_len: int) -> Encoded:
  """Truncates to seq_len keeping the end: for a dialogue, the last (assistant) turn is what
  matters and the oldest context goes first."""
  return Encoded(example.tokens[-seq_len:], example.loss_mask[-seq_len:])


def pad_batch(examples: Sequence[Encoded], seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
  """Right-pads to [batch, seq_len]: tokens, loss_mask (float32), attention_mask (bool)."""
  batch = len(examples)
  tokens = np.full((batch, seq_len), pad_id, np.int32)
  loss_mask = np.zeros((batch, seq_len), np.float32)
  attention = np.zeros((batch, seq_len), bool)
  for i, ex in enumerate(examples):
    n = len(ex.tokens)
    if n > seq_len:
      raise ValueError(f"example {i} has {n} tokens > seq_len {seq_len}; call fit_to_length first")
    tokens[i, :n], loss_mask[i, :n], attention[i, :n] = ex.tokens, ex.loss_mask, True
  return {"tokens": tokens, "loss_mask": loss_mask, "attention_mask": attention}


def pack(examples: Sequence[Encoded], seq_len: int) -> list[Encoded]:
  """Concatenates examples (each already ends in EOS) and cuts the stream into full rows of
  seq_len (GPT-style packing: no padding; the short tail is dropped)."""
  tokens = [t for ex in examples for t in ex.tokens]
  mask = [m for ex in examples for m in ex.loss_mask]
  return [Encoded(tokens[i:i + seq_len], mask[i:i + seq_len])
          for i in range(0, len(tokens) - seq_len + 1, seq_len)]


class Batcher:
  """Fixed-shape batches of encoded examples, in a seeded order, resumable from a position.

  Subclasses change what an example is by overriding `_fit`, `_collate` and `_filler`
  (the preference-model batcher's examples are groups of responses).
  """

  def __init__(self, examples: Sequence, *, batch_size: int, seq_len: int, seed: int, pad_id: int):
    if not len(examples):  # else the first batch_at fails far from here, dividing by zero
      raise ValueError(f"{type(self).__name__}: no examples to batch")
    self.batch_size, self.seq_len, self.seed, self.pad_id = batch_size, seq_len, seed, pad_id
    self.examples = [self._fit(ex) for ex in examples]
    self._perms: dict[int, np.ndarray] = {}

  def _fit(self, example: Encoded) -> Encoded:
    return fit_to_length(example, self.seq_len)

  def _collate(self, rows: Sequence) -> dict[str, np.ndarray]:
    return pad_batch(rows, self.seq_len, self.pad_id)

  def _filler(self):
    return Encoded([self.pad_id], [False])  # all-masked: contributes nothing to sums

  def __len__(self) -> int:
    return len(self.examples)

  def _index(self, p: int) -> int:
    epoch, offset = divmod(p, len(self.examples))
    if epoch not in self._perms:  # cached: one permutation per epoch, not per example
      self._perms = {epoch: np.random.default_rng([self.seed, epoch]).permutation(len(self.examples))}
    return int(self._perms[epoch][offset])

  def batch_at(self, position: int) -> dict[str, np.ndarray]:
    rows = [self.examples[self._index(p)] for p in range(position, position + self.batch_size)]
    return self._collate(rows)

  def in_order(self) -> list[dict[str, np.ndarray]]:
    """Every example once, in file order, in batches (the last one padded with filler rows):
    for evaluation over a whole split. Each batch carries 'num_valid', its count of real rows."""
    out = []
    for start in range(0, len(self.examples), self.batch_size):
      rows = list(self.examples[start:start + self.batch_size])
      num_valid = len(rows)
      rows += [self._filler()] * (self.batch_size - num_valid)
      out.append(dict(self._collate(rows), num_valid=np.int32(num_valid)))
    return out
