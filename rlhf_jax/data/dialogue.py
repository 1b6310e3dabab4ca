"""hh-rlhf dialogue text: turns, and the (shared prompt, chosen response, rejected response) split.

A dialogue is a string of turns, each introduced by "\\n\\nHuman: " or "\\n\\nAssistant: ". The two
texts of a comparison normally share everything up to the final Assistant turn; in a few records
(5 of the 2,312 in harmless-base test) they already differ earlier, so the prompt is taken as the
longest common prefix that ends right after an Assistant marker.
"""
from __future__ import annotations

import re
from typing import NamedTuple

HUMAN = "\n\nHuman:"
ASSISTANT = "\n\nAssistant:"
_TURN = re.compile(r"\n\n(Human|Assistant):")


class Turn(NamedTuple):
  role: str  # "Human" or "Assistant"
  text: str  # without the marker and the single space after it
  raw: str  # exactly what follows the marker up to the next one (lossless)


class Comparison(NamedTuple):
  prompt: str  # dialogue up to and including the last shared "\n\nAssistant:"
  chosen: str  # the preferred continuation (starts with the space after the marker)
  rejected: str


def parse_turns(dialogue: str) -> list[Turn]:
  """Splits a dialogue into turns; text before the first marker is an error (returned by raising)."""
  starts = list(_TURN.finditer(dialogue))
  if not starts or starts[0].start() != 0:
    raise ValueError("dialogue does not start with a '\\n\\nHuman:' or '\\n\\nAssistant:' turn")
  turns = []
  for m, nxt in zip(starts, starts[1:] + [None]):
    text = dialogue[m.end():nxt.start() if nxt else len(dialogue)]
    turns.append(Turn(m.group(1), text[1:] if text.startswith(" ") else text, text))
  return turns


def split_comparison(chosen: str, rejected: str) -> Comparison:
  """Shared prompt and the two responses; raises ValueError if there is no shared Assistant turn."""
  common = 0
  limit = min(len(chosen), len(rejected))
  while common < limit and chosen[common] == rejected[common]:
    common += 1
  cut = chosen.rfind(ASSISTANT, 0, common)  # the marker must lie wholly in the shared prefix
  if cut < 0:
    raise ValueError("the two dialogues share no Assistant turn to respond to")
  cut += len(ASSISTANT)
  return Comparison(chosen[:cut], chosen[cut:], rejected[cut:])


def human_turns_prompt(dialogue: str) -> str:
  """The dialogue cut right after its first Human turn, ending with an Assistant marker:
  the prompt a policy continues during RLHF."""
  turns = parse_turns(dialogue)
  if turns[0].role != "Human":
    raise ValueError("dialogue does not open with a Human turn")
  return f"{HUMAN} {turns[0].text}{ASSISTANT}"
