"""hh-rlhf readers, catalog and TFDS builder: every malformed record named by file, line and field;
skipped ones counted; the builder returns exactly what the reader reads."""
import gzip
import json
import os

import pytest

from rlhf_jax.dialogue import split_comparison
from rlhf_jax.hh_rlhf import catalog
from rlhf_jax.hh_rlhf.records import MalformedRecordError, read_comparisons, read_red_team

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REAL = os.path.join(ROOT, "..", "shared", "data", "hh-rlhf", "harmless-base", "test.jsonl.gz")


def _dialogue(q, a):
  return f"\n\nHuman: {q}\n\nAssistant: {a}"


def _good(i):
  return json.dumps({"chosen": _dialogue(f"question {i}", f"yes {i}"),
                     "rejected": _dialogue(f"question {i}", f"no {i}")}).encode()


def _write(path, lines: list[bytes]):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with gzip.open(path, "wb") as f:
    f.write(b"\n".join(lines) + b"\n")
  return str(path)


OK_TEXT = _dialogue("q", "a")
# kind -> (bad line, field named in the error or None, problem text)
MALFORMED = {
    "not_json": (b'{"chosen": "\\n\\nHuman: q', None, "not JSON"),
    "not_object": (b'["\\n\\nHuman: q\\n\\nAssistant: a"]', None, "not a JSON object (list)"),
    "missing_chosen": (json.dumps({"rejected": OK_TEXT}).encode(), "chosen", "missing field"),
    "missing_rejected": (json.dumps({"chosen": OK_TEXT}).encode(), "rejected", "missing field"),
    "non_string": (json.dumps({"chosen": OK_TEXT, "rejected": 7}).encode(), "rejected",
                   "not a string (int)"),
    "null": (json.dumps({"chosen": None, "rejected": OK_TEXT}).encode(), "chosen",
             "not a string (NoneType)"),
    "empty": (json.dumps({"chosen": " \n ", "rejected": OK_TEXT}).encode(), "chosen", "empty text"),
    "no_assistant": (json.dumps({"chosen": OK_TEXT, "rejected": "\n\nHuman: q"}).encode(), "rejected",
                     "no Assistant turn"),
    "text_before_marker": (json.dumps({"chosen": "Hi" + OK_TEXT, "rejected": OK_TEXT}).encode(), "chosen",
                           "does not start with"),
    "no_shared_turn": (json.dumps({"chosen": _dialogue("q1", "a"), "rejected": _dialogue("q2", "a")}).encode(),
                       None, "share no Assistant turn"),
    # 0xff can never occur in UTF-8; it sits at byte 14 of the line (0-based).
    "bad_utf8": (b'{"chosen": "\\n\xff\\nHuman: q\\n\\nAssistant: a", "rejected": "x"}', None,
                 "invalid UTF-8 (at byte 14)"),
}


# --- read_comparisons -----------------------------------------------------------------------------

def test_real_file_reads_completely():
  if not os.path.exists(REAL):
    pytest.skip(f"real data not on this machine: {REAL}")
  records, report = read_comparisons(REAL)
  assert len(records) == 2312 and report.records == 2312 and report.num_skipped == 0
  assert [r["line"] for r in records] == list(range(1, 2313))
  with gzip.open(REAL, "rt", encoding="utf-8") as f:
    raw = [json.loads(line) for line in f]
  for r, j in zip(records, raw):
    assert (r["chosen"], r["rejected"]) == (j["chosen"], j["rejected"])
    assert (r["prompt"], r["chosen_response"], r["rejected_response"]) == split_comparison(j["chosen"],
                                                                                        j["rejected"])


def test_bundled_sample_is_the_first_400_real_records():
  sample = os.path.join(catalog.SAMPLE_DIR, "harmless-base", "test.jsonl.gz")
  records, _ = read_comparisons(sample)
  assert len(records) == 400
  if os.path.exists(REAL):
    assert records == read_comparisons(REAL)[0][:400]


@pytest.mark.parametrize("kind", sorted(MALFORMED))
def test_malformed_record_is_named(tmp_path, kind):
  bad, field, problem = MALFORMED[kind]
  path = _write(tmp_path / f"{kind}.jsonl.gz", [_good(1), _good(2), b"", _good(3), bad, _good(5)])
  with pytest.raises(MalformedRecordError) as info:
    read_comparisons(path)
  e, message = info.value, str(info.value)
  assert isinstance(e, ValueError)
  assert e.path == path and e.line == 5 and e.field == field  # the blank line 3 still counts
  assert message.startswith(f"{path}, line 5")
  assert problem in e.problem and problem in message
  if field:
    assert f"field '{field}'" in message
  else:
    assert "field" not in message.split(": ")[0]


def test_plain_jsonl_and_blank_lines(tmp_path):
  path = tmp_path / "plain.jsonl"
  path.write_bytes(b"\n" + _good(1) + b"\n  \n\n" + _good(2) + b"\r\n\n")
  records, report = read_comparisons(path)
  assert [r["line"] for r in records] == [2, 5]  # physical 1-based line numbers
  assert [r["chosen_response"] for r in records] == [" yes 1", " yes 2"]
  assert report.records == 2 and report.num_skipped == 0
  assert "malformed" not in report.summary()


def test_skip_malformed_counts_every_kind(tmp_path):
  lines, good_numbers = [], []
  kinds = sorted(MALFORMED)
  for i, kind in enumerate(kinds):
    lines.append(_good(i))
    good_numbers.append(len(lines))
    lines.append(MALFORMED[kind][0])
    lines.append(b"")  # blank lines are not records, and not malformed
  path = _write(tmp_path / "mixed.jsonl.gz", lines)

  records, report = read_comparisons(path, skip_malformed=True)
  assert [r["line"] for r in records] == good_numbers
  assert [r["chosen_response"] for r in records] == [f" yes {i}" for i in range(len(kinds))]
  assert report.records == len(kinds)
  assert report.num_skipped == len(kinds)

  skipped = dict(report.skipped)
  # The UTF-8 kind's exact key is left open (see test_invalid_utf8_counted_as_one_kind).
  assert sum(skipped.pop(k) for k in list(skipped) if k.startswith("invalid UTF-8")) == 1
  assert skipped == {
      "not JSON": 1, "not a JSON object": 1, "missing field": 2, "not a string": 2, "empty text": 1,
      "no Assistant turn": 1,
      "dialogue does not start with a '\\n\\nHuman:' or '\\n\\nAssistant:' turn": 1,
      "the two dialogues share no Assistant turn to respond to": 1}
  assert len(report.first_errors) == 10  # capped
  assert all(msg.startswith(f"{path}, line ") for msg in report.first_errors)
  assert f"{len(kinds)} records, {len(kinds)} malformed skipped" in report.summary()
  assert "2 missing field" in report.summary()

  with pytest.raises(MalformedRecordError):
    read_comparisons(path)  # the default is to fail


def test_invalid_utf8_counted_as_one_kind(tmp_path):
  lines = [b'{"chosen": "\xff"}', b'{"chosen": "ab\xfe"}', _good(1)]
  _, report = read_comparisons(_write(tmp_path / "utf8.jsonl.gz", lines), skip_malformed=True)
  assert report.num_skipped == 2
  assert len(report.skipped) == 1


# --- red-team attempts ----------------------------------------------------------------------------

def _red(i, **override):
  r = {"transcript": _dialogue(f"attack {i}", "no"), "rating": float(i), "task_description": f"task {i}",
       "min_harmlessness_score_transcript": -1.5 + i, "model_type": "plain lm", "num_params": "52B"}
  r.update(override)
  return r


def test_red_team_json_array_and_jsonl(tmp_path):
  items = [_red(0), _red(1, rating=3), _red(2)]
  array = tmp_path / "red_team_attempts.jsonl.gz"
  with gzip.open(array, "wt", encoding="utf-8") as f:
    json.dump(items, f, indent=1)  # as published: one JSON array despite the name
  jsonl = tmp_path / "red.jsonl"
  jsonl.write_text("\n".join(json.dumps(r) for r in items[:2]) + "\n\n" + json.dumps(items[2]) + "\n")

  expected = [{k: r[k] for k in ("transcript", "rating", "min_harmlessness_score_transcript",
                                 "task_description")} for r in items]
  got, report = read_red_team(array)
  assert got == [e | {"line": i} for i, e in enumerate(expected, start=1)]
  assert report.records == 3 and report.num_skipped == 0
  got, _ = read_red_team(jsonl)
  assert got == [e | {"line": n} for e, n in zip(expected, (1, 2, 4))]


@pytest.mark.parametrize("fmt", ["array", "jsonl"])
@pytest.mark.parametrize("bad,field,problem", [
    ({"rating": None}, "rating", "wrong type (NoneType)"),
    ({"rating": True}, "rating", "wrong type (bool)"),
    ({"transcript": 5}, "transcript", "wrong type (int)"),
    ({"task_description": None}, "task_description", "wrong type"),
])
def test_red_team_malformed_names_field(tmp_path, fmt, bad, field, problem):
  items = [_red(0), _red(1, **bad), _red(2)]
  path = tmp_path / ("red.json" if fmt == "array" else "red.jsonl")
  text = json.dumps(items) if fmt == "array" else "\n".join(json.dumps(r) for r in items)
  path.write_text(text)
  with pytest.raises(MalformedRecordError) as info:
    read_red_team(path)
  assert (info.value.line, info.value.field) == (2, field)
  assert f"{path}, line 2, field '{field}'" in str(info.value) and problem in str(info.value)
  got, report = read_red_team(path, skip_malformed=True)
  assert [r["line"] for r in got] == [1, 3]
  assert report.num_skipped == 1 and report.skipped == {"wrong type": 1}


def _red_team_bad_lines(tmp_path):
  missing = {k: v for k, v in _red(1).items() if k != "min_harmlessness_score_transcript"}
  path = tmp_path / "red.jsonl"
  path.write_text("\n".join([json.dumps(_red(0)), json.dumps(missing), "{oops", "[1]"]) + "\n")
  return path, missing


def test_red_team_missing_field_and_bad_jsonl_lines(tmp_path):
  path, missing = _red_team_bad_lines(tmp_path)
  # Records are checked in file order: the first problem (line 2) is the one reported.
  with pytest.raises(MalformedRecordError, match=f"{path}, line 2, field 'min_harmlessness_score_transcript'"):
    read_red_team(path)
  got, report = read_red_team(path, skip_malformed=True)
  assert [r["line"] for r in got] == [1]
  assert report.num_skipped == 3 and report.skipped["missing field"] == 1
  assert f"1 records, 3 malformed skipped" in report.summary()
  path.write_text("\n".join([json.dumps(_red(0)), json.dumps(missing)]))
  with pytest.raises(MalformedRecordError, match="line 2, field 'min_harmlessness_score_transcript': missing"):
    read_red_team(path)


def test_red_team_skipped_kinds(tmp_path):
  path, _ = _red_team_bad_lines(tmp_path)
  _, report = read_red_team(path, skip_malformed=True)
  assert report.skipped == {"missing field": 1, "not JSON": 1, "not a JSON object": 1}


def test_red_team_truncated_array_names_file(tmp_path):
  path = tmp_path / "red.json"
  path.write_text(json.dumps([_red(0), _red(1)])[:-20])
  with pytest.raises(MalformedRecordError, match=str(path)):
    read_red_team(path)


# --- catalog --------------------------------------------------------------------------------------

def test_split_files_and_urls():
  assert catalog.SUBSETS == ("helpful-base", "harmless-base", "helpful-online", "helpful-rejection-sampled",
                             "red-team-attempts")
  for subset in catalog.COMPARISON_SUBSETS:
    assert catalog.split_files(subset) == {"train": f"{subset}/train.jsonl.gz",
                                           "test": f"{subset}/test.jsonl.gz"}
  assert catalog.split_files("red-team-attempts") == {"train": "red-team-attempts/red_team_attempts.jsonl.gz"}
  for subset in catalog.SUBSETS:
    for rel in catalog.split_files(subset).values():
      for mirror in (False, True):
        u = catalog.url(rel, mirror=mirror)
        assert u.startswith("https://") and u.endswith("/" + rel)
      assert catalog.url(rel) == "https://github.com/anthropics/hh-rlhf/raw/master/" + rel
  with pytest.raises(ValueError, match="unknown hh-rlhf subset 'harmless'"):
    catalog.split_files("harmless")


def test_local_source_dir_honours_environment(tmp_path, monkeypatch):
  monkeypatch.setattr(catalog, "_REPO_SHARED", str(tmp_path / "no-shared-copy"))
  monkeypatch.delenv("RLHF_JAX_HH_RLHF_DIR", raising=False)
  assert catalog.local_source_dir("harmless-base", "test") == os.path.normpath(catalog.SAMPLE_DIR)
  assert catalog.local_source_dir("helpful-base", "train") is None

  mine = tmp_path / "mine"
  _write(mine / "helpful-base" / "train.jsonl.gz", [_good(1)])
  _write(mine / "harmless-base" / "test.jsonl.gz", [_good(1)])
  monkeypatch.setenv("RLHF_JAX_HH_RLHF_DIR", str(mine))
  assert catalog.local_source_dir("helpful-base", "train") == str(mine)
  assert catalog.local_source_dir("harmless-base", "test") == str(mine)  # before the sample
  assert catalog.local_source_dir("helpful-base", "test") is None
  with pytest.raises(ValueError):
    catalog.local_source_dir("nope", "test")


# --- TFDS builder ---------------------------------------------------------------------------------

def _source(tmp_path, lines, split="test"):
  src = tmp_path / "src"
  _write(src / "harmless-base" / f"{split}.jsonl.gz", lines)
  return src


UNICODE = json.dumps({"chosen": _dialogue("Café? “quotes” 日本", "Sí ✓ 🙂"),
                      "rejected": _dialogue("Café? “quotes” 日本", "No\nnewline")}).encode()


def test_builder_returns_exactly_what_the_reader_reads(tmp_path):
  from rlhf_jax.hh_rlhf.load import load_split
  lines = [_good(i) for i in range(12)]
  lines[4] = UNICODE
  lines.insert(7, b"")
  src = _source(tmp_path, lines)
  expected, _ = read_comparisons(src / "harmless-base" / "test.jsonl.gz")
  got = load_split("harmless-base", "test", data_dir=str(tmp_path / "tfds"), source_dir=str(src))
  assert got.skipped == {}
  assert len(got.records) == 12
  assert [{k: (int(v) if k == "line" else v) for k, v in r.items()} for r in got.records] == expected
  assert all(isinstance(v, str) for r in got.records for k, v in r.items() if k != "line")
  assert [r["line"] for r in got.records] == list(range(1, 8)) + list(range(9, 14))


def test_builder_skip_malformed_reports_counts_also_when_cached(tmp_path):
  from rlhf_jax.hh_rlhf.load import load_split
  lines = [_good(0), MALFORMED["not_json"][0], _good(2), MALFORMED["missing_chosen"][0],
           MALFORMED["missing_rejected"][0], _good(5), MALFORMED["empty"][0]]
  src = _source(tmp_path, lines)
  expected, report = read_comparisons(src / "harmless-base" / "test.jsonl.gz", skip_malformed=True)
  kwargs = dict(data_dir=str(tmp_path / "tfds"), source_dir=str(src), skip_malformed=True)
  first = load_split("harmless-base", "test", **kwargs)
  assert first.skipped == {"not JSON": 1, "missing field": 2, "empty text": 1} == dict(report.skipped)
  assert [int(r["line"]) for r in first.records] == [1, 3, 6] == [r["line"] for r in expected]
  assert [r["chosen"] for r in first.records] == [r["chosen"] for r in expected]

  # The second load comes from the prepared copy, not from the (now different) source file.
  _write(src / "harmless-base" / "test.jsonl.gz", [_good(7)])
  second = load_split("harmless-base", "test", **kwargs)
  assert second.skipped == first.skipped
  assert second.records == first.records


def test_builder_malformed_without_skipping_fails(tmp_path):
  from rlhf_jax.hh_rlhf.load import load_split
  src = _source(tmp_path, [_good(0), MALFORMED["no_assistant"][0]])
  with pytest.raises(Exception, match=r"line 2, field 'rejected': no Assistant turn"):
    load_split("harmless-base", "test", data_dir=str(tmp_path / "tfds"), source_dir=str(src))


def test_builder_absent_split(tmp_path):
  from rlhf_jax.hh_rlhf.load import load_split
  src = _source(tmp_path, [_good(0), _good(1)])  # test only
  with pytest.raises(FileNotFoundError, match="harmless-base/train"):
    load_split("harmless-base", "train", data_dir=str(tmp_path / "tfds"), source_dir=str(src))
  # The split that is there builds.
  assert len(load_split("harmless-base", "test", data_dir=str(tmp_path / "tfds"),
                        source_dir=str(src)).records) == 2
  other = tmp_path / "other"
  _write(other / "helpful-base" / "test.json.gz", [_good(0)])  # not an upstream name
  with pytest.raises(FileNotFoundError, match="helpful-base/test"):
    load_split("helpful-base", "test", data_dir=str(tmp_path / "tfds2"), source_dir=str(other))


@pytest.mark.parametrize("make", [True, False])
def test_builder_empty_or_missing_source_dir_does_not_download(tmp_path, monkeypatch, make):
  from tensorflow_datasets.core.download import download_manager
  from rlhf_jax.hh_rlhf.load import load_split

  def no_network(self, *args, **kwargs):
    raise RuntimeError("tried to download")

  # An explicit source_dir that is missing or empty is an error, never a reason to go online.
  monkeypatch.setattr(download_manager.DownloadManager, "download", no_network)
  src = tmp_path / "src"
  if make:
    src.mkdir()
  with pytest.raises(FileNotFoundError):
    load_split("harmless-base", "test", data_dir=str(tmp_path / "tfds"), source_dir=str(src))
  # The builder itself, given an empty manual_dir, must not fall back to downloading either.
  import tensorflow_datasets as tfds
  from rlhf_jax.hh_rlhf.builder import HhRlhf
  empty = tmp_path / "empty"
  empty.mkdir()
  builder = HhRlhf(config="harmless-base", data_dir=str(tmp_path / "tfds"), file_format="array_record")
  with pytest.raises(FileNotFoundError):
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(empty)))


def test_read_prompts_validates_every_record(tmp_path):
  from rlhf_jax.hh_rlhf import read_prompts
  good = [json.dumps({"prompt": f"\n\nHuman: q{i}?\n\nAssistant:"}) for i in range(3)]
  bad = ['{"prompt": 3}', '{"text": "x"}', "not json", '{"prompt": "  "}']
  path = tmp_path / "prompts.jsonl"
  path.write_text("\n".join(good[:2] + [bad[0]] + good[2:] + bad[1:]) + "\n")
  with pytest.raises(MalformedRecordError, match=f"{path}, line 3, field 'prompt': not a string"):
    read_prompts(str(path))
  prompts, report = read_prompts(str(path), skip_malformed=True)
  assert prompts == [json.loads(g)["prompt"] for g in good]
  assert report.num_skipped == 4
  assert dict(report.skipped) == {"not a string": 1, "missing field": 1, "not JSON": 1, "empty text": 1}
