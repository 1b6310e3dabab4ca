"""Multiple choice: scores against one forward pass per sequence, acc / acc_norm and Wilson intervals
by hand, the task reader's errors, and each converter on hand-written files in the published layout."""
import gzip
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from rlhf_jax.errors import DataError
from rlhf_jax.evals import multiple_choice as mc

from eval_fakes import CharTok

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir))
SAMPLE = os.path.join(ROOT, "rlhf_jax", "evals", "data", "mc_sample.jsonl")
Z = 1.959963984540054


class _PlantedScorer:
  """Sum of log-probs looked up by (context, choice) text; records every call."""

  def __init__(self, planted):
    self.planted, self.calls = planted, []

  def continuation_sums(self, requests, desc=""):
    self.calls.append(len(requests))
    tok = CharTok()
    return np.array([self.planted[(tok.decode(c), tok.decode(t))] for c, t in requests], np.float64)


class _Recording:
  """A real scorer whose continuation_sums results are kept for comparison."""

  def __init__(self, scorer):
    self.scorer, self.results = scorer, []

  def continuation_sums(self, requests, desc=""):
    self.results.append((list(requests), self.scorer.continuation_sums(requests, desc=desc)))
    return self.results[-1][1]


# --- scoring against brute force ------------------------------------------------------------------

MIXED = [  # contexts and choices of very different lengths: 7 to 113 tokens with the test's tokenizer
    {"context": "Q: sky?\nA:", "choices": [" blue", " a green one"], "label": 0},
    {"context": "Question: What do bees make, in their hives, all summer long?\nAnswer:",
     "choices": [" honey", " milk", " they make small stones out of the sand near the river"], "label": 0},
    {"context": "Question: Which planet do we live on?\nAnswer:", "choices": [" Earth", " Mars"], "label": 1},
    {"context": "Hi", "choices": [" there", " the long way round the garden and back"], "label": 1},
]


def _reference_sum(apply_fn, ctx, cont):
  """One unpadded forward pass; float64 log-softmax; the continuation tokens' log-probs summed."""
  logits = np.asarray(apply_fn(np.array([ctx + cont], np.int32)), np.float64)[0]  # [len, vocab]
  shifted = logits - logits.max(-1, keepdims=True)
  logp = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
  return sum(logp[len(ctx) + j - 1, t] for j, t in enumerate(cont))  # token t predicted one earlier


def test_scores_equal_one_forward_pass_per_choice(tmp_path):
  import flax.linen as nn
  import jax

  from rlhf_jax.data.tokenizer import train_tokenizer
  from rlhf_jax.evals.loglik import Scorer, bucket_length
  from rlhf_jax.model.config import ModelConfig
  from rlhf_jax.model.transformer import Transformer, init_params
  from rlhf_jax.training import sharding as shd
  sample = mc.read_task(SAMPLE)
  texts = [ex["context"] + c for ex in sample + MIXED for c in ex["choices"]] * 12
  tok = train_tokenizer(texts, 300, str(tmp_path))
  cfg = ModelConfig(vocab_size=tok.vocab_size, d_model=32, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=16,
                    mlp_dim=64, max_seq_len=128)
  params = nn.meta.unbox(init_params(cfg, jax.random.PRNGKey(0)))
  examples = MIXED + sample[:3]
  scorer = _Recording(Scorer(params, cfg, shd.make_mesh((1, 1, 1), jax.devices()[:1]), batch_size=4, min_len=8))
  result = mc.evaluate(scorer, tok, examples, name="mixed")
  assert len(scorer.results) == 1  # one scorer call for the whole task
  got = scorer.results[0][1]
  apply_fn = jax.jit(lambda seq: Transformer(cfg).apply({"params": params}, seq).logits)
  refs, buckets, i = [], set(), 0
  for ex in examples:
    ref = []
    for choice in ex["choices"]:  # no context ends in whitespace: context and choice encode apart
      ctx, cont = tok.encode(ex["context"]), tok.encode(choice)
      buckets.add(bucket_length(len(ctx) + len(cont), 8, 128))
      ref.append(_reference_sum(apply_fn, ctx, cont))
      assert abs(got[i] - ref[-1]) <= 1e-4 * len(cont), (ex["context"], choice)
      i += 1
    refs.append(np.array(ref))
  assert i == len(got) and buckets >= {8, 16, 32}
  nchars = [np.array([len(c) for c in ex["choices"]]) for ex in examples]
  acc = np.mean([np.argmax(r) == ex["label"] for r, ex in zip(refs, examples)])
  acc_norm = np.mean([np.argmax(r / b) == ex["label"] for r, b, ex in zip(refs, nchars, examples)])
  assert (result["acc"], result["acc_norm"], result["n"]) == (pytest.approx(acc), pytest.approx(acc_norm), 7)


# --- metrics --------------------------------------------------------------------------------------

def test_acc_and_acc_norm_disagree_as_planted():
  examples = [
      # a long right answer: lower total (acc wrong), higher per character (-9/27 > -6/3: acc_norm right)
      {"context": "Q1", "choices": [" a much longer right answer", " no"], "label": 0},
      {"context": "Q2", "choices": [" no", " the right answer, at length"], "label": 1},
      # right both ways; the leading space counts (-3/3 > -9/8, though -3/2 < -9/7)
      {"context": "Q3", "choices": [" ab", " abcdefg"], "label": 0},
      # a short right answer: higher total (acc right), lower per character (-1/2 < -3.8/19: acc_norm wrong)
      {"context": "Q4", "choices": [" a", " bbbbbbbbbbbbbbbbbb"], "label": 0},
      # a tie goes to the first choice, which is wrong here both ways
      {"context": "Q5", "choices": [" x", " y"], "label": 1},
      # per character (the harness's), not per UTF-8 byte: -4.2/4 < -3.5/5 (acc_norm right); per
      # byte -4.2/7 > -3.5/5 would make it wrong
      {"context": "Q6", "choices": [" \u00e9\u00e9\u00e9", " abcd"], "label": 1},
      {"context": "Q7", "choices": [" the long right answer", " no"], "label": 0},
  ]
  sums = [[-9.0, -6.0], [-6.0, -9.0], [-3.0, -9.0], [-1.0, -3.8], [-2.0, -2.0], [-4.2, -3.5], [-8.0, -7.0]]
  planted = {(ex["context"], c): s for ex, row in zip(examples, sums) for c, s in zip(ex["choices"], row)}
  scorer = _PlantedScorer(planted)
  r = mc.evaluate(scorer, CharTok(), examples, name="hand")
  assert scorer.calls == [14]
  assert r == {"name": "hand", "acc": 3 / 7, "acc_ci": mc.wilson(3, 7), "acc_norm": 5 / 7,
               "acc_norm_ci": mc.wilson(5, 7), "n": 7}
  assert json.loads(json.dumps(r)) == r  # JSON-able as it stands


def test_mc_metrics_rejects_mismatched_inputs():
  with pytest.raises(ValueError):
    mc.mc_metrics([np.zeros(2)], [np.ones(3)], [0])
  with pytest.raises(ValueError):
    mc.mc_metrics([np.zeros(2)], [np.ones(2)], [2])


def test_wilson_interval_closed_form():
  # k = 7 of n = 10 by hand: (p + z^2/2n -+ z sqrt(p(1-p)/n + z^2/4n^2)) / (1 + z^2/n)
  z2 = Z * Z
  centre = (0.7 + z2 / 20) / (1 + z2 / 10)
  half = Z * math.sqrt(0.7 * 0.3 / 10 + z2 / 400) / (1 + z2 / 10)
  assert mc.wilson(7, 10) == pytest.approx([centre - half, centre + half], abs=1e-12)
  assert mc.wilson(7, 10) == pytest.approx([0.3968, 0.8922], abs=5e-5)  # the textbook values
  # at k = 0 and k = n the interval is [0, z^2/(n+z^2)] and [n/(n+z^2), 1]
  assert mc.wilson(0, 10) == pytest.approx([0.0, z2 / (10 + z2)], abs=1e-12)
  assert mc.wilson(10, 10) == pytest.approx([10 / (10 + z2), 1.0], abs=1e-12)


# --- the task reader ------------------------------------------------------------------------------

GOOD = '{"context": "c", "choices": ["a", "b"], "label": 1}'


@pytest.mark.parametrize("line, field, detail", [
    ('{"context": "c", "choices": ["a", "b"], "label": 2}', "label", "expected an int in 0..1, got 2"),
    ('{"context": "c", "choices": ["a", "b"], "label": true}', "label", "got True"),
    ('{"context": "c", "choices": ["a", "b"], "label": "1"}', "label", "got '1'"),
    ('{"context": "c", "label": 0}', "choices", "missing"),
    ('{"choices": ["a", "b"], "label": 0}', "context", "missing"),
    ('{"context": "c", "choices": ["a"], "label": 0}', "choices", "at least 2"),
    ('{"context": "c", "choices": ["a", ""], "label": 0}', "choices", "non-empty"),
    ('{"context": 3, "choices": ["a", "b"], "label": 0}', "context", "expected a string"),
])
def test_malformed_line_names_file_line_and_field(tmp_path, line, field, detail):
  path = tmp_path / "task.jsonl"
  path.write_text(GOOD + "\n\n" + line + "\n")  # the blank line is skipped but counted
  with pytest.raises(DataError) as e:
    mc.read_task(str(path))
  assert str(e.value).startswith(f"{path}:3: field '{field}': ") and detail in str(e.value)


@pytest.mark.parametrize("line, detail", [("{oops", "invalid JSON"), ("[1, 2]", "expected a JSON object")])
def test_bad_json_names_file_and_line(tmp_path, line, detail):
  path = tmp_path / "task.jsonl"
  path.write_text(GOOD + "\n" + line + "\n")
  with pytest.raises(DataError, match=rf"^{path}:2: {detail}"):
    mc.read_task(str(path))


def test_read_task_gzip_limit_and_the_shipped_sample(tmp_path):
  path = str(tmp_path / "t.jsonl.gz")
  with gzip.open(path, "wt") as f:
    f.write("\n".join([GOOD, '{"context": "d", "choices": ["x", "y", "z"], "label": 2, "id": "q2"}', GOOD]))
  assert mc.read_task(path)[1] == {"context": "d", "choices": ["x", "y", "z"], "label": 2, "id": "q2"}
  assert len(mc.read_task(path, max_examples=2)) == 2
  (tmp_path / "empty.jsonl").write_text("\n\n")
  with pytest.raises(DataError, match="no examples"):
    mc.read_task(str(tmp_path / "empty.jsonl"))
  sample = mc.read_task(SAMPLE)
  assert len(sample) == 20 and {ex["label"] for ex in sample} == {0, 1, 2}
  assert all(not ex["context"][-1].isspace() and c.startswith(" ") for ex in sample for c in ex["choices"])


# --- converters -----------------------------------------------------------------------------------

def _write(path, text):
  path.write_text(text)
  return str(path)


def test_mmlu(tmp_path):
  src = _write(tmp_path / "abstract_algebra_test.csv", '"What is 1+1, in Z?",1,2,3,4,B\nWhich?,w,x,y,z,D\n')
  head = "The following are multiple choice questions (with answers) about abstract algebra.\n\n"
  assert mc.convert_file("mmlu", src) == [
      {"context": head + "What is 1+1, in Z?\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer:", "choices": [" A", " B", " C", " D"],
       "label": 1},
      {"context": head + "Which?\nA. w\nB. x\nC. y\nD. z\nAnswer:", "choices": [" A", " B", " C", " D"], "label": 3}]
  assert mc.mmlu_subject("/d/high_school_us_history_dev.csv") == "high school us history"
  bad = _write(tmp_path / "x_test.csv", "Q,a,b,c,d,A\nQ,a,b,c,d,E\n")
  with pytest.raises(DataError, match=rf"^{bad}:2: field 'answer'"):
    mc.convert_file("mmlu", bad)


def _arc(stem, labels, texts, key, **extra):
  return json.dumps({**extra, "question": {"stem": stem, "choices": [{"label": l, "text": t}
                                                                     for l, t in zip(labels, texts)]},
                     "answerKey": key})


@pytest.mark.parametrize("kind", ["arc", "openbookqa"])
def test_arc_and_openbookqa_letter_and_digit_keys(tmp_path, kind):
  src = _write(tmp_path / "a.jsonl", "\n".join([
      _arc("Which is a metal?", "ABCD", ["wood", "iron", "glass", "clay"], "B", id="Mercury_1"),
      _arc("Which is a gas?", "1234", ["rock", "ice", "steam", "salt"], "3"),  # ARC's numeric labels
      _arc("Which is warm?", "ABC", ["snow", "fire", "ice"], "2"),  # a digit key for letter labels
  ]) + "\n")
  assert mc.convert_file(kind, src) == [
      {"context": "Question: Which is a metal?\nAnswer:", "choices": [" wood", " iron", " glass", " clay"], "label": 1,
       "id": "Mercury_1"},
      {"context": "Question: Which is a gas?\nAnswer:", "choices": [" rock", " ice", " steam", " salt"], "label": 2},
      {"context": "Question: Which is warm?\nAnswer:", "choices": [" snow", " fire", " ice"], "label": 1}]
  bad = _write(tmp_path / "b.jsonl", _arc("Q?", "AB", ["x", "y"], "A") + "\n" + _arc("Q?", "AB", ["x", "y"], "E"))
  with pytest.raises(DataError, match=rf"^{bad}:2: field 'answerKey'"):
    mc.convert_file(kind, bad)
  bad = _write(tmp_path / "c.jsonl", json.dumps({"question": {"stem": "Q?", "choices": [{"label": "A"}]}}))
  with pytest.raises(DataError, match=rf"^{bad}:1: field 'question.choices\[0\].text': missing"):
    mc.convert_file(kind, bad)


def test_hellaswag(tmp_path):
  rows = [
      {"activity_label": "Cooking", "ctx_a": "A man cracks eggs.", "ctx_b": "he", "ctx": "unused",
       "endings": ["stirs them.", "sings."], "label": 0},
      {"activity_label": "Making tea", "ctx": "[header] How to make tea [title] Boil water.",
       "endings": ["Pour it.", "Drink [substeps] the pot."], "label": "1"},
  ]
  src = _write(tmp_path / "hs.jsonl", "\n".join(json.dumps(r) for r in rows))
  assert mc.convert_file("hellaswag", src) == [
      {"context": "Cooking: A man cracks eggs. He", "choices": [" stirs them.", " sings."], "label": 0},
      {"context": "Making tea: How to make tea. Boil water.", "choices": [" Pour it.", " Drink the pot."],
       "label": 1}]
  bad = _write(tmp_path / "bad.jsonl", json.dumps({**rows[1], "label": 5}))
  with pytest.raises(DataError, match=rf"^{bad}:1: field 'label': expected an int in 0..1, got 5"):
    mc.convert_file("hellaswag", bad)
  bad = _write(tmp_path / "test_split.jsonl", json.dumps({**rows[1], "label": ""}))
  with pytest.raises(DataError, match=rf"^{bad}:1: field 'label'"):
    mc.convert_file("hellaswag", bad)


def test_truthfulqa_mc1_and_hhh(tmp_path):
  tqa = [{"question": "Is the sky green?", "mc1_targets": {"Yes.": 0, "No, it is blue.": 1, "Sometimes.": 0},
          "mc2_targets": {"Yes.": 0}},
         {"question": "Do fish swim?", "mc1_targets": {"Yes.": 1, "No.": 0}}]
  src = _write(tmp_path / "mc_task.json", json.dumps(tqa))
  assert mc.convert_file("truthfulqa_mc1", src) == [
      {"context": "Q: Is the sky green?\nA:", "choices": [" Yes.", " No, it is blue.", " Sometimes."], "label": 1},
      {"context": "Q: Do fish swim?\nA:", "choices": [" Yes.", " No."], "label": 0}]
  bad = _write(tmp_path / "bad.json", json.dumps([tqa[0], {"question": "Q?", "mc1_targets": {"a": 1, "b": 1}}]))
  with pytest.raises(DataError, match=rf"^{bad}: record 2: field 'mc1_targets'"):
    mc.convert_file("truthfulqa_mc1", bad)
  hhh = {"name": "hhh", "examples": [{"input": "Help me.", "target_scores": {"No.": 0, "Sure, here.": 1}},
                                     {"input": "Hi", "target_scores": {"Hello!": 1, "Go away.": 0}}]}
  src = _write(tmp_path / "task.json", json.dumps(hhh))
  assert mc.convert_file("hhh", src) == [
      {"context": "Human: Help me.\n\nAssistant:", "choices": [" No.", " Sure, here."], "label": 1},
      {"context": "Human: Hi\n\nAssistant:", "choices": [" Hello!", " Go away."], "label": 0}]
  bad = _write(tmp_path / "bad_hhh.json", json.dumps({"examples": [{"target_scores": {"a": 1, "b": 0}}]}))
  with pytest.raises(DataError, match=rf"^{bad}: record 1: field 'input': missing"):
    mc.convert_file("hhh", bad)


def test_convert_round_trip_and_cli(tmp_path):
  src = _write(tmp_path / "anatomy_test.csv", "Q one?,a,b,c,d,C\nQ two?,a,b,c,d,A\n")
  dst = str(tmp_path / "anatomy.jsonl.gz")
  assert mc.convert("mmlu", src, dst) == 2
  assert mc.read_task(dst) == mc.convert_file("mmlu", src)
  out = str(tmp_path / "out.jsonl")
  cmd = [sys.executable, "-m", "rlhf_jax", "convert_mc", "--kind=mmlu", src, out]
  ok = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert ok.returncode == 0, ok.stderr
  assert [ex["label"] for ex in mc.read_task(out)] == [2, 0]
  _write(tmp_path / "anatomy_test.csv", "Q one?,a,b,c,d,C\nQ two?,a,b,c\n")
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2
  assert proc.stderr.splitlines() == [f"error: {src}:2: expected 6 columns (question, A, B, C, D, answer), got 4"]
  assert [ex["label"] for ex in mc.read_task(out)] == [2, 0]  # the earlier output is left whole
