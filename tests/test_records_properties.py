"""Generated inputs for the hh-rlhf readers and the dialogue functions: whatever the bytes, a reader
returns records or raises MalformedRecordError naming the file and line (DataError for a problem of
the whole file), and nothing else; skipping malformed records accounts for every line.
"""
import gzip
import json
import os
import zlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rlhf_jax.data.dialogue import ASSISTANT, HUMAN, human_turns_prompt, parse_turns, split_comparison
from rlhf_jax.data.hh_rlhf.records import MalformedRecordError, read_comparisons, read_prompts, read_red_team
from rlhf_jax.errors import DataError, UserError

# Small runs (the file takes seconds); no example database written into the checkout.
SMALL = settings(max_examples=150, deadline=None, database=None,
                 suppress_health_check=[HealthCheck.too_slow])

# --- strategies -----------------------------------------------------------------------------------

MARKERS = [HUMAN, ASSISTANT, HUMAN + " ", ASSISTANT + " ", "Human:", "Assistant:", "\n", "\n\n", " ", ":"]
lone_surrogates = st.text(alphabet=st.characters(categories=["Cs"]), min_size=1, max_size=2)
words = st.one_of(st.text(max_size=6), lone_surrogates)
# Mostly marker soup: texts with turns in every order, with or without text before the first.
dialogues = st.lists(st.one_of(st.sampled_from(MARKERS), words), max_size=8).map("".join)
turns = st.lists(st.tuples(st.sampled_from([HUMAN, ASSISTANT]), st.text(max_size=6)), min_size=1, max_size=4)
well_formed = turns.map(lambda ts: "".join(f"{m} {t}" for m, t in ts) + ASSISTANT)

json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), words),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=4), inner, max_size=3)),
    max_leaves=8)

FIELDS = ["chosen", "rejected", "prompt", "transcript", "rating", "min_harmlessness_score_transcript",
          "task_description"]


def _complete(prefix, a, b, rating):
  """A record usable by every reader (comparison, prompt, red-team transcript) when its texts are."""
  return {"chosen": prefix + a, "rejected": prefix + b, "prompt": prefix, "transcript": prefix + a,
          "rating": rating, "min_harmlessness_score_transcript": rating, "task_description": b or "t"}


complete = st.builds(_complete, well_formed, st.one_of(st.just(""), dialogues), dialogues,
                     st.one_of(st.integers(-5, 5), st.floats(allow_nan=False)))
ties = st.builds(lambda p, a: _complete(p, a, a, 1), well_formed, dialogues)
texts = st.one_of(dialogues, well_formed, st.builds(lambda p, a: p + a, well_formed, dialogues))
# The right fields, of the right type, holding any text: turns that do not parse or are not shared.
dialogue_fields = st.one_of(st.fixed_dictionaries({"chosen": texts, "rejected": texts}),
                            st.fixed_dictionaries({"prompt": texts}))
# Objects with fields missing, extra or of the wrong type.
partial = st.dictionaries(st.sampled_from(FIELDS + ["extra"]), st.one_of(dialogues, json_values), max_size=8)
broken = st.builds(lambda r, drop: {k: v for k, v in r.items() if k not in drop}, complete,
                   st.sets(st.sampled_from(FIELDS), max_size=2))


def _encode(value, ascii_only: bool) -> bytes:
  # Unescaped lone surrogates come out as the invalid UTF-8 some broken writers produce.
  return json.dumps(value, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")


records = st.one_of(complete, ties, dialogue_fields, partial, broken, json_values)
json_lines = st.builds(_encode, records, st.booleans())
# Valid for every reader: plain text only (no lone surrogates, hence no invalid UTF-8 either).
valid_lines = st.builds(_encode, st.builds(_complete, well_formed, st.text(max_size=8), st.text(max_size=8),
                                           st.integers(-5, 5)), st.booleans())
truncated = st.builds(lambda line, k: line[:k], json_lines, st.integers(0, 120))
JUNK = [b"\xff", b"\xc3", b"\xed\xa0\x80", b"\x80", b'"', b"\\", b"{", b"\x00", b"\xef\xbb\xbf", b"1" * 5000,
        b"[" * 3000]
spliced = st.builds(lambda line, i, junk: line[:i] + junk + line[i:], json_lines, st.integers(0, 120),
                    st.sampled_from(JUNK))
# Records, valid or nearly, weigh most: a line of random bytes fails at once, at the UTF-8 or JSON step.
lines = st.one_of(valid_lines, json_lines, valid_lines, json_lines, truncated, spliced, st.binary(max_size=60),
                  st.sampled_from([b"", b"  ", b"\r", b"\t \x0c"]))
# One physical line each: a newline inside would only make it two lines.
one_line = lines.map(lambda b: b.replace(b"\n", b" "))


# --- helpers --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tmp_dir(tmp_path_factory):
  return tmp_path_factory.mktemp("generated")


def _file(tmp_dir, data: bytes, gz: bool, name="records") -> str:
  path = os.path.join(tmp_dir, name + (".jsonl.gz" if gz else ".jsonl"))
  with open(path, "wb") as f:
    f.write(gzip.compress(data) if gz else data)
  return path


def _outcome(read, path, **kwargs):
  """(records, report) or the MalformedRecordError / DataError; any other exception fails the test."""
  try:
    return read(path, **kwargs)
  except (MalformedRecordError, DataError) as e:
    assert isinstance(e, UserError) and isinstance(e, ValueError)
    return e


def _check_named(e, path, numbers):
  if isinstance(e, MalformedRecordError):
    assert e.path == path and e.line in numbers, (e.line, numbers)
    assert str(e).startswith(f"{path}, line {e.line}")
  else:
    assert str(e).startswith(f"{path}: ")


READERS = {"comparisons": read_comparisons, "prompts": read_prompts, "red_team": read_red_team}


# --- readers --------------------------------------------------------------------------------------

@SMALL
@pytest.mark.parametrize("reader", sorted(READERS))
@given(rows=st.lists(one_line, max_size=6), gz=st.booleans(), final_newline=st.booleans())
def test_any_lines_parse_or_name_the_line(tmp_dir, reader, rows, gz, final_newline):
  read = READERS[reader]
  data = b"\n".join(rows) + (b"\n" if final_newline and rows else b"")
  path = _file(tmp_dir, data, gz, reader)
  non_blank = [n for n, row in enumerate(rows, start=1) if row.strip()]
  if reader == "red_team" and data.lstrip().startswith(b"["):  # read as one JSON array instead
    for skip in (False, True):
      got = _outcome(read, path, skip_malformed=skip)
      if isinstance(got, MalformedRecordError):
        assert got.path == path and got.line >= 1
    return

  strict, lenient = _outcome(read, path), _outcome(read, path, skip_malformed=True)
  for got in (strict, lenient):
    if isinstance(got, Exception):
      _check_named(got, path, non_blank)
  assert not isinstance(lenient, MalformedRecordError)  # skipped, never raised
  if isinstance(lenient, DataError):
    assert str(lenient).startswith(f"{path}: no records")
    return
  records, report = lenient
  ties_left_out = 0 if report.ties_kept else report.ties
  assert report.records == len(records) > 0
  assert report.records + report.num_skipped + ties_left_out == len(non_blank)  # every line accounted for
  assert all(m.startswith(f"{path}, line ") for m in report.first_errors)
  if report.num_skipped:  # strict reading stops at the first of them
    assert isinstance(strict, MalformedRecordError) and str(strict) == report.first_errors[0]
  else:
    assert strict[0] == records


@SMALL
@given(rows=st.lists(valid_lines, min_size=1, max_size=5), cut=st.integers(0, 600),
       flip=st.one_of(st.none(), st.tuples(st.integers(0, 600), st.integers(1, 255))))
def test_damaged_gzip_is_a_data_error(tmp_dir, rows, cut, flip):
  data = gzip.compress(b"\n".join(rows) + b"\n")
  damaged = bytearray(data[:cut])
  if flip and flip[0] < len(damaged):
    damaged[flip[0]] ^= flip[1]
  path = os.path.join(tmp_dir, "damaged.jsonl.gz")
  with open(path, "wb") as f:
    f.write(damaged)
  for read in READERS.values():
    got = _outcome(read, path)
    if isinstance(got, Exception):
      _check_named(got, path, range(1, len(rows) + 1))
    if flip is None and 2 <= cut < len(data):  # cut short, undamaged: the last complete line is named
      complete = zlib.decompressobj(wbits=31).decompress(bytes(damaged)).count(b"\n")
      assert isinstance(got, DataError) and str(got) == f"{path}: truncated gzip after line {complete}"


@SMALL
@given(items=st.lists(st.one_of(complete, broken, partial, json_values), max_size=5),
       cut=st.one_of(st.none(), st.integers(0, 300)))
def test_red_team_array_parses_or_names_the_item(tmp_dir, items, cut):
  text = _encode(items, ascii_only=False)
  path = _file(tmp_dir, text if cut is None else text[:cut], gz=False, name="red_array")
  for skip in (False, True):
    got = _outcome(read_red_team, path, skip_malformed=skip)
    if isinstance(got, MalformedRecordError):
      assert got.path == path and got.line >= 1
      if cut is None and not skip:  # whole and valid JSON: the line is the array index, 1-based
        assert got.line <= len(items)
    elif not isinstance(got, DataError):
      assert [r["line"] for r in got[0]] == sorted(r["line"] for r in got[0])


# --- dialogue -------------------------------------------------------------------------------------

def _starts_with_marker(text):
  return text.startswith(HUMAN) or text.startswith(ASSISTANT)


@SMALL
@given(dialogues)
def test_parse_turns_is_lossless_or_a_value_error(dialogue):
  try:
    parsed = parse_turns(dialogue)
  except ValueError:
    assert not _starts_with_marker(dialogue)
    return
  assert _starts_with_marker(dialogue)
  assert "".join(f"\n\n{t.role}:{t.raw}" for t in parsed) == dialogue
  try:
    prompt = human_turns_prompt(dialogue)
  except ValueError:
    assert parsed[0].role == "Assistant"
  else:
    assert prompt.startswith(HUMAN) and prompt.endswith(ASSISTANT)


@SMALL
@given(shared=st.one_of(well_formed, dialogues), a=dialogues, b=dialogues)
def test_split_comparison_is_exact_or_a_value_error(shared, a, b):
  chosen, rejected = shared + a, shared + b
  common = os.path.commonprefix([chosen, rejected])
  try:
    c = split_comparison(chosen, rejected)
  except ValueError:
    assert ASSISTANT not in common
    return
  assert c.prompt + c.chosen == chosen and c.prompt + c.rejected == rejected
  # The prompt ends after the last Assistant marker lying wholly in the shared text.
  assert len(c.prompt) == common.rfind(ASSISTANT) + len(ASSISTANT)
