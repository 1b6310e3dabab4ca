"""Reading hh-rlhf files: every record validated, every problem named (file, line, field).

A malformed record is an error by default. With `skip_malformed=True` it is skipped and
counted in the returned `ReadReport` instead, so nothing is ever dropped silently. Problems of a
whole file (empty, truncated or corrupt gzip) are a `DataError` naming the file.

A comparison whose chosen and rejected texts are identical (a tie) teaches a preference model
nothing and always counts as wrong in accuracy, so ties are left out unless `keep_ties=True`;
either way they are counted in the report.
"""
from __future__ import annotations

import collections
import dataclasses
import gzip
import io
import json
import os
import zlib
from typing import Any, Callable, Iterable, Iterator, Optional

from rlhf_jax import storage
from rlhf_jax.data.dialogue import ASSISTANT, parse_turns, split_comparison
from rlhf_jax.errors import DataError, UserError


class MalformedRecordError(UserError, ValueError):

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
  ties: int = 0  # comparisons with chosen == rejected, whether kept or left out
  ties_kept: bool = False
  tie_lines: list = dataclasses.field(default_factory=list)  # the first 10, for the log

  @property
  def num_skipped(self) -> int:
    return sum(self.skipped.values())

  def count(self, error: "MalformedRecordError") -> None:
    """Records a skipped record; its kind is the problem without the details in brackets."""
    self.skipped[error.problem.split(" (")[0]] += 1
    if len(self.first_errors) < 10:
      self.first_errors.append(str(error))

  def count_tie(self, line: int) -> None:
    self.ties += 1
    if len(self.tie_lines) < 10:
      self.tie_lines.append(line)

  def summary(self) -> str:
    s = f"{self.path}: {self.records} records"
    if self.num_skipped:
      kinds = ", ".join(f"{n} {p}" for p, n in self.skipped.most_common())
      s += f", {self.num_skipped} malformed skipped ({kinds})"
    if self.ties:
      lines = ", ".join(map(str, self.tie_lines)) + (", ..." if self.ties > len(self.tie_lines) else "")
      s += f", {self.ties} ties (chosen == rejected) {'kept' if self.ties_kept else 'left out'} (lines {lines})"
    return s


# --- bytes and lines ------------------------------------------------------------------------------

_GZIP_ERRORS = (EOFError, gzip.BadGzipFile, zlib.error)


def _gzip_error(path: str, error: Exception, complete_lines: int) -> DataError:
  if isinstance(error, EOFError):  # the stream stops before gzip's end marker: a cut download
    return DataError(f"{path}: truncated gzip after line {complete_lines}")
  after = f" after line {complete_lines}" if complete_lines else ""
  return DataError(f"{path}: not a valid gzip file ({error}){after}")


def _open(path: str):
  if storage.is_remote(path):  # read whole (these files fit in memory), then parsed as a local file is
    raw = io.BytesIO(storage.read_bytes(path))
    return gzip.GzipFile(fileobj=raw, mode="rb") if path.endswith(".gz") else raw
  return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


def _lines(path: str) -> Iterator[tuple[int, bytes]]:
  """(1-based line number, raw line). A last line without a newline is held back until the end of
  the file is confirmed, so the tail of a truncated gzip never passes for a record."""
  complete, tail = 0, None
  with _open(path) as f:
    try:
      for number, raw in enumerate(f, start=1):
        if raw.endswith(b"\n"):
          complete = number
          yield number, raw
        else:
          tail = (number, raw)
    except _GZIP_ERRORS as e:
      raise _gzip_error(path, e, complete) from None
  if tail:
    yield tail


def _read_bytes(path: str) -> bytes:
  chunks = []
  with _open(path) as f:
    try:  # read1: what was decompressed before an error is kept, to say how far the file goes
      while chunk := f.read1(1 << 16):
        chunks.append(chunk)
    except _GZIP_ERRORS as e:
      raise _gzip_error(path, e, sum(c.count(b"\n") for c in chunks)) from None
  return b"".join(chunks)


# --- fields ---------------------------------------------------------------------------------------

def _decode(raw: bytes, path: str, line: int) -> str:
  try:
    return raw.decode("utf-8")
  except UnicodeDecodeError as e:
    raise MalformedRecordError(path, line, f"invalid UTF-8 (at byte {e.start})") from None


def _loads(text: str, path: str, line: int, whole_file: bool = False) -> Any:
  """json.loads, every failure a MalformedRecordError; for a whole file, at the line where
  parsing stopped."""
  try:
    return json.loads(text)
  except json.JSONDecodeError as e:
    at = e.lineno if whole_file else line
    raise MalformedRecordError(path, at, f"not JSON ({e.msg} at column {e.colno})") from None
  except RecursionError:
    raise MalformedRecordError(path, line, "not JSON (nested too deeply)") from None
  except ValueError as e:  # checks beyond the syntax, e.g. an integer of over 4,300 digits
    raise MalformedRecordError(path, line, f"not JSON ({str(e).split(':')[0]})") from None


def _check_unicode(value: str, field: str, path: str, line: int) -> None:
  # JSON may escape a lone surrogate ("\ud800"): a str here, but one no later stage can encode.
  try:
    value.encode("utf-8")
  except UnicodeEncodeError as e:
    raise MalformedRecordError(path, line, f"invalid Unicode (lone surrogate at character {e.start})",
                               field) from None


def _text_field(record: dict, field: str, path: str, line: int) -> str:
  if field not in record:
    raise MalformedRecordError(path, line, "missing field", field)
  value = record[field]
  if not isinstance(value, str):
    raise MalformedRecordError(path, line, f"not a string ({type(value).__name__})", field)
  if not value.strip():
    raise MalformedRecordError(path, line, "empty text", field)
  _check_unicode(value, field, path, line)
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
  record = _loads(_decode(raw, path, line), path, line)
  if not isinstance(record, dict):
    raise MalformedRecordError(path, line, f"not a JSON object ({type(record).__name__})")
  return record


# --- whole files ----------------------------------------------------------------------------------

def _parse_all(path: str, rows: Iterable[tuple[int, Any]], parse: Callable, skip_malformed: bool
               ) -> tuple[list, ReadReport]:
  """parse(row, path, line_number) for every row; malformed ones raise or are skipped and counted."""
  report, out = ReadReport(path), []
  for line, row in rows:
    try:
      out.append(parse(row, path, line))
    except MalformedRecordError as e:
      if not skip_malformed:
        raise
      report.count(e)
  return out, report


def _non_blank(lines: Iterable[tuple[int, bytes]]) -> Iterator[tuple[int, bytes]]:
  return ((n, raw) for n, raw in lines if raw.strip())


def _finish(records: list, report: ReadReport) -> tuple[list, ReadReport]:
  """An empty result is an error: training on it would only fail later, far from the cause."""
  report.records = len(records)
  if not records:
    left = [f"{report.num_skipped} malformed skipped"] if report.num_skipped else []
    if report.ties and not report.ties_kept:
      left.append(f"{report.ties} ties (chosen == rejected) left out")
    raise DataError(f"{report.path}: no records" + (f" ({', '.join(left)})" if left else ""))
  return records, report


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


def read_comparisons(path: str, *, skip_malformed: bool = False, keep_ties: bool = False
                     ) -> tuple[list[dict], ReadReport]:
  """All comparisons of a gzip (or plain) JSONL file of {"chosen", "rejected"} dialogues.

  Blank lines are not records and are ignored. Each returned record also carries the shared
  prompt, both responses and its 1-based line number. Ties (chosen == rejected) are counted in
  the report and left out unless keep_ties.
  """
  path = os.fspath(path)
  records, report = _parse_all(path, _non_blank(_lines(path)), _comparison, skip_malformed)
  report.ties_kept = keep_ties
  for r in records:
    if r["chosen"] == r["rejected"]:
      report.count_tie(r["line"])
  if not keep_ties:
    records = [r for r in records if r["chosen"] != r["rejected"]]
  return _finish(records, report)


def _prompt(raw: bytes, path: str, line: int) -> str:
  return _text_field(_json_object(raw, path, line), "prompt", path, line)


def read_prompts(path: str, *, skip_malformed: bool = False) -> tuple[list[str], ReadReport]:
  """A prompt file for RLHF: JSONL (gzip or plain) of {"prompt": TEXT}, each TEXT the dialogue the
  policy continues, normally ending with "\n\nAssistant:"."""
  path = os.fspath(path)
  return _finish(*_parse_all(path, _non_blank(_lines(path)), _prompt, skip_malformed))


# --- red-team attempts ----------------------------------------------------------------------------

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
    if kind is str:
      _check_unicode(record[field], field, path, i)
  return {k: record[k] for k in RED_TEAM_FIELDS} | {"line": i}


def _red_team_line(raw: bytes, path: str, line: int) -> dict:
  return _red_team_record(_loads(_decode(raw, path, line), path, line), path, line)


def _json_array(data: bytes, path: str) -> list:
  """The published format: one JSON array; any problem here leaves nothing usable."""
  try:
    text = data.decode("utf-8")
  except UnicodeDecodeError as e:
    start = data.rfind(b"\n", 0, e.start) + 1
    raise MalformedRecordError(path, data.count(b"\n", 0, e.start) + 1,
                               f"invalid UTF-8 (at byte {e.start - start})") from None
  return _loads(text, path, 1, whole_file=True)  # a truncated download, typically, fails here


def read_red_team(path: str, *, skip_malformed: bool = False) -> tuple[list[dict], ReadReport]:
  """red-team-attempts: one JSON array (as published; "line" is then the 1-based array index)
  or JSONL of transcript records."""
  path = os.fspath(path)
  data = _read_bytes(path)
  if data.lstrip().startswith(b"["):
    items = enumerate(_json_array(data, path), start=1)
    return _finish(*_parse_all(path, items, _red_team_record, skip_malformed))
  # Only b"\n" ends a line: str.splitlines would also cut at U+2028 and the like inside strings.
  lines = _non_blank(enumerate(data.split(b"\n"), start=1))
  return _finish(*_parse_all(path, lines, _red_team_line, skip_malformed))
