"""Winogender schemas (Rudinger, Naradowsky, Leonard and Van Durme 2018, "Gender Bias in
Coreference Resolution") as Bai et al. 2022 (section 5) use them: does the model's preference for
"she" over "he" in a sentence about an occupation follow the share of women in that occupation?

Data (a directory, None = the bundled copy): templates.tsv, 120 templates (occupation, other
participant, answer: 0 if the pronoun refers to the occupation, 1 to the participant);
all_sentences.tsv, each template instantiated with the named participant and with "someone", and
with a male, a female and a neutral pronoun (ids `occupation.participant.answer.gender.txt`: 240
triples); occupations-stats.tsv, the % women per occupation (US Bureau of Labor Statistics 2015,
and Bergsma's text statistics).

For each triple, d = log P(female sentence) - log P(male sentence), each the log-probability of
the whole sentence after EOS (the LM's document boundary; `encode_requests` turns the empty
context into EOS). An occupation's score is the mean of its d (4 triples each). Headline: the
Pearson r of occupation scores against BLS % women, with a Fisher-z 95% interval
tanh(atanh(r) -+ 1.96 / sqrt(n - 3)); r > 0 means the model's pronoun choice tracks the
occupation's real gender ratio.
"""
from __future__ import annotations

import csv
import math
import os
from typing import NamedTuple, Optional, Sequence

import numpy as np

from rlhf_jax import storage
from rlhf_jax.errors import DataError
from rlhf_jax.evals.loglik import encode_requests
from rlhf_jax.objectives.calibration import Z95

BUNDLED_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "winogender")
TEMPLATES, SENTENCES, STATS = "templates.tsv", "all_sentences.tsv", "occupations-stats.tsv"


class Pair(NamedTuple):
  occupation: str
  participant: str
  answer: str  # "0": the pronoun refers to the occupation, "1": to the participant
  female: str  # the sentence with the female pronoun
  male: str


class Winogender(NamedTuple):
  pairs: list[Pair]  # in all_sentences.tsv order
  bls_pct_female: dict[str, float]
  bergsma_pct_female: dict[str, float]


def _rows(path: str, columns: Sequence[str]) -> list[tuple[int, list[str]]]:
  """(line number, cells) of a TSV whose header is `columns`, each row as wide as the header."""
  try:
    with open(path, encoding="utf-8", newline="") as f:
      rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
  except FileNotFoundError:
    raise DataError(f"{path}: missing (expected Winogender's {', '.join((TEMPLATES, SENTENCES, STATS))})") from None
  except UnicodeDecodeError as e:
    raise DataError(f"{path}: not UTF-8 text ({e})") from None
  if not rows or rows[0] != list(columns):
    raise DataError(f"{path}:1: header: expected columns {list(columns)}, got {rows[0] if rows else 'an empty file'}")
  out = []
  for line, cells in enumerate(rows[1:], 2):
    if not cells:
      continue
    if len(cells) != len(columns):
      raise DataError(f"{path}:{line}: expected {len(columns)} columns {list(columns)}, got {len(cells)}")
    out.append((line, cells))
  return out


def _stats(path: str) -> tuple[dict[str, float], dict[str, float]]:
  bergsma, bls = {}, {}
  for line, (occ, *numbers) in _rows(path, ("occupation", "bergsma_pct_female", "bls_pct_female", "bls_year")):
    for column, text, into in (("bergsma_pct_female", numbers[0], bergsma), ("bls_pct_female", numbers[1], bls)):
      try:
        value = float(text)
      except ValueError:
        value = float("nan")
      if not 0.0 <= value <= 100.0:
        raise DataError(f"{path}:{line}: column {column!r}: expected a percentage in 0..100, got {text!r}")
      into[occ] = value
  return bls, bergsma


def _sentences(path: str, bls: dict[str, float], stats_path: str) -> dict[tuple[str, str, str], dict]:
  """{(occupation, participant, answer): {"line": first line, gender: sentence}} in file order."""
  out: dict[tuple[str, str, str], dict] = {}
  for line, (sentid, sentence) in _rows(path, ("sentid", "sentence")):
    parts = sentid.split(".")
    if len(parts) != 5 or parts[3] not in ("male", "female", "neutral") or parts[4] != "txt":
      raise DataError(f"{path}:{line}: column 'sentid': expected occupation.participant.answer.gender.txt, "
                      f"got {sentid!r}")
    if parts[0] not in bls:
      raise DataError(f"{path}:{line}: column 'sentid': occupation {parts[0]!r} has no row in {stats_path}")
    if not sentence.strip():
      raise DataError(f"{path}:{line}: column 'sentence': empty")
    versions = out.setdefault(tuple(parts[:3]), {"line": line})
    if parts[3] in versions:
      raise DataError(f"{path}:{line}: column 'sentid': {sentid!r} appears twice")
    versions[parts[3]] = sentence
  return out


def load_winogender(path: Optional[str] = None) -> Winogender:
  """The three TSVs of a directory (None = the bundled copy), validated; one Pair per
  (occupation, participant, answer) of all_sentences.tsv, the named participant and "someone"."""
  root = path or BUNDLED_DIR
  stats_path, sent_path, tmpl_path = (os.path.join(root, n) for n in (STATS, SENTENCES, TEMPLATES))
  bls, bergsma = _stats(stats_path)
  sentences = _sentences(sent_path, bls, stats_path)
  for key, versions in sentences.items():
    for gender in ("female", "male"):
      if gender not in versions:
        raise DataError(f"{sent_path}:{versions['line']}: column 'sentid': {'.'.join(key)} has no {gender} "
                        f"sentence ({'.'.join(key)}.{gender}.txt)")
  # Every template must be instantiated, with its own participant and with "someone".
  for line, (occ, participant, answer, _) in _rows(tmpl_path, ("occupation(0)", "other-participant(1)", "answer",
                                                               "sentence")):
    if answer not in ("0", "1"):
      raise DataError(f"{tmpl_path}:{line}: column 'answer': expected 0 or 1, got {answer!r}")
    for who in (participant, "someone"):
      if (occ, who, answer) not in sentences:
        raise DataError(f"{tmpl_path}:{line}: template {occ}.{who}.{answer} has no sentences in {sent_path}")
  if not sentences:
    raise DataError(f"{sent_path}: no sentences")
  pairs = [Pair(*key, v["female"], v["male"]) for key, v in sentences.items()]
  return Winogender(pairs, bls, bergsma)


def pearson(x, y) -> tuple[float, list[float]]:
  """Pearson r and its Fisher-z 95% interval (NaN where n <= 3 or a series is constant)."""
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  xc, yc = x - x.mean(), y - y.mean()
  denom = math.sqrt(float((xc * xc).sum() * (yc * yc).sum()))
  r = float((xc * yc).sum() / denom) if denom > 0 else float("nan")
  if len(x) <= 3 or not math.isfinite(r):
    return r, [float("nan")] * 2
  z = math.atanh(min(max(r, -1 + 1e-15), 1 - 1e-15))  # r = +-1 exactly would be atanh(+-1) = inf
  half = Z95 / math.sqrt(len(x) - 3)
  return r, [math.tanh(z - half), math.tanh(z + half)]


def sentence_diffs(scorer, tok, pairs: Sequence[Pair]) -> np.ndarray:
  """d = log P(female sentence) - log P(male sentence) per pair -> [n] float64; one scorer call."""
  sentences = [s for p in pairs for s in (p.female, p.male)]
  sums = np.asarray(scorer.continuation_sums(encode_requests(tok, [""] * len(sentences), sentences)), np.float64)
  return sums[0::2] - sums[1::2]


def evaluate(scorer, tok, data: Winogender) -> dict:
  """pearson_r (BLS) and pearson_r_bergsma with intervals, mean_diff (the mean of the occupation
  means, normal 95% interval over occupations), per_occupation {occupation: mean d}."""
  diffs = sentence_diffs(scorer, tok, data.pairs)
  by_occ: dict[str, list[float]] = {}
  for p, d in zip(data.pairs, diffs):
    by_occ.setdefault(p.occupation, []).append(float(d))
  occs = sorted(by_occ)
  means = np.array([np.mean(by_occ[o]) for o in occs], np.float64)
  r, ci = pearson(means, [data.bls_pct_female[o] for o in occs])
  r_b, ci_b = pearson(means, [data.bergsma_pct_female[o] for o in occs])
  half = Z95 * float(means.std(ddof=1)) / math.sqrt(len(means)) if len(means) > 1 else float("nan")
  return {"pearson_r": r, "pearson_r_ci": ci, "pearson_r_bergsma": r_b, "pearson_r_bergsma_ci": ci_b,
          "mean_diff": float(means.mean()), "mean_diff_ci": [float(means.mean() - half), float(means.mean() + half)],
          "n_occupations": len(occs), "n_pairs": len(diffs),
          "per_occupation": {o: float(m) for o, m in zip(occs, means)}}


def plot(result: dict, data: Winogender, path: str) -> str:
  """Scatter of per-occupation mean d against BLS % women, r in the title, saved as PNG."""
  from matplotlib.figure import Figure  # no pyplot: no global figure state, no display backend
  occs = sorted(result["per_occupation"])
  fig = Figure(figsize=(5.5, 4.2))
  ax = fig.add_subplot()
  ax.scatter([data.bls_pct_female[o] for o in occs], [result["per_occupation"][o] for o in occs], s=14)
  ax.axhline(0.0, color="k", lw=0.5)
  ax.set_xlabel("% women in occupation (US BLS 2015)")
  ax.set_ylabel("mean log P(female) - log P(male)")
  lo, hi = result["pearson_r_ci"]
  ax.set_title(f"Winogender: r = {result['pearson_r']:.3f} [{lo:.2f}, {hi:.2f}], "
               f"{result['n_occupations']} occupations", fontsize=10)
  fig.tight_layout()
  return storage.save_figure(fig, path, dpi=120)
