"""Multiple-choice tasks scored by log-likelihood, with lm-evaluation-harness conventions (Gao et
al. 2021), as in the capability evaluations of Bai et al. 2022, section 3 (MMLU, ARC, OpenBookQA,
HellaSwag, TruthfulQA, HHH alignment).

A task is JSONL (plain or gzip), one example per line: {"context": str, "choices": [str, ...],
"label": int} (an "id" may ride along). Each choice is scored as the continuation of the context,
so a choice carries its own leading space (" blue"), the harness's target delimiter.
- acc: the choice with the highest sum of token log-probs is the label.
- acc_norm: the same with each sum divided by the choice's length in characters, its leading
  space included: lm-evaluation-harness's count of the choice as its task gives it (a task whose
  choices carry their space and whose target_delimiter is "", as rlhf_jax.evals.harness's tests
  run this format; harness tasks that add the space as the delimiter count one character less).
- Ties go to the first choice (numpy's argmax). Intervals: Wilson 95% (`<metric>_ci`).

Converters write that format from the published files (`python -m rlhf_jax convert_mc
--kind=mmlu abstract_algebra_test.csv out.jsonl`); see `CONVERTERS` for the layouts.
data/mc_sample.jsonl is a 20-question demonstration task written for this project (no licence issue).
"""
from __future__ import annotations

import csv
import gzip
import json
import os
import re
from typing import Any, Callable, Iterator

import numpy as np

from rlhf_jax.errors import ConfigError, DataError
from rlhf_jax.evals.loglik import encode_requests
from rlhf_jax.objectives.calibration import wilson_interval

LETTERS = "ABCDEFGHIJ"


def _open_text(path: str, mode: str = "rt"):
  if path.endswith(".gz"):
    return gzip.open(path, mode, encoding="utf-8")
  return open(path, mode, encoding="utf-8", newline="" if "r" in mode else None)  # csv reads its own newlines


_JSON_TYPES = {dict: "an object", list: "a list", str: "a string", int: "an int", float: "a number",
               bool: "a boolean", type(None): "null"}


def _json_type(value: Any) -> str:
  return _JSON_TYPES.get(type(value), type(value).__name__)


def check_example(record: Any, where: str) -> dict:
  """One generic example, validated; `where` ("path:line") starts every error message."""
  if not isinstance(record, dict):
    raise DataError(f"{where}: expected a JSON object, got {_json_type(record)}")
  for field in ("context", "choices", "label"):
    if field not in record:
      raise DataError(f"{where}: field {field!r}: missing")
  if not isinstance(record["context"], str):
    raise DataError(f"{where}: field 'context': expected a string, got {_json_type(record['context'])}")
  choices = record["choices"]
  # an empty choice has no token to score
  if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
    raise DataError(f"{where}: field 'choices': expected a list of at least 2 non-empty strings")
  label = record["label"]
  if not isinstance(label, int) or isinstance(label, bool) or not 0 <= label < len(choices):
    raise DataError(f"{where}: field 'label': expected an int in 0..{len(choices) - 1}, got {label!r}")
  out = {"context": record["context"], "choices": choices, "label": label}
  return {**out, "id": record["id"]} if "id" in record else out


def _json_lines(path: str) -> Iterator[tuple[int, Any]]:
  """(1-based line, parsed value) of each non-blank line; unreadable files are DataErrors."""
  try:
    with _open_text(path) as f:
      for line, text in enumerate(f, 1):
        if text.strip():
          try:
            yield line, json.loads(text)
          except json.JSONDecodeError as e:
            raise DataError(f"{path}:{line}: invalid JSON ({e.msg} at column {e.colno})") from None
  except (OSError, EOFError, UnicodeDecodeError) as e:
    raise DataError(f"{path}: cannot read ({getattr(e, 'strerror', None) or e})") from None


def read_task(path: str, max_examples: int = 0) -> list[dict]:
  """The examples of a generic task file (the first max_examples; 0 = all)."""
  if max_examples < 0:
    raise ConfigError(f"max_examples={max_examples}: expected 0 (all) or a positive count")
  out = []
  for line, record in _json_lines(path):
    out.append(check_example(record, f"{path}:{line}"))
    if len(out) == max_examples:
      break
  if not out:
    raise DataError(f"{path}: no examples")
  return out


# --- metrics -------------------------------------------------------------------------------------

def wilson(k: int, n: int) -> list[float]:
  """95% Wilson score interval [lo, hi] of a proportion k / n (Wilson 1927)."""
  if n <= 0 or not 0 <= k <= n:
    raise ValueError(f"wilson: need 0 <= k <= n and n > 0, got k={k}, n={n}")
  return list(wilson_interval(k, n))


def mc_metrics(choice_logprob_sums: list[np.ndarray], choice_lengths: list[np.ndarray], labels) -> dict:
  """acc and acc_norm (see the module docstring) with Wilson intervals; one array per example."""
  labels = [int(y) for y in labels]
  if not labels or not len(choice_logprob_sums) == len(choice_lengths) == len(labels):
    raise ValueError(f"mc_metrics: {len(choice_logprob_sums)} score arrays, {len(choice_lengths)} "
                     f"length arrays and {len(labels)} labels (need equal, non-zero counts)")
  acc = norm = 0
  for sums, lengths, label in zip(choice_logprob_sums, choice_lengths, labels):
    sums, lengths = np.asarray(sums, np.float64), np.asarray(lengths, np.float64)
    if sums.shape != lengths.shape or not 0 <= label < len(sums) or np.any(lengths <= 0):
      raise ValueError("mc_metrics: each example needs as many positive lengths as scores, and a label in range")
    acc += int(np.argmax(sums)) == label  # first of tied maxima
    norm += int(np.argmax(sums / lengths)) == label
  n = len(labels)
  return {"acc": acc / n, "acc_ci": wilson(acc, n), "acc_norm": norm / n, "acc_norm_ci": wilson(norm, n), "n": n}


def evaluate(scorer, tok, examples: list[dict], name: str = "task") -> dict:
  """mc_metrics of a task, every (example, choice) scored in one scorer call; per-example scores
  are left out to keep the result small."""
  if not examples:
    raise DataError(f"{name}: no examples")
  contexts = [ex["context"] for ex in examples for _ in ex["choices"]]
  choices = [c for ex in examples for c in ex["choices"]]
  sums = np.asarray(scorer.continuation_sums(encode_requests(tok, contexts, choices), desc=name), np.float64)
  if sums.shape != (len(choices),):
    raise ValueError(f"{name}: the scorer returned {sums.shape} scores for {len(choices)} requests")
  bounds = np.cumsum([0] + [len(ex["choices"]) for ex in examples])
  grouped = [sums[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
  lengths = [np.array([len(c) for c in ex["choices"]], np.float64) for ex in examples]  # characters
  return {"name": name, **mc_metrics(grouped, lengths, [ex["label"] for ex in examples])}


# --- converters from published formats -----------------------------------------------------------

def _field(record: Any, key: str, kind: type | tuple, where: str, name: str = "") -> Any:
  """record[key] checked for type; `name` is the field's path in the error message."""
  name = name or key
  if not isinstance(record, dict):
    parent = name.rpartition(".")[0]
    what = f" field {parent!r}:" if parent else ""
    raise DataError(f"{where}:{what} expected a JSON object, got {_json_type(record)}")
  if key not in record:
    raise DataError(f"{where}: field {name!r}: missing")
  value = record[key]
  if not isinstance(value, kind) or isinstance(value, bool):
    wanted = " or ".join(_JSON_TYPES[k] for k in (kind if isinstance(kind, tuple) else (kind,)))
    raise DataError(f"{where}: field {name!r}: expected {wanted}, got {_json_type(value)}")
  return value


def mmlu_record(row: list[str], subject: str, where: str) -> dict:
  """A published MMLU CSV row (question, A, B, C, D, answer letter), no header."""
  if len(row) != 6:
    raise DataError(f"{where}: expected 6 columns (question, A, B, C, D, answer), got {len(row)}")
  answer = row[5].strip()
  if answer not in ("A", "B", "C", "D"):
    raise DataError(f"{where}: field 'answer' (column 6): expected A, B, C or D, got {answer!r}")
  options = "".join(f"\n{letter}. {text}" for letter, text in zip("ABCD", row[1:5]))
  context = (f"The following are multiple choice questions (with answers) about {subject}.\n\n"
             f"{row[0].strip()}{options}\nAnswer:")
  return {"context": context, "choices": [" A", " B", " C", " D"], "label": "ABCD".index(answer)}


def mmlu_subject(path: str) -> str:
  """abstract_algebra_test.csv -> "abstract algebra" (the split suffix dropped)."""
  stem = os.path.basename(path).removesuffix(".gz").removesuffix(".csv")
  for split in ("_auxiliary_train", "_train", "_validation", "_val", "_dev", "_test"):
    if stem.endswith(split):
      stem = stem.removesuffix(split)
      break
  return stem.replace("_", " ")


def _answer_index(key: str, labels: list[str], where: str) -> int:
  if key in labels:
    return labels.index(key)
  # ARC labels some questions "1".."5" and others "A".."E": a key of the other kind counts by position
  alias = {str(i + 1): ch for i, ch in enumerate(LETTERS)}
  alias.update({ch: digit for digit, ch in alias.items()})
  if alias.get(key) in labels:
    return labels.index(alias[key])
  raise DataError(f"{where}: field 'answerKey': {key!r} is none of the choice labels {labels}")


def arc_record(r: Any, where: str) -> dict:
  """ARC-Easy/Challenge and OpenBookQA: {"question": {"stem", "choices": [{"label", "text"}]}, "answerKey"}."""
  q = _field(r, "question", dict, where)
  stem = _field(q, "stem", str, where, "question.stem")
  labels, texts = [], []
  for j, c in enumerate(_field(q, "choices", list, where, "question.choices")):
    labels.append(str(_field(c, "label", (str, int), where, f"question.choices[{j}].label")).strip())
    texts.append(_field(c, "text", str, where, f"question.choices[{j}].text"))
  key = str(_field(r, "answerKey", (str, int), where)).strip()
  out = {"context": f"Question: {stem}\nAnswer:", "choices": [f" {t}" for t in texts],
         "label": _answer_index(key, labels, where)}
  return {**out, "id": r["id"]} if isinstance(r.get("id"), str) else out


def _hellaswag_clean(text: str) -> str:
  # the harness's clean-up of WikiHow markup: " [title]" ends a sentence, other [tags] go
  text = re.sub(r"\[.*?\]", "", text.strip().replace(" [title]", ". "))
  return text.replace("  ", " ")


def hellaswag_record(r: Any, where: str) -> dict:
  """HellaSwag: {"activity_label", "ctx_a" + "ctx_b" (or "ctx"), "endings", "label"}."""
  activity = _field(r, "activity_label", str, where)
  if isinstance(r, dict) and "ctx_a" in r:
    # as the harness: ctx_b continues ctx_a's last sentence, so it starts with a capital
    ctx = f"{_field(r, 'ctx_a', str, where)} {_field(r, 'ctx_b', str, where).capitalize()}"
  else:
    ctx = _field(r, "ctx", str, where)
  endings = _field(r, "endings", list, where)
  if not all(isinstance(e, str) for e in endings):
    raise DataError(f"{where}: field 'endings': expected a list of strings")
  label = _field(r, "label", (int, str), where)
  if isinstance(label, str) and not label.strip().isdigit():
    raise DataError(f"{where}: field 'label': expected an int, got {label!r} (the test split has no labels)")
  return {"context": _hellaswag_clean(f"{activity}: {ctx}"),
          "choices": [" " + _hellaswag_clean(e) for e in endings], "label": int(label)}


def _one_correct(targets: dict, where: str, field: str) -> tuple[list[str], int]:
  scores = list(targets.values())
  if any(s not in (0, 1) or isinstance(s, bool) for s in scores) or scores.count(1) != 1:
    raise DataError(f"{where}: field {field!r}: expected {{answer: 0 or 1}} with exactly one 1, got {scores}")
  return list(targets), scores.index(1)


def truthfulqa_mc1_record(r: Any, where: str) -> dict:
  """TruthfulQA mc_task.json item: {"question", "mc1_targets": {answer: 0/1}}; the file's order."""
  question = _field(r, "question", str, where)
  answers, label = _one_correct(_field(r, "mc1_targets", dict, where), where, "mc1_targets")
  return {"context": f"Q: {question}\nA:", "choices": [f" {a}" for a in answers], "label": label}


def hhh_record(r: Any, where: str) -> dict:
  """BIG-bench hhh_alignment example: {"input", "target_scores": {text: 0/1}}."""
  prompt = _field(r, "input", str, where)
  answers, label = _one_correct(_field(r, "target_scores", dict, where), where, "target_scores")
  return {"context": f"Human: {prompt}\n\nAssistant:", "choices": [f" {a}" for a in answers], "label": label}


def _csv_rows(path: str) -> Iterator[tuple[int, list[str]]]:
  try:
    with _open_text(path) as f:
      reader = csv.reader(f)
      for row in reader:
        if row:
          yield reader.line_num, row
  except csv.Error as e:
    raise DataError(f"{path}: malformed CSV ({e})") from None
  except (OSError, EOFError, UnicodeDecodeError) as e:
    raise DataError(f"{path}: cannot read ({getattr(e, 'strerror', None) or e})") from None


def _jsonl_items(path: str) -> Iterator[tuple[str, Any]]:
  for line, item in _json_lines(path):
    yield f"{path}:{line}", item


def _json_items(path: str, key: str = "") -> Iterator[tuple[str, Any]]:
  """("path: record i", item) over a JSON list (the list under `key` of an object when given)."""
  try:
    with _open_text(path) as f:
      data = json.load(f)
  except json.JSONDecodeError as e:
    raise DataError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
  except (OSError, EOFError, UnicodeDecodeError) as e:
    raise DataError(f"{path}: cannot read ({getattr(e, 'strerror', None) or e})") from None
  data = _field(data, key, list, path) if key else data
  if not isinstance(data, list):
    raise DataError(f"{path}: expected a JSON list, got {_json_type(data)}")
  for i, item in enumerate(data, 1):
    yield f"{path}: record {i}", item


# kind -> (reader of (where, raw record), converter of one raw record)
CONVERTERS: dict[str, tuple[Callable, Callable]] = {
    "arc": (_jsonl_items, arc_record),
    "openbookqa": (_jsonl_items, arc_record),
    "hellaswag": (_jsonl_items, hellaswag_record),
    "truthfulqa_mc1": (_json_items, truthfulqa_mc1_record),
    "hhh": (lambda p: _json_items(p, "examples"), hhh_record),
}
KINDS = ("mmlu", *CONVERTERS)


def convert_file(kind: str, src: str) -> list[dict]:
  """The generic examples of one published file; every record checked, errors name src."""
  if kind == "mmlu":
    subject = mmlu_subject(src)
    pairs = ((f"{src}:{line}", mmlu_record(row, subject, f"{src}:{line}")) for line, row in _csv_rows(src))
  elif kind in CONVERTERS:
    read, record = CONVERTERS[kind]
    pairs = ((where, record(r, where)) for where, r in read(src))
  else:
    raise ConfigError(f"--kind={kind!r}: expected one of {', '.join(KINDS)}")
  out = [check_example(ex, where) for where, ex in pairs]
  if not out:
    raise DataError(f"{src}: no records")
  return out


def convert(kind: str, src_path: str, dst_path: str) -> int:
  """Writes src_path (published layout `kind`) as generic JSONL (gzip if dst ends .gz); -> count."""
  records = convert_file(kind, src_path)
  tmp = os.path.join(os.path.dirname(dst_path), ".tmp-" + os.path.basename(dst_path))  # keeps a .gz suffix
  with _open_text(tmp, "wt") as f:
    for r in records:
      f.write(json.dumps(r, ensure_ascii=False) + "\n")
  os.replace(tmp, dst_path)  # never a half-written task under the final name
  return len(records)


def main_factory():
  """`convert --kind=KIND SRC DST` as a job; flags are defined only when it runs."""
  from absl import flags
  kind = flags.DEFINE_enum("kind", None, list(KINDS), "Published layout of SRC.", required=True)

  def main(argv):
    if len(argv) != 3:
      raise ConfigError("usage: python -m rlhf_jax convert_mc --kind=KIND SRC DST")
    n = convert(kind.value, argv[1], argv[2])
    print(f"{n} examples written to {argv[2]}")
  return main
