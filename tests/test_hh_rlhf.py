"""hh-rlhf readers, catalog and TFDS builder: every malformed record named by file, line and field;
skipped ones counted; empty, truncated and corrupt files named; ties counted and left out; local
copies checked against the known checksums; the builder returns exactly what the reader reads."""
import gzip
import json
import os
import re
import warnings
import zlib

import pytest

from rlhf_jax.data import locations
from rlhf_jax.data.dialogue import split_comparison
from rlhf_jax.data.hh_rlhf import catalog
from rlhf_jax.data.hh_rlhf.records import MalformedRecordError, read_comparisons, read_prompts, read_red_team
from rlhf_jax.errors import ConfigError, DataError, UserError

# The full copy where $RLHF_JAX_DATA_DIR names one (`make test` passes ../shared/data); "" where not.
HH_RLHF = locations.local_copy(locations.HH_RLHF)
REAL = os.path.join(HH_RLHF, "harmless-base", "test.jsonl.gz") if HH_RLHF else ""


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
    # json.loads refuses these with a plain ValueError or a RecursionError, not a JSONDecodeError.
    "huge_number": (b'{"chosen": 1' + b"0" * 5000 + b"}", None, "not JSON (Exceeds the limit"),
    "deep_nesting": (b"[" * 100_000, None, "not JSON (nested too deeply)"),
    # JSON can escape a lone surrogate; no later stage (TFDS, the tokenizer) can encode it.
    "lone_surrogate": (json.dumps({"chosen": "\n\nHuman: q\ud800\n\nAssistant: a", "rejected": OK_TEXT}).encode(),
                       "chosen", "invalid Unicode (lone surrogate at character 10)"),
}


# --- read_comparisons -----------------------------------------------------------------------------

def test_real_file_reads_completely():
  if not os.path.exists(REAL):
    pytest.skip(f"no real harmless-base/test: ${locations.ENV}={os.environ.get(locations.ENV)!r}")
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
  assert isinstance(e, ValueError) and isinstance(e, UserError)  # the entry points: one line, exit 2
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
      "not JSON": 3, "not a JSON object": 1, "missing field": 2, "not a string": 2, "empty text": 1,
      "no Assistant turn": 1, "invalid Unicode": 1,
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
  assert "1 records, 3 malformed skipped" in report.summary()
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


@pytest.mark.parametrize("unset", ["absent", "empty"])
def test_local_source_dir_without_the_setting_is_the_sample(monkeypatch, unset):
  if unset == "absent":
    monkeypatch.delenv(locations.ENV, raising=False)
  else:
    monkeypatch.setenv(locations.ENV, "")  # what the Makefile passes where there is no copy
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    assert catalog.local_source_dir("harmless-base", "test") == os.path.normpath(catalog.SAMPLE_DIR)
    assert catalog.local_source_dir("helpful-base", "train") is None  # load_split downloads it


def test_local_source_dir_follows_the_data_dir_setting(tmp_path, monkeypatch):
  mine = tmp_path / "mine"
  _write(mine / "hh-rlhf" / "helpful-base" / "train.jsonl.gz", [_good(1)])
  _write(mine / "hh-rlhf" / "harmless-base" / "test.jsonl.gz", [_good(1)])
  monkeypatch.setenv(locations.ENV, str(mine))
  assert catalog.local_source_dir("helpful-base", "train") == str(mine / "hh-rlhf")
  assert catalog.local_source_dir("harmless-base", "test") == str(mine / "hh-rlhf")  # before the sample
  assert catalog.local_source_dir("helpful-base", "test") is None
  with pytest.raises(ValueError):
    catalog.local_source_dir("nope", "test")


@pytest.mark.parametrize("has_hh_rlhf", [True, False])
def test_local_source_dir_warns_when_the_setting_lacks_what_the_sample_has(tmp_path, monkeypatch, has_hh_rlhf):
  (tmp_path / ("hh-rlhf" if has_hh_rlhf else "evals") / "helpful-base").mkdir(parents=True)
  monkeypatch.setenv(locations.ENV, str(tmp_path))
  with pytest.warns(catalog.SampleFallbackWarning) as caught:
    assert catalog.local_source_dir("harmless-base", "test") == os.path.normpath(catalog.SAMPLE_DIR)
  assert str(caught[0].message) == (f"$RLHF_JAX_DATA_DIR={tmp_path} has no hh-rlhf/harmless-base/test.jsonl.gz; "
                                    f"using the 400-record sample bundled in {catalog.SAMPLE_DIR}")
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    assert catalog.local_source_dir("helpful-base", "test") is None  # no sample either: a download, no warning


@pytest.mark.parametrize("kind", ["missing", "file"])
def test_local_source_dir_refuses_a_setting_that_is_not_a_directory(tmp_path, monkeypatch, kind):
  path = tmp_path / "data"
  if kind == "file":
    path.write_text("")
  monkeypatch.setenv(locations.ENV, str(path))
  says = "does not exist" if kind == "missing" else "is not a directory"
  with pytest.raises(ConfigError, match="^" + re.escape(f"$RLHF_JAX_DATA_DIR={path}: {says}; ")):
    catalog.local_source_dir("harmless-base", "test")  # never quietly the sample


# --- TFDS builder ---------------------------------------------------------------------------------

# Hand-written sources use harmless-base/train: its checksum is unknown, so any content is accepted
# (with a warning), where a changed harmless-base/test would fail verification.
unverified_ok = pytest.mark.filterwarnings("ignore::rlhf_jax.data.hh_rlhf.catalog.UnverifiedFileWarning")


def _source(tmp_path, lines, split="train"):
  src = tmp_path / "src"
  _write(src / "harmless-base" / f"{split}.jsonl.gz", lines)
  return src


UNICODE = json.dumps({"chosen": _dialogue("Café? “quotes” 日本", "Sí ✓ 🙂"),
                      "rejected": _dialogue("Café? “quotes” 日本", "No\nnewline")}).encode()


@unverified_ok
def test_builder_returns_exactly_what_the_reader_reads(tmp_path):
  from rlhf_jax.data.hh_rlhf.load import load_split
  lines = [_good(i) for i in range(12)]
  lines[4] = UNICODE
  lines.insert(7, b"")
  src = _source(tmp_path, lines)
  expected, _ = read_comparisons(src / "harmless-base" / "train.jsonl.gz")
  got = load_split("harmless-base", "train", data_dir=str(tmp_path / "tfds"), source_dir=str(src))
  assert got.skipped == {} and got.ties == 0
  assert len(got.records) == 12
  assert [{k: (int(v) if k == "line" else v) for k, v in r.items()} for r in got.records] == expected
  assert all(isinstance(v, str) for r in got.records for k, v in r.items() if k != "line")
  assert [r["line"] for r in got.records] == list(range(1, 8)) + list(range(9, 14))


@unverified_ok
def test_processes_preparing_one_data_dir_at_once_all_get_the_split(tmp_path):
  """Several processes of a job on one host (or sharing a file system) load the same split into
  one empty data_dir at once: the others wait for the first's preparation and read it, where TFDS
  alone has the later ones fail to rename their copy into place."""
  import concurrent.futures

  from rlhf_jax.data.hh_rlhf.load import load_split
  src = _source(tmp_path, [_good(i) for i in range(40)])
  expected, _ = read_comparisons(src / "harmless-base" / "train.jsonl.gz")
  load = lambda _: load_split("harmless-base", "train", data_dir=str(tmp_path / "tfds"), source_dir=str(src))
  with concurrent.futures.ThreadPoolExecutor(4) as pool:  # flock() excludes another open file as another process's
    results = list(pool.map(load, range(4)))
  for got in results:
    assert [{k: (int(v) if k == "line" else v) for k, v in r.items()} for r in got.records] == expected
  versions = os.listdir(tmp_path / "tfds" / "hh_rlhf" / "harmless-base")
  assert [v for v in versions if not v.endswith(".lock")] == ["1.1.0"], versions  # one copy, no leftovers


@unverified_ok
def test_builder_skip_malformed_reports_counts_also_when_cached(tmp_path):
  from rlhf_jax.data.hh_rlhf.load import load_split
  lines = [_good(0), MALFORMED["not_json"][0], _good(2), MALFORMED["missing_chosen"][0],
           MALFORMED["missing_rejected"][0], _good(5), MALFORMED["empty"][0]]
  src = _source(tmp_path, lines)
  expected, report = read_comparisons(src / "harmless-base" / "train.jsonl.gz", skip_malformed=True)
  kwargs = dict(data_dir=str(tmp_path / "tfds"), source_dir=str(src), skip_malformed=True)
  first = load_split("harmless-base", "train", **kwargs)
  assert first.skipped == {"not JSON": 1, "missing field": 2, "empty text": 1} == dict(report.skipped)
  assert [int(r["line"]) for r in first.records] == [1, 3, 6] == [r["line"] for r in expected]
  assert [r["chosen"] for r in first.records] == [r["chosen"] for r in expected]

  # The second load comes from the prepared copy, not from the (now different) source file.
  _write(src / "harmless-base" / "train.jsonl.gz", [_good(7)])
  second = load_split("harmless-base", "train", **kwargs)
  assert second.skipped == first.skipped
  assert second.records == first.records


@unverified_ok
def test_builder_malformed_without_skipping_fails(tmp_path):
  from rlhf_jax.data.hh_rlhf.load import load_split
  src = _source(tmp_path, [_good(0), MALFORMED["no_assistant"][0]])
  with pytest.raises(MalformedRecordError, match=r"line 2, field 'rejected': no Assistant turn"):
    load_split("harmless-base", "train", data_dir=str(tmp_path / "tfds"), source_dir=str(src))


@unverified_ok
def test_builder_absent_split(tmp_path):
  from rlhf_jax.data.hh_rlhf.load import load_split
  src = _source(tmp_path, [_good(0), _good(1)])  # train only
  with pytest.raises(FileNotFoundError, match="harmless-base/test"):
    load_split("harmless-base", "test", data_dir=str(tmp_path / "tfds"), source_dir=str(src))
  # The split that is there builds.
  assert len(load_split("harmless-base", "train", data_dir=str(tmp_path / "tfds"),
                        source_dir=str(src)).records) == 2
  other = tmp_path / "other"
  _write(other / "helpful-base" / "test.json.gz", [_good(0)])  # not an upstream name
  with pytest.raises(FileNotFoundError, match="helpful-base/test"):
    load_split("helpful-base", "test", data_dir=str(tmp_path / "tfds2"), source_dir=str(other))


@pytest.mark.parametrize("make", [True, False])
def test_builder_empty_or_missing_source_dir_does_not_download(tmp_path, monkeypatch, make):
  from tensorflow_datasets.core.download import download_manager

  from rlhf_jax.data.hh_rlhf.load import load_split

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

  from rlhf_jax.data.hh_rlhf.builder import HhRlhf
  empty = tmp_path / "empty"
  empty.mkdir()
  builder = HhRlhf(config="harmless-base", data_dir=str(tmp_path / "tfds"), file_format="array_record")
  with pytest.raises(FileNotFoundError):
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(empty)))


def test_read_prompts_validates_every_record(tmp_path):
  from rlhf_jax.data.hh_rlhf import read_prompts
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


# --- whole-file problems: empty, truncated, corrupt -----------------------------------------------

def _prompt_line(i):
  return json.dumps({"prompt": f"\n\nHuman: q{i}?\n\nAssistant:"}).encode()


def _red_line(i):
  return json.dumps(_red(i)).encode()


READERS = {"comparisons": (read_comparisons, _good), "prompts": (read_prompts, _prompt_line),
           "red_team": (read_red_team, _red_line)}


@pytest.mark.parametrize("reader", sorted(READERS))
@pytest.mark.parametrize("content", [b"", b"\n", b"\n  \n\r\n"])
@pytest.mark.parametrize("gz", [True, False])
def test_empty_file_is_a_data_error(tmp_path, reader, content, gz):
  read, _ = READERS[reader]
  path = tmp_path / ("empty.jsonl.gz" if gz else "empty.jsonl")
  path.write_bytes(gzip.compress(content) if gz else content)
  for skip in (False, True):
    with pytest.raises(DataError, match=f"^{path}: no records$"):
      read(path, skip_malformed=skip)


def test_red_team_empty_array_is_a_data_error(tmp_path):
  path = tmp_path / "red.json"
  path.write_text(" [ ]\n")
  with pytest.raises(DataError, match=f"^{path}: no records$"):
    read_red_team(path)


@pytest.mark.parametrize("reader", sorted(READERS))
def test_all_malformed_skipped_says_how_many(tmp_path, reader):
  read, _ = READERS[reader]
  path = _write(tmp_path / "bad.jsonl.gz", [b"{oops", b"", b"[1]", b"7"])
  with pytest.raises(DataError, match=r": no records \(3 malformed skipped\)$") as info:
    read(path, skip_malformed=True)
  assert str(info.value).startswith(path)
  assert isinstance(info.value, UserError) and isinstance(info.value, ValueError)


def _records_gz(make, n):
  return gzip.compress(b"".join(make(i) + b"\n" for i in range(n)))


def _decompressed_lines(data: bytes) -> int:
  """Complete lines that a truncated gzip still yields, counted independently of gzip.GzipFile."""
  return zlib.decompressobj(wbits=31).decompress(data).count(b"\n")


@pytest.mark.parametrize("reader", sorted(READERS))
@pytest.mark.parametrize("keep", [0.3, 0.7, -4])
def test_truncated_gzip_names_file_and_last_complete_line(tmp_path, reader, keep):
  read, make = READERS[reader]
  data = _records_gz(make, 400)
  cut = data[:int(len(data) * keep)] if keep > 0 else data[:keep]  # -4: only the trailer is cut
  path = tmp_path / "cut.jsonl.gz"
  path.write_bytes(cut)
  n = _decompressed_lines(cut)
  assert (0 < n < 400) if keep > 0 else n == 400
  for skip in (False, True):  # a whole-file problem is never skipped like a record
    with pytest.raises(DataError, match=f"^{path}: truncated gzip after line {n}$"):
      read(path, skip_malformed=skip)


@pytest.mark.parametrize("reader", sorted(READERS))
def test_truncated_gzip_header(tmp_path, reader):
  path = tmp_path / "cut.jsonl.gz"
  path.write_bytes(_records_gz(READERS[reader][1], 3)[:6])
  with pytest.raises(DataError, match=f"^{path}: truncated gzip after line 0$"):
    READERS[reader][0](path)


def _bad_crc(data):
  crc = bytes(b ^ 0xFF for b in data[-8:-4])
  return data[:-8] + crc + data[-4:]


CORRUPT = {
    # name: (bytes from n good records, message after "not a valid gzip file (")
    "not_gzip": (lambda data: b'{"chosen": "plain text named .gz"}\n', "Not a gzipped file"),
    "crc": (_bad_crc, "CRC check failed"),
    # A deflate block of the reserved type 3 right after the 10-byte header.
    "bad_block": (lambda data: data[:10] + b"\x07" + data[11:], "Error -3 while decompressing data"),
}


@pytest.mark.parametrize("reader", sorted(READERS))
@pytest.mark.parametrize("kind", sorted(CORRUPT))
def test_corrupt_gzip_names_file(tmp_path, reader, kind):
  read, make = READERS[reader]
  corrupt, detail = CORRUPT[kind]
  path = tmp_path / "corrupt.jsonl.gz"
  path.write_bytes(corrupt(_records_gz(make, 50)))
  with pytest.raises(DataError) as info:
    read(path, skip_malformed=True)
  assert str(info.value).startswith(f"{path}: not a valid gzip file ({detail}")
  if kind == "crc":  # found at the end, once every line was read
    assert str(info.value).endswith(") after line 50")


def test_unterminated_last_line_is_still_a_record(tmp_path):
  path = tmp_path / "c.jsonl.gz"
  path.write_bytes(gzip.compress(_good(1) + b"\n" + _good(2)))  # no final newline: not truncation
  records, _ = read_comparisons(path)
  assert [r["line"] for r in records] == [1, 2]


# --- ties -----------------------------------------------------------------------------------------

def _tie(i):
  d = _dialogue(f"question {i}", f"same {i}")
  return json.dumps({"chosen": d, "rejected": d}).encode()


def test_ties_are_left_out_and_counted(tmp_path):
  path = _write(tmp_path / "ties.jsonl.gz", [_good(1), _tie(2), _good(3), _tie(4), _tie(5)])
  records, report = read_comparisons(path)
  assert [r["line"] for r in records] == [1, 3]
  assert (report.records, report.ties, report.tie_lines, report.num_skipped) == (2, 3, [2, 4, 5], 0)
  assert report.summary() == f"{path}: 2 records, 3 ties (chosen == rejected) left out (lines 2, 4, 5)"

  kept, report = read_comparisons(path, keep_ties=True)
  assert [r["line"] for r in kept] == [1, 2, 3, 4, 5]
  assert (report.records, report.ties, report.ties_kept) == (5, 3, True)
  assert "3 ties (chosen == rejected) kept" in report.summary()
  tie = kept[1]
  # split_comparison on identical texts: the prompt up to the last Assistant marker, equal responses.
  assert (tie["prompt"], tie["chosen_response"], tie["rejected_response"]) == (
      "\n\nHuman: question 2\n\nAssistant:", " same 2", " same 2")


def test_ties_with_malformed_records_and_only_ties(tmp_path):
  path = _write(tmp_path / "ties.jsonl.gz", [_tie(1), b"{oops", _tie(3)])
  with pytest.raises(DataError, match=r": no records \(1 malformed skipped, 2 ties \(chosen == rejected\) left out\)$"):
    read_comparisons(path, skip_malformed=True)
  records, report = read_comparisons(path, skip_malformed=True, keep_ties=True)
  assert len(records) == 2 and report.num_skipped == 1 and report.ties == 2
  assert "1 malformed skipped (1 not JSON), 2 ties" in report.summary()
  many = _write(tmp_path / "many.jsonl.gz", [_good(0)] + [_tie(i) for i in range(12)])
  assert read_comparisons(many)[1].summary().endswith("left out (lines 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, ...)")


@unverified_ok
def test_builder_ties_in_metadata_split_and_cache(tmp_path):
  from rlhf_jax.data.hh_rlhf.load import load_split
  src = _source(tmp_path, [_good(0), _tie(1), _good(2), _tie(3)])
  dropped = dict(data_dir=str(tmp_path / "tfds"), source_dir=str(src))
  got = load_split("harmless-base", "train", **dropped)
  assert [int(r["line"]) for r in got.records] == [1, 3] and got.ties == 2 and got.skipped == {}
  _write(src / "harmless-base" / "train.jsonl.gz", [_good(9)])  # not read again: cached
  assert load_split("harmless-base", "train", **dropped) == got
  # A copy prepared without its ties cannot serve keep_ties=True ...
  with pytest.raises(DataError, match="has its 2 ties left out"):
    load_split("harmless-base", "train", keep_ties=True, **dropped)

  src = _source(tmp_path / "k", [_good(0), _tie(1), _good(2), _tie(3)])
  kept = dict(data_dir=str(tmp_path / "tfds_kept"), source_dir=str(src))
  got = load_split("harmless-base", "train", keep_ties=True, **kept)
  assert [int(r["line"]) for r in got.records] == [1, 2, 3, 4] and got.ties == 2
  # ... while one prepared with them leaves them out when asked to.
  assert [int(r["line"]) for r in load_split("harmless-base", "train", **kept).records] == [1, 3]

  from rlhf_jax.data.hh_rlhf.builder import HhRlhf
  assert str(HhRlhf.VERSION) == "1.1.0" and "1.1.0" in HhRlhf.RELEASE_NOTES


def _lm_config(path, keep_ties):
  from configs import lm
  config = lm.get_config("tiny")
  config.data.path, config.data.keep_ties, config.data.eval_fraction = str(path), keep_ties, 0.25
  return config


@pytest.mark.parametrize("keep_ties", [False, True])
def test_lm_data_passes_keep_ties_and_prints_the_count(tmp_path, capsys, keep_ties):
  from rlhf_jax.data.lm_data import train_eval_records
  path = _write(tmp_path / "c.jsonl.gz", [_good(i) for i in range(6)] + [_tie(6), _tie(7)])
  train, held_out, skipped = train_eval_records(_lm_config(path, keep_ties), str(tmp_path))
  lines = sorted(r["line"] for r in train + held_out)
  assert lines == (list(range(1, 9)) if keep_ties else list(range(1, 7))) and skipped == 0
  assert f"2 ties (chosen == rejected) {'kept' if keep_ties else 'left out'}" in capsys.readouterr().out


def test_every_config_leaves_ties_out_by_default():
  from configs import lm, pm, ppo
  for module in (lm, pm, ppo):
    assert module.get_config("tiny").data.keep_ties is False


# --- checksums ------------------------------------------------------------------------------------

def test_known_checksums():
  known = {rel: catalog.known_checksum(rel) for s in catalog.SUBSETS for rel in catalog.split_files(s).values()}
  assert sorted(rel for rel, c in known.items() if c is None) == [
      "harmless-base/train.jsonl.gz", "red-team-attempts/red_team_attempts.jsonl.gz"]  # pointers not obtained
  assert known["harmless-base/test.jsonl.gz"] == (
      742801, "ebfaaed21162a4de120ae85366075b34425e2a6303fac59b99555002f7016f03")
  assert known["helpful-rejection-sampled/train.jsonl.gz"] == (
      25697148, "0cea2d2ab2187624ec1314e8cc6fb579f0fa987b3a33e8102b7556ed4d255f64")
  # TFDS reads the same file for downloads: one URL each, as catalog.url builds them.
  from tensorflow_datasets.core.download import checksums
  infos = checksums.load_url_infos(os.path.join(os.path.dirname(catalog.__file__), "checksums.tsv"))
  assert {u: (int(i.size), i.checksum) for u, i in infos.items()} == {
      catalog.url(rel): tuple(c) for rel, c in known.items() if c}
  pointers = os.path.join(HH_RLHF, "LFS_POINTERS.tsv") if HH_RLHF else ""
  if os.path.exists(pointers):
    with open(pointers) as f:
      rows = [line.split() for line in f][1:]
    assert {rel: (int(size), sha) for rel, size, sha in rows} == {rel: tuple(c) for rel, c in known.items() if c}


def test_verify_known_files_quietly():
  sample = os.path.join(catalog.SAMPLE_DIR, "harmless-base", "test.jsonl.gz")
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    catalog.verify_file(sample, "harmless-base/test.jsonl.gz")  # the sample's own checksum
    if os.path.exists(REAL):
      catalog.verify_file(REAL, "harmless-base/test.jsonl.gz")
  assert catalog.known_checksum("harmless-base/test.jsonl.gz", sample=True) == catalog.checksum_of(sample)


def test_verify_wrong_and_unknown_files(tmp_path):
  sample = os.path.join(catalog.SAMPLE_DIR, "harmless-base", "test.jsonl.gz")
  copy = tmp_path / "harmless-base" / "test.jsonl.gz"
  copy.parent.mkdir()
  copy.write_bytes(open(sample, "rb").read())  # the sample is not upstream's file, wherever it lies
  with pytest.raises(DataError) as info:
    catalog.verify_file(copy, "harmless-base/test.jsonl.gz")
  message = str(info.value)
  assert message.startswith(f"{copy}: not upstream's hh-rlhf harmless-base/test.jsonl.gz")
  assert "expected sha256 ebfaaed21162a4de120ae85366075b34425e2a6303fac59b99555002f7016f03 (742801 bytes)" in message
  assert f"got sha256 {catalog.checksum_of(sample).sha256} (123861 bytes)" in message

  with pytest.warns(catalog.UnverifiedFileWarning, match=f"{tmp_path}.*no known checksum for hh-rlhf "
                                                          "harmless-base/train.jsonl.gz"):
    catalog.verify_file(tmp_path / "train.jsonl.gz", "harmless-base/train.jsonl.gz")


def test_builder_rejects_a_changed_known_file_and_hashes_once(tmp_path, monkeypatch):
  from rlhf_jax.data.hh_rlhf.load import load_split
  src = _source(tmp_path, [_good(0), _good(1)], split="test")
  with pytest.raises(DataError, match=f"{src}/harmless-base/test.jsonl.gz: not upstream's .* expected sha256 ebfaaed"):
    load_split("harmless-base", "test", data_dir=str(tmp_path / "tfds"), source_dir=str(src))

  hashed = []
  monkeypatch.setattr(catalog, "checksum_of", lambda p: hashed.append(p) or catalog.Checksum(
      *catalog.known_checksum("harmless-base/test.jsonl.gz")))  # as if it were upstream's
  kwargs = dict(data_dir=str(tmp_path / "tfds2"), source_dir=str(src))
  assert len(load_split("harmless-base", "test", **kwargs).records) == 2
  assert len(load_split("harmless-base", "test", **kwargs).records) == 2  # prepared: not hashed again
  assert hashed == [str(src / "harmless-base" / "test.jsonl.gz")]


@pytest.mark.filterwarnings("error::rlhf_jax.data.hh_rlhf.catalog.UnverifiedFileWarning")
def test_offline_default_sample_builds_verified(tmp_path, monkeypatch):
  from rlhf_jax.data.hh_rlhf.load import load_split
  monkeypatch.delenv(locations.ENV, raising=False)
  got = load_split("harmless-base", "test", data_dir=str(tmp_path / "tfds"))
  assert len(got.records) == 400 and got.ties == 0
