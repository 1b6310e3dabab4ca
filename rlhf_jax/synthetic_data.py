"""A synthetic language for smoke runs and tests: arithmetic sequences modulo the vocabulary.

Row i of the stream is x_t = 1 + (a + s * t) mod (vocab - 1) with (a, s) drawn from a generator
seeded by (seed, i): a model that infers s from the first tokens predicts the rest exactly, so
the loss has a known floor near 0 and falls quickly. Any batch is a pure function of
(seed, position), which makes data order deterministic and resumable. Token 0 is reserved (pad).
"""
from __future__ import annotations

import numpy as np


def arithmetic_batch(seed: int, position: int, batch_size: int, seq_len: int,
                     vocab_size: int) -> dict[str, np.ndarray]:
  """Examples position .. position + batch_size - 1 of the stream as an LM batch."""
  rows = []
  for i in range(position, position + batch_size):
    rng = np.random.default_rng([seed, i])
    start, stride = rng.integers(0, vocab_size - 1), rng.integers(1, 8)
    rows.append(1 + (start + stride * np.arange(seq_len)) % (vocab_size - 1))
  tokens = np.stack(rows).astype(np.int32)
  ones = np.ones_like(tokens, dtype=bool)
  return {"tokens": tokens, "loss_mask": ones.astype(np.float32), "attention_mask": ones}
