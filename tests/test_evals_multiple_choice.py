"""Multiple choice: acc / acc_norm by hand, brute-force scores on a real model, readers, converters."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from rlhf_jax.errors import DataError
from rlhf_jax.evals import multiple_choice as mc

ROOT = os.path.join(os.path.dirname(__file__), os.pardir)


class _PlantedScorer:
  def __init__(self, sums):
    self.sums = sums

  def continuation_sums(self, requests, desc=""):
    assert len(requests) == len(self.sums)
    return np.array(self.sums, np.float64)


class _Tok:
  eos_id = 2

  def encode(self, text):
    return list(text.encode())


def test_acc_and_acc_norm_on_a_hand_made_task():
  examples = [
      # correct answer long (16 bytes): total -8 loses to -6 (acc wrong), per byte -0.5 beats -3 (acc_norm right)
      {"context": "Q1", "choices": [" a longer answer", " no"], "label": 0},
      # correct answer both ways
      {"context": "Q2", "choices": [" yes", " nope"], "label": 0},
  ]
  r = mc.evaluate(_PlantedScorer([-8.0, -6.0, -1.0, -5.0]), _Tok(), examples, name="hand")
  assert (r["acc"], r["acc_norm"], r["n"], r["name"]) == (0.5, 1.0, 2, "hand")


def test_wilson_interval_closed_form():
  # k = 7 of n = 10: centre (0.7 + 1.96^2/20) / (1 + 1.96^2/10), half z sqrt(0.21/10 + z^2/400) / (1 + z^2/10)
  z = 1.959963984540054
  centre = (0.7 + z * z / 20) / (1 + z * z / 10)
  half = z * math.sqrt(0.021 + z * z / 400) / (1 + z * z / 10)
  assert mc.wilson(7, 10) == pytest.approx([centre - half, centre + half], abs=1e-12)


def test_scores_equal_a_forward_pass_per_example(tmp_path):
  import flax.linen as nn
  import jax

  from rlhf_jax.evals.loglik import Scorer
  from rlhf_jax.model import Transformer, init_params
  from rlhf_jax.model_config import ModelConfig
  from rlhf_jax.tokenizer import train_tokenizer
  examples = mc.read_task(os.path.join(ROOT, "rlhf_jax", "evals", "data", "mc_sample.jsonl"), max_examples=5)
  examples[0]["context"] = "Question: " + "a very long question that fills more than one bucket " * 3 + "?\nAnswer:"
  texts = [ex["context"] + c for ex in examples for c in ex["choices"]] * 10
  tok = train_tokenizer(texts, 300, str(tmp_path))
  cfg = ModelConfig(vocab_size=tok.vocab_size, d_model=32, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=16,
                    mlp_dim=64)
  params = nn.meta.unbox(init_params(cfg, jax.random.PRNGKey(3)))
  sums = []
  scorer = Scorer(params, cfg, batch_size=8, min_len=8)
  scorer.continuation_sums = lambda reqs, desc="", f=scorer.continuation_sums: sums.append(f(reqs)) or sums[-1]
  r = mc.evaluate(scorer, tok, examples)
  got, i = sums[0], 0
  lengths = set()
  logits_of = jax.jit(lambda s: Transformer(cfg).apply({"params": params}, s).logits)
  right = right_norm = 0
  for ex in examples:
    ref = []
    for choice in ex["choices"]:
      ctx, cont = tok.encode(ex["context"]), tok.encode(choice)
      lengths.add(len(ctx) + len(cont))
      logits = np.asarray(logits_of(np.array([ctx + cont], np.int32)), np.float64)[0]
      logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(-1, keepdims=True)
      ref.append(sum(logp[len(ctx) + j - 1, t] for j, t in enumerate(cont)))
      assert got[i] == pytest.approx(ref[-1], abs=1e-4 * len(cont))
      i += 1
    right += int(np.argmax(ref)) == ex["label"]
    right_norm += int(np.argmax(np.array(ref) / [len(c.encode()) for c in ex["choices"]])) == ex["label"]
  from rlhf_jax.evals.loglik import bucket_length
  assert len({bucket_length(n, 8, cfg.max_seq_len) for n in lengths}) >= 2  # more than one bucket
  assert (r["acc"], r["acc_norm"]) == (right / len(examples), right_norm / len(examples))


@pytest.mark.parametrize("line, message", [
    ('{"context": "c", "choices": ["a", "b"], "label": 2}', r"t\.jsonl:2: field 'label': expected an int in 0\.\.1, got 2"),
    ('{"context": "c", "label": 0}', r"t\.jsonl:2: field 'choices': missing"),
    ('{"context": "c", "choices": ["a"], "label": 0}', r"t\.jsonl:2: field 'choices': expected a list of at least 2"),
    ('{"context": "c", "choices": ["a", "b"], "label": true}', r"t\.jsonl:2: field 'label'"),
    ("{oops", r"t\.jsonl:2: invalid JSON"),
])
def test_malformed_task_lines_name_file_line_and_field(tmp_path, line, message):
  path = tmp_path / "t.jsonl"
  path.write_text('{"context": "c", "choices": ["a", "b"], "label": 1}\n' + line + "\n")
  with pytest.raises(DataError, match=message):
    mc.read_task(str(path))


def test_converters_from_published_formats(tmp_path):
  (tmp_path / "abstract_algebra_test.csv").write_text('"What is 1+1?",1,2,3,4,B\n')
  assert mc.convert_file("mmlu", str(tmp_path / "abstract_algebra_test.csv")) == [{
      "context": "The following are multiple choice questions (with answers) about abstract algebra.\n\n"
                 "What is 1+1?\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer:", "choices": [" A", " B", " C", " D"], "label": 1}]
  arc = {"question": {"stem": "Which is a metal?", "choices": [{"label": "1", "text": "iron"}, {"label": "2", "text": "wood"}]},
         "answerKey": "1"}
  (tmp_path / "arc.jsonl").write_text(json.dumps(arc) + "\n")
  assert mc.convert_file("arc", str(tmp_path / "arc.jsonl")) == [
      {"context": "Question: Which is a metal?\nAnswer:", "choices": [" iron", " wood"], "label": 0}]
  hs = {"activity_label": "Cooking", "ctx_a": "A man cracks eggs.", "ctx_b": "he", "endings": ["stirs.", "sings."], "label": "0"}
  (tmp_path / "hs.jsonl").write_text(json.dumps(hs) + "\n")
  assert mc.convert_file("hellaswag", str(tmp_path / "hs.jsonl")) == [
      {"context": "Cooking: A man cracks eggs. He", "choices": [" stirs.", " sings."], "label": 0}]
  (tmp_path / "tqa.json").write_text(json.dumps([{"question": "Is the sky green?", "mc1_targets": {"Yes.": 0, "No.": 1}}]))
  assert mc.convert_file("truthfulqa_mc1", str(tmp_path / "tqa.json")) == [
      {"context": "Q: Is the sky green?\nA:", "choices": [" Yes.", " No."], "label": 1}]
  (tmp_path / "hhh.json").write_text(json.dumps({"examples": [{"input": "Help me.", "target_scores": {"Sure.": 1, "No.": 0}}]}))
  assert mc.convert_file("hhh", str(tmp_path / "hhh.json")) == [
      {"context": "Human: Help me.\n\nAssistant:", "choices": [" Sure.", " No."], "label": 0}]


def test_convert_cli_writes_the_task_and_a_bad_file_is_one_line_exit_2(tmp_path):
  src, dst = tmp_path / "x_test.csv", tmp_path / "out.jsonl"
  src.write_text('"Q?",a,b,c,d,C\n')
  cmd = [sys.executable, "-m", "rlhf_jax.evals.multiple_choice", "convert", "--kind=mmlu", str(src), str(dst)]
  assert subprocess.run(cmd, cwd=ROOT, capture_output=True, timeout=120).returncode == 0
  assert mc.read_task(str(dst))[0]["label"] == 2
  src.write_text('"Q?",a,b,c,d,E\n')
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0
  assert proc.stderr.startswith(f"error: {src}:1: expected question, A, B, C, D, answer letter")
