"""Stand-ins the evaluation tests share."""

from rlhf_jax.data.sequence_start import SequenceStart


class CharTok(SequenceStart):
  """One token per character, so requests decode back to their text exactly."""
  eos_id = 2

  def encode(self, text):
    return [ord(ch) for ch in text]

  def decode(self, ids):
    return "".join(chr(i) for i in ids)
