"""Reading hh-rlhf files: every record validated, every problem named (file, line, field).

A malformed record is an error by default. With `skip_malformed=True` it is skipped and
counted in the returned `ReadReport` instead, so nothing is ever dropped silently.
"""
from __future__ import annotations

import collections
import dataclasses
import gzip
import json
import os
from typing import Any, Iterator, Optional

from rlhf_jax.dialogue import ASSISTANT, parse_turns, split_comparison


class MalformedRecordError(ValueError):

  def __init__(self, path: str, line: int, problem: str, field: Optional[str] = None):
    self.path, self.line, self.field, self.problem = path, line, field, problem
    where = f"{path}, line {line}" + (f", field {field!r}" if field else "")
    super().__init__(f"{where}: {problem}")


@dataclasses.dataclass
class ReadReport:
  path: str
  records: int = 0  # records returned
  skipped: collections.Counter = dataclasses.field(default_factory=collections.Counter)  # problem -> n
  first_errors: list = dataclasses.field(default_factory=list)  # up to 10 messages, for the log

  @property
  def num_skipped(self) -> int:
    return sum(self.skipped.values())

  def count(self, error: "MalformedRecordError") -> None:
    """Records a skipped record; its kind is the problem without the details in brackets."""
    self.skipped[error.problem.split(" (")[0]] += 1
    if len(self.first_errors) < 10:
      self.first_errors.append(str(error))

  def summary(self) -> str:
    s = f"{self.path}: {self.records} records"
    if self.num_skipped:
      kinds = ", ".join(f"{n} {p}" for p, n in self.skipped.most_common())
      s += f", {self.num_skipped} malformed skipped ({kinds})"
    return s


def _lines(path: str) -> Iterator[tuple[int, bytes]]:
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "rb") as f:
    for number, raw in enumerate(f, start=1):
      yield number, raw


def _text_field(record: dict, field: str, path: str, line: int) -> str:
  if field not in record:
    raise MalformedRecordError(path, line, "missing field", field)
  value = record[field]
  if not isinstance(value, str):
    raise MalformedRecordError(path, line, f"not a string ({type(value).__name__})", field)
  if not value.strip():
    raise MalformedRecordError(path, line, "empty text", field)
  return value


def _dialogue_field(record: dict, field: str, path: str, line: int) -> str:
  value = _text_field(record, field, path, line)
  if ASSISTANT not in value:
    raise MalformedRecordError(path, line, "no Assistant turn", field)
  try:
    parse_turns(value)
  except ValueError as e:
    raise MalformedRecordError(path, line, str(e), field) from None
  return value


def _json_object(raw: bytes, path: str, line: int) -> dict:
  try:
    text = raw.decode("utf-8")
  except UnicodeDecodeError as e:
    raise MalformedRecordError(path, line, f"invalid UTF-8 (at byte {e.start})") from None
  try:
    record = json.loads(text)
  except json.JSONDecodeError as e:
    raise MalformedRecordError(path, line, f"not JSON ({e.msg} at column {e.colno})") from None
  if not isinstance(record, dict):
    raise MalformedRecordError(path, line, f"not a JSON object ({type(record).__name__})")
  return record


def _comparison(raw: bytes, path: str, line: int) -> dict[str, Any]:
  record = _json_object(raw, path, line)
  chosen = _dialogue_field(record, "chosen", path, line)
  rejected = _dialogue_field(record, "rejected", path, line)
  try:
    prompt, chosen_response, rejected_response = split_comparison(chosen, rejected)
  except ValueError as e:
    raise MalformedRecordError(path, line, str(e)) from None
  return {"chosen": chosen, "rejected": rejected, "prompt": prompt,
          "chosen_response": chosen_response, "rejected_response": rejected_response,
          "line": line}


def _read_jsonl(path: str, parse, skip_malformed: bool) -> tuple[list, ReadReport]:
  """parse(raw_line, path, line_number) for every non-blank line; malformed ones raise or are
  skipped and counted."""
  path = os.fspath(path)
  report, out = ReadReport(path), []
  for line, raw in _lines(path):
    if not raw.strip():
      continue
    try:
      out.append(parse(raw, path, line))
    except MalformedRecordError as e:
      if not skip_malformed:
        raise
      report.count(e)
  report.records = len(out)
  return out, report


def read_comparisons(path: str, *, skip_malformed: bool = False) -> tuple[list[dict], ReadReport]:
  """All comparisons of a gzip (or plain) JSONL file of {"chosen", "rejected"} dialogues.

  Blank lines are not records and are ignored. Each returned record also carries the shared
  prompt, both responses and its 1-based line number.
  """
  return _read_jsonl(path, _comparison, skip_malformed)


def _prompt(raw: bytes, path: str, line: int) -> str:
  return _text_field(_json_object(raw, path, line), "prompt", path, line)


def read_prompts(path: str, *, skip_malformed: bool = False) -> tuple[list[str], ReadReport]:
  """A prompt file for RLHF: JSONL (gzip or plain) of {"prompt": TEXT}, each TEXT the dialogue the
  policy continues, normally ending with "\n\nAssistant:"."""
  return _read_jsonl(path, _prompt, skip_malformed)


RED_TEAM_FIELDS = {"transcript": str, "rating": (int, float), "min_harmlessness_score_transcript": (int, float),
                   "task_description": str}


def _red_team_record(record: Any, path: str, i: int) -> dict:
  if not isinstance(record, dict):
    raise MalformedRecordError(path, i, f"not a JSON object ({type(record).__name__})")
  for field, kind in RED_TEAM_FIELDS.items():
    if field not in record:
      raise MalformedRecordError(path, i, "missing field", field)
    if not isinstance(record[field], kind) or isinstance(record[field], bool):
      raise MalformedRecordError(path, i, f"wrong type ({type(record[field]).__name__})", field)
  return {k: record[k] for k in RED_TEAM_FIELDS} | {"line": i}


def read_red_team(path: str, *, skip_malformed: bool = False) -> tuple[list[dict], ReadReport]:
  """red-team-attempts: one JSON array (as published; "line" is then the 1-based array index)
  or JSONL of transcript records."""
  path = os.fspath(path)
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "rb") as f:
    data = f.read()
  try:
    text = data.decode("utf-8")
  except UnicodeDecodeError as e:
    raise MalformedRecordError(path, 1, f"invalid UTF-8 (at byte {e.start})") from None
  report, out = ReadReport(path), []

  def parse(i: int, raw: str, make):
    try:
      out.append(make(i, raw))
    except MalformedRecordError as e:
      if not skip_malformed:
        raise
      report.count(e)

  def from_json(i, raw):
    try:
      return _red_team_record(json.loads(raw), path, i)
    except json.JSONDecodeError as e:
      raise MalformedRecordError(path, i, f"not JSON ({e.msg})") from None

  if text.lstrip().startswith("["):
    try:
      items = json.loads(text)
    except json.JSONDecodeError as e:  # a truncated download, typically: nothing is usable
      raise MalformedRecordError(path, e.lineno, f"not JSON ({e.msg} at column {e.colno})") from None
    for i, record in enumerate(items, start=1):
      parse(i, record, lambda i, r: _red_team_record(r, path, i))
  else:
    for i, row in enumerate(text.splitlines(), start=1):
      if row.strip():
        parse(i, row, from_json)
  report.records = len(out)
  return out, report
