"""Dialogue text: turns, and the (prompt, chosen response, rejected response) split, on hand-written
dialogues and on every record of the real harmless-base test file."""
import gzip
import json
import os

import pytest

from rlhf_jax.data import locations
from rlhf_jax.data.dialogue import ASSISTANT, HUMAN, Turn, human_turns_prompt, parse_turns, split_comparison


def _real_records():
  hh_rlhf = locations.local_copy(locations.HH_RLHF)  # `make test` passes ../shared/data
  real = os.path.join(hh_rlhf, "harmless-base", "test.jsonl.gz") if hh_rlhf else ""
  if not os.path.exists(real):
    pytest.skip(f"no real harmless-base/test: ${locations.ENV}={os.environ.get(locations.ENV)!r}")
  with gzip.open(real, "rt", encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


def _reference_prompt(chosen: str, rejected: str) -> str:
  """Independent of split_comparison: the longest prefix of both texts that ends right after an
  Assistant marker, found by trying every marker of `chosen` from the last one back."""
  ends, start = [], 0
  while (i := chosen.find(ASSISTANT, start)) >= 0:
    ends.append(i + len(ASSISTANT))
    start = i + 1
  for end in reversed(ends):
    if rejected[:end] == chosen[:end]:
      return chosen[:end]
  raise AssertionError("no shared Assistant marker")


# --- parse_turns ----------------------------------------------------------------------------------


def _role_text(turns):
  return [(t.role, t.text) for t in turns]

def test_parse_turns_roles_and_texts():
  d = "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: How are you?\n\nAssistant: Fine, thanks."
  assert _role_text(parse_turns(d)) == [("Human", "Hi there"), ("Assistant", "Hello!"),
                                        ("Human", "How are you?"), ("Assistant", "Fine, thanks.")]


def test_parse_turns_multiline_text_stays_in_its_turn():
  # Single newlines and a blank line not followed by a marker are part of the text.
  d = "\n\nHuman: line one\nline two\n\nstill me\n\nAssistant: a\n  b\n"
  assert _role_text(parse_turns(d)) == [("Human", "line one\nline two\n\nstill me"), ("Assistant", "a\n  b\n")]


def test_parse_turns_only_one_space_is_stripped_and_empty_final_turn():
  d = "\n\nHuman:  two spaces\n\nAssistant:"
  assert parse_turns(d) == [Turn("Human", " two spaces", "  two spaces"), Turn("Assistant", "", "")]
  assert parse_turns("\n\nHuman:no space") == [Turn("Human", "no space", "no space")]


@pytest.mark.parametrize("d", ["Hello\n\nHuman: hi\n\nAssistant: yo", " \n\nHuman: hi", "",
                               "no markers at all", "\nHuman: one newline only"])
def test_parse_turns_rejects_text_before_first_marker(d):
  with pytest.raises(ValueError, match="does not start with"):
    parse_turns(d)


def test_human_turns_prompt():
  d = "\n\nHuman: first\nquestion\n\nAssistant: answer\n\nHuman: second"
  assert human_turns_prompt(d) == "\n\nHuman: first\nquestion\n\nAssistant:"
  with pytest.raises(ValueError, match="Human"):
    human_turns_prompt("\n\nAssistant: I speak first")


# --- split_comparison -----------------------------------------------------------------------------

def _check_split(chosen, rejected, prompt, chosen_response, rejected_response):
  c = split_comparison(chosen, rejected)
  assert c == (prompt, chosen_response, rejected_response)
  assert c.prompt + c.chosen == chosen and c.prompt + c.rejected == rejected
  assert c.prompt.endswith(ASSISTANT)


def test_split_ordinary():
  prompt = "\n\nHuman: What is 2+2?\n\nAssistant: 4\n\nHuman: And 3+3?\n\nAssistant:"
  _check_split(prompt + " 6", prompt + " Seven, I think.", prompt, " 6", " Seven, I think.")


def test_split_responses_with_common_beginning():
  # The responses share " I think it" but are cut at the marker, not at the first difference.
  prompt = "\n\nHuman: Is it raining?\n\nAssistant:"
  _check_split(prompt + " I think it is.", prompt + " I think it isn't.", prompt,
               " I think it is.", " I think it isn't.")


def test_split_dialogues_differing_in_an_earlier_turn():
  shared = "\n\nHuman: Hi\n\nAssistant:"
  chosen = shared + " Hello.\n\nHuman: Tell me a joke\n\nAssistant: Knock knock."
  rejected = shared + " Hello.\n\nHuman: Tell me a secret\n\nAssistant: No."
  _check_split(chosen, rejected, shared, chosen[len(shared):], rejected[len(shared):])


def test_split_one_dialogue_extends_the_other():
  prompt = "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant:"
  chosen = prompt + " d"
  rejected = prompt + " d\n\nHuman: e\n\nAssistant: f"
  _check_split(chosen, rejected, prompt, " d", " d\n\nHuman: e\n\nAssistant: f")


def test_split_marker_must_lie_wholly_in_the_shared_prefix():
  # The texts agree up to "...\n\nAssistant" and differ at the colon: that marker is not shared.
  first = "\n\nHuman: a\n\nAssistant:"
  chosen = first + " b\n\nHuman: c\n\nAssistant: d"
  rejected = first + " b\n\nHuman: c\n\nAssistant? d"
  _check_split(chosen, rejected, first, chosen[len(first):], rejected[len(first):])


def test_split_identical_texts():
  d = "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant: same"
  _check_split(d, d, d[:-len(" same")], " same", " same")


@pytest.mark.parametrize("chosen,rejected", [
    ("\n\nHuman: one\n\nAssistant: x", "\n\nHuman: two\n\nAssistant: x"),
    ("\n\nHuman: one\n\nAssistant: x", "\n\nHuman: one"),
    ("\n\nHuman: no reply yet", "\n\nHuman: no reply yet"),
])
def test_split_without_shared_assistant_turn_raises(chosen, rejected):
  with pytest.raises(ValueError, match="no Assistant turn"):
    split_comparison(chosen, rejected)


def test_split_every_real_record():
  records = _real_records()
  assert len(records) == 2312
  earlier = 0
  for i, r in enumerate(records, start=1):
    chosen, rejected = r["chosen"], r["rejected"]
    c = split_comparison(chosen, rejected)
    assert c.prompt + c.chosen == chosen, i
    assert c.prompt + c.rejected == rejected, i
    assert c.prompt.endswith(ASSISTANT), i
    assert c.prompt == _reference_prompt(chosen, rejected), i
    # Both texts parse, and the prompt ends at a turn boundary of each.
    assert parse_turns(chosen) and parse_turns(rejected)
    assert c.chosen.startswith(" ") or c.chosen == "" or c.chosen.startswith(HUMAN), i
    last = lambda d: d[:d.rfind(ASSISTANT) + len(ASSISTANT)]
    if c.prompt != last(chosen) or c.prompt != last(rejected):
      earlier += 1
  assert earlier == 5  # the records whose texts already differ before the final Assistant turn
