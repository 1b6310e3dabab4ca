"""Comparisons as preference-model batches: each response appended to its prompt, closed with the
end-of-context token, truncated from the left, grouped [batch, K, seq] best first."""
from __future__ import annotations

from typing import Sequence

import numpy as np

from rlhf_jax.data.batching import Batcher, Encoded, encode_dialogue, fit_to_length
from rlhf_jax.data.tokenizer import Tokenizer


def encode_for_pm(tok: Tokenizer, dialogue: str) -> Encoded:
  """Dialogue tokens + EOS + EOC; loss mask on Assistant text (for the optional LM loss).

  The scalar head is read at the EOC token (Bai et al. 2022 append an end-of-context token to
  every sample the PM scores), so truncation keeps the end of the dialogue.
  """
  tokens, mask = encode_dialogue(tok, dialogue, assistant_only=True)
  return Encoded(tokens + [tok.eoc_id], mask + [False])


def encode_comparison(tok: Tokenizer, record: dict) -> list[Encoded]:
  """[chosen, rejected] of an hh-rlhf record (as from rlhf_jax.data.hh_rlhf)."""
  return [encode_for_pm(tok, record["prompt"] + record["chosen_response"]),
          encode_for_pm(tok, record["prompt"] + record["rejected_response"])]


class PMBatcher(Batcher):
  """Examples are groups of K encoded responses (best first) -> tokens [batch, K, seq] etc."""

  def _fit(self, group: Sequence[Encoded]) -> list[Encoded]:
    return [fit_to_length(ex, self.seq_len) for ex in group]

  def _filler(self):
    return self.examples[0]  # a real group: its scores are computed, then dropped by num_valid

  def _collate(self, groups: Sequence[Sequence[Encoded]]) -> dict[str, np.ndarray]:
    b, k = len(groups), len(groups[0])
    tokens = np.full((b, k, self.seq_len), self.pad_id, np.int32)
    attention = np.zeros((b, k, self.seq_len), bool)
    loss_mask = np.zeros((b, k, self.seq_len), np.float32)
    eoc_index = np.zeros((b, k), np.int32)
    for i, group in enumerate(groups):
      if len(group) != k:
        raise ValueError(f"comparison groups must all have {k} responses, got {len(group)}")
      for j, ex in enumerate(group):
        n = len(ex.tokens)
        tokens[i, j, :n], attention[i, j, :n], loss_mask[i, j, :n] = ex.tokens, True, ex.loss_mask
        eoc_index[i, j] = n - 1
    return {"tokens": tokens, "attention_mask": attention, "loss_mask": loss_mask, "eoc_index": eoc_index}


def split_in_halves(records: Sequence, seed: int) -> tuple[list, list]:
  """Two disjoint halves of a comparison set, chosen by a seeded permutation: data for a "train
  PM" and a "test PM" (Bai et al. 2022, section 4.3)."""
  order = np.random.default_rng(seed).permutation(len(records))
  half = len(records) // 2
  first, second = sorted(order[:half].tolist()), sorted(order[half:].tolist())
  return [records[i] for i in first], [records[i] for i in second]



def encode_pair(tok: Tokenizer, record: dict) -> list[Encoded]:
  """[chosen, rejected] dialogues of an hh-rlhf record with the loss mask on the final response
  (its text and EOS): the shared prompt's tokens are the same prefix in both, encoded turn by
  turn, so nothing but the responses enters the log-probability sums."""
  prompt = encode_dialogue(tok, record["prompt"], assistant_only=True).tokens[:-1]  # without its EOS
  out = []
  for response in (record["chosen_response"], record["rejected_response"]):
    ex = encode_dialogue(tok, record["prompt"] + response, assistant_only=True)
    out.append(Encoded(ex.tokens, [False] * len(prompt) + [True] * (len(ex.tokens) - len(prompt))))
  return out
