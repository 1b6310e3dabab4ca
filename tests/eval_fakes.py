"""Stand-ins the evaluation tests share."""


class CharTok:
  """One token per character, so requests decode back to their text exactly."""
  eos_id = 2

  def encode(self, text):
    return [ord(ch) for ch in text]

  def bos_prefix(self):  # no BOS, as a tokenizer trained here
    return []

  def encode_sequence(self, text):
    return self.encode(text)

  def encode_prompt(self, text):
    return self.encode(text)

  def decode(self, ids):
    return "".join(chr(i) for i in ids)
