"""Multiple-choice tasks scored by log-likelihood, with lm-evaluation-harness conventions.

A task is JSONL (plain or gzip), one example per line: {"context": str, "choices": [str, ...],
"label": int}. Each choice is scored as the continuation of the context (a leading space belongs
to the choice). acc: the choice with the highest sum of token log-probs; acc_norm: the highest
sum per UTF-8 byte of the choice text (the harness's length normalisation). Ties go to the first.

Converters write that format from published files (MMLU, ARC, OpenBookQA, HellaSwag,
TruthfulQA MC1, BIG-bench HHH alignment):
  python -m rlhf_jax.evals.multiple_choice convert --kind=mmlu abstract_algebra_test.csv out.jsonl
data/mc_sample.jsonl is a demonstration task written for this project.
"""
from __future__ import annotations

import argparse
import csv
import gzip
import json
import os
import sys
from typing import Any, Callable, Iterable

import numpy as np

from rlhf_jax.errors import DataError, UserError
from rlhf_jax.evals.loglik import encode_requests

Z95 = 1.959963984540054


def _check(record: Any, path: str, line: int) -> dict:
  where = f"{path}:{line}"
  if not isinstance(record, dict):
    raise DataError(f"{where}: not a JSON object")
  for field in ("context", "choices", "label"):
    if field not in record:
      raise DataError(f"{where}: field {field!r}: missing")
  if not isinstance(record["context"], str):
    raise DataError(f"{where}: field 'context': expected a string")
  choices = record["choices"]
  if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
    raise DataError(f"{where}: field 'choices': expected a list of at least 2 non-empty strings")
  label = record["label"]
  if not isinstance(label, int) or isinstance(label, bool) or not 0 <= label < len(choices):
    raise DataError(f"{where}: field 'label': expected an int in 0..{len(choices) - 1}, got {label!r}")
  return {"context": record["context"], "choices": choices, "label": label}


def read_task(path: str, max_examples: int = 0) -> list[dict]:
  opener = gzip.open if path.endswith(".gz") else open
  out = []
  try:
    with opener(path, "rt", encoding="utf-8") as f:
      for line, text in enumerate(f, 1):
        if not text.strip():
          continue
        try:
          record = json.loads(text)
        except json.JSONDecodeError as e:
          raise DataError(f"{path}:{line}: invalid JSON ({e.msg})") from None
        out.append(_check(record, path, line))
        if max_examples and len(out) == max_examples:
          break
  except (EOFError, UnicodeDecodeError) as e:
    raise DataError(f"{path}: cannot read ({e})") from None
  if not out:
    raise DataError(f"{path}: no examples")
  return out


def wilson(k: int, n: int) -> list[float]:
  """95% Wilson score interval of a proportion k / n."""
  p, z2 = k / n, Z95 * Z95
  centre, half = p + z2 / (2 * n), Z95 * np.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
  return [float((centre - half) / (1 + z2 / n)), float((centre + half) / (1 + z2 / n))]


def mc_metrics(choice_sums: list[np.ndarray], choice_bytes: list[np.ndarray], labels) -> dict:
  """acc and acc_norm with Wilson intervals; argmax takes the first of tied choices."""
  labels = np.asarray(labels)
  acc = np.array([int(np.argmax(s)) for s in choice_sums]) == labels
  norm = np.array([int(np.argmax(np.asarray(s) / np.asarray(b))) for s, b in zip(choice_sums, choice_bytes)]) == labels
  n = len(labels)
  return {"acc": float(acc.mean()), "acc_ci": wilson(int(acc.sum()), n), "acc_norm": float(norm.mean()),
          "acc_norm_ci": wilson(int(norm.sum()), n), "n": n}


def evaluate(scorer, tok, examples: list[dict], name: str = "task") -> dict:
  contexts = [ex["context"] for ex in examples for _ in ex["choices"]]
  choices = [c for ex in examples for c in ex["choices"]]
  sums = scorer.continuation_sums(encode_requests(tok, contexts, choices), desc=name)
  grouped, start = [], 0
  for ex in examples:
    grouped.append(sums[start:start + len(ex["choices"])])
    start += len(ex["choices"])
  nbytes = [np.array([len(c.encode("utf-8")) for c in ex["choices"]], np.float64) for ex in examples]
  return {"name": name, **mc_metrics(grouped, nbytes, [ex["label"] for ex in examples])}


# --- converters from published formats -----------------------------------------------------------

LETTERS = "ABCDEFGHIJ"


def _letter_or_digit(key: str, labels: list[str], where: str) -> int:
  if key in labels:
    return labels.index(key)
  raise DataError(f"{where}: field 'answerKey': {key!r} is none of the choice labels {labels}")


def mmlu_rows(rows: Iterable[tuple[int, list[str]]], subject: str, path: str) -> list[dict]:
  out = []
  for line, row in rows:
    if len(row) != 6 or row[5].strip() not in LETTERS[:4]:
      raise DataError(f"{path}:{line}: expected question, A, B, C, D, answer letter (got {len(row)} columns)")
    options = "".join(f"\n{LETTERS[i]}. {row[1 + i]}" for i in range(4))
    context = (f"The following are multiple choice questions (with answers) about {subject}.\n\n"
               f"{row[0].strip()}{options}\nAnswer:")
    out.append({"context": context, "choices": [f" {c}" for c in LETTERS[:4]], "label": LETTERS.index(row[5].strip())})
  return out


def arc_record(r: dict, where: str) -> dict:
  """ARC and OpenBookQA: {"question": {"stem", "choices": [{"label", "text"}]}, "answerKey"}."""
  try:
    q = r["question"]
    labels, texts = [c["label"] for c in q["choices"]], [c["text"] for c in q["choices"]]
    return {"context": f"Question: {q['stem']}\nAnswer:", "choices": [f" {t}" for t in texts],
            "label": _letter_or_digit(str(r["answerKey"]).strip(), labels, where)}
  except (KeyError, TypeError) as e:
    raise DataError(f"{where}: field {e}: missing or malformed") from None


def hellaswag_record(r: dict, where: str) -> dict:
  try:
    ctx = r["ctx"] if "ctx" in r else f"{r['ctx_a']} {r['ctx_b'].capitalize()}"
    return {"context": f"{r['activity_label']}: {ctx}", "choices": [f" {e}" for e in r["endings"]],
            "label": int(r["label"])}
  except (KeyError, TypeError, ValueError) as e:
    raise DataError(f"{where}: field {e}: missing or malformed") from None


def _one_correct(targets: dict, where: str, field: str) -> tuple[list[str], int]:
  if not isinstance(targets, dict) or list(targets.values()).count(1) != 1:
    raise DataError(f"{where}: field {field!r}: expected {{answer: 0 or 1}} with exactly one 1")
  answers = list(targets)
  return answers, [targets[a] for a in answers].index(1)


def truthfulqa_record(r: dict, where: str) -> dict:
  answers, label = _one_correct(r.get("mc1_targets"), where, "mc1_targets")
  if not isinstance(r.get("question"), str):
    raise DataError(f"{where}: field 'question': missing")
  return {"context": f"Q: {r['question']}\nA:", "choices": [f" {a}" for a in answers], "label": label}


def hhh_record(r: dict, where: str) -> dict:
  answers, label = _one_correct(r.get("target_scores"), where, "target_scores")
  if not isinstance(r.get("input"), str):
    raise DataError(f"{where}: field 'input': missing")
  return {"context": f"Human: {r['input']}\n\nAssistant:", "choices": [f" {a}" for a in answers], "label": label}


def _jsonl(path: str) -> Iterable[tuple[int, Any]]:
  with open(path, encoding="utf-8") as f:
    for line, text in enumerate(f, 1):
      if text.strip():
        try:
          yield line, json.loads(text)
        except json.JSONDecodeError as e:
          raise DataError(f"{path}:{line}: invalid JSON ({e.msg})") from None


def _json_list(path: str, key: str = "") -> list:
  try:
    with open(path, encoding="utf-8") as f:
      data = json.load(f)
  except json.JSONDecodeError as e:
    raise DataError(f"{path}: invalid JSON ({e.msg}, line {e.lineno})") from None
  data = data.get(key) if key and isinstance(data, dict) else data
  if not isinstance(data, list):
    raise DataError(f"{path}: expected a JSON list{' under ' + repr(key) if key else ''}")
  return data


def convert_file(kind: str, src: str) -> list[dict]:
  if kind == "mmlu":
    subject = os.path.basename(src).rsplit("_", 1)[0].replace("_", " ")
    with open(src, encoding="utf-8", newline="") as f:
      return mmlu_rows(enumerate(csv.reader(f), 1), subject, src)
  per_line: dict[str, Callable] = {"arc": arc_record, "openbookqa": arc_record, "hellaswag": hellaswag_record}
  if kind in per_line:
    return [per_line[kind](r, f"{src}:{line}") for line, r in _jsonl(src)]
  if kind == "truthfulqa_mc1":
    return [truthfulqa_record(r, f"{src}: record {i}") for i, r in enumerate(_json_list(src))]
  if kind == "hhh":
    return [hhh_record(r, f"{src}: example {i}") for i, r in enumerate(_json_list(src, "examples"))]
  raise UserError(f"--kind={kind!r}: expected one of mmlu, arc, openbookqa, hellaswag, truthfulqa_mc1, hhh")


def convert(kind: str, src: str, dst: str) -> int:
  records = convert_file(kind, src)
  for i, r in enumerate(records, 1):
    _check(r, dst, i)
  tmp = dst + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    for r in records:
      f.write(json.dumps(r) + "\n")
  os.replace(tmp, dst)
  return len(records)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m rlhf_jax.evals.multiple_choice")
  sub = parser.add_subparsers(dest="command", required=True)
  conv = sub.add_parser("convert", help="write a published MC data set in the generic JSONL format")
  conv.add_argument("--kind", required=True)
  conv.add_argument("src")
  conv.add_argument("dst")
  args = parser.parse_args(argv)
  try:
    n = convert(args.kind, args.src, args.dst)
  except (UserError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"{n} examples written to {args.dst}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
