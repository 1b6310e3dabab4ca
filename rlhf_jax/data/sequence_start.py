"""What every tokenizer (SentencePiece, tokenizer.json, a test's stand-in) computes the same way
from its own `encode`, `bos_id` and `add_bos`: where a sequence starts."""
from __future__ import annotations

from typing import Optional


class SequenceStart:
  bos_id: Optional[int] = None
  add_bos = False  # a tokenizer trained here has no BOS; an imported one says in its special ids

  def bos_prefix(self) -> list[int]:
    """[BOS] where the model was pretrained with one opening every sequence, else []."""
    return [self.bos_id] if self.add_bos else []

  def encode_sequence(self, text: str) -> list[int]:
    """The ids of a text that starts a sequence: BOS first where the model expects one."""
    return self.bos_prefix() + self.encode(text)

  def encode_prompt(self, text: str) -> list[int]:
    """A prompt to sample a response after (chat-formatted by rlhf_jax.data.chat where asked)."""
    return self.encode_sequence(text)
