"""The PM entry point: preference-model pretraining then finetuning on real hh-rlhf comparisons,
the evaluation reports written beside the PM (checked against scores recomputed here), the
train-PM / test-PM halves, and the eval_pm command line.

One PMP + main run (about a minute on 2 CPU cores) is shared by the module."""
import gzip
import json
import os
import shutil
import subprocess
import sys
import types

import flax.linen as nn
import jax
import numpy as np
import pytest
from conftest import small_run_config

from rlhf_jax.data import inputs
from rlhf_jax.data.hh_rlhf.records import read_comparisons
from rlhf_jax.data.lm_data import train_eval_records
from rlhf_jax.data.pm_data import PMBatcher, encode_comparison, split_in_halves
from rlhf_jax.data.tokenizer import MODEL_FILE, Tokenizer
from rlhf_jax.model.transformer import init_params
from rlhf_jax.objectives import calibration as cal
from rlhf_jax.objectives import pm
from rlhf_jax.trainers import train_pm
from rlhf_jax.trainers.pm_evaluation import evaluate_pm
from rlhf_jax.training import loop
from rlhf_jax.training.checkpointing import Checkpointer
from rlhf_jax.training.metrics import read_metrics
from rlhf_jax.training.saved_runs import load_run_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from configs import pm as pm_config  # noqa: E402

# Subprocesses run on 1 CPU device (this test session itself has 8 fake devices).
ENV = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
STEPS, PMP_STEPS, PMP_RECORDS = 20, 10, 160
PNG = b"\x89PNG\r\n\x1a\n"

# --- synthetic comparisons (hh-rlhf format) -------------------------------------------------------

SYLLABLES = ["ka", "lo", "mi", "ter", "van", "sup", "re", "dol", "qui", "nex", "bar", "fen", "tor",
             "ish", "gle", "pra", "um", "zo", "wek", "hal"]


def _sentence(rng, words):
  return " ".join("".join(rng.choice(SYLLABLES, size=rng.integers(1, 4))) for _ in range(words)) + "."


def _write_comparisons(path, n, seed):
  """n comparisons sharing their prompt (one or two Human turns); the chosen answer is polite
  and long, the rejected one curt, so that a PM can learn the difference from the text."""
  rng = np.random.default_rng(seed)
  with gzip.open(path, "wt", encoding="utf-8") as f:
    for _ in range(n):
      prompt = f"\n\nHuman: {_sentence(rng, 8)}"
      if rng.random() < 0.5:
        prompt += f"\n\nAssistant: {_sentence(rng, 6)}\n\nHuman: {_sentence(rng, 5)}"
      chosen = f"{prompt}\n\nAssistant: Thank you, {_sentence(rng, 10)}"
      rejected = f"{prompt}\n\nAssistant: No. {_sentence(rng, 3)}"
      f.write(json.dumps({"chosen": chosen, "rejected": rejected}) + "\n")
  return str(path)


def _config(steps=STEPS):
  return small_run_config(pm_config.get_config("tiny"), steps, max_examples=200)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  root = tmp_path_factory.mktemp("pm")
  config = _config()
  config.pmp.path = _write_comparisons(root / "pmp.jsonl.gz", PMP_RECORDS, seed=0)
  config.pmp.steps = PMP_STEPS
  workdir = root / "run"
  last = train_pm.train(config, str(workdir))  # main stage on harmless-base (max_examples=200)
  return types.SimpleNamespace(root=root, workdir=workdir, pmp_dir=workdir / "pmp",
                               pmp_file=config.pmp.path, last=last)


# --- independent recomputation of scores ----------------------------------------------------------

def _model_and_params(run_dir, params_dir=None):
  """The run's model (from its config.json) and the final params of params_dir, on the host."""
  config = load_run_config(str(run_dir))
  s = loop.setup(config)
  return config, s.model, jax.device_get(loop.restore_params(str(params_dir or run_dir), s.abstract))


def _batcher(config, run_dir, records):
  tok = Tokenizer(str(run_dir / MODEL_FILE))
  t = config.train
  return PMBatcher([encode_comparison(tok, r) for r in records], batch_size=t.batch_size,
                   seq_len=t.seq_len, seed=t.seed, pad_id=tok.pad_id)


# The reports' scores come from the run's own programs (eight devices, or the eval_pm command's),
# the scores recomputed here from plain jit on one device: the same forward pass up to float32
# reassociation (~1e-8 on scores of magnitude < 0.2). The score comparisons below allow 1e-5 each,
# so a margin may move by 2e-5.
MARGIN_TOL = 2e-5


def _assert_accuracy_close(accuracy, reference, scores):
  """Accuracies (fractions of margins > 0) of the same params on other programs: only a
  comparison whose margin is within MARGIN_TOL of 0 may count differently."""
  undecided = int(np.sum(np.abs(scores[:, 0] - scores[:, 1]) <= MARGIN_TOL))
  assert abs(accuracy - reference) * len(scores) <= undecided + 1e-9, (accuracy, reference, undecided)


def _ece_tolerance(scores):
  """ECE = sum over bins of |sum (outcome - predicted)| / (2n): continuous in each prediction
  with slope <= 1 / (2n), so a margin change of MARGIN_TOL (sigmoid's slope <= 1/4) moves it by
  <= MARGIN_TOL / 4 in all; a comparison whose predictions p, 1 - p lie within that of a bin edge
  may change bins, each of its two entries then changing the ECE by <= 2 / (2n)."""
  p = 1 / (1 + np.exp(-(scores[:, 0] - scores[:, 1])))
  near_edge = np.abs(p[:, None] - np.linspace(0.1, 0.9, 9)[None, :]) <= MARGIN_TOL / 4
  return MARGIN_TOL / 4 + 2 * int(near_edge.any(axis=1).sum()) / len(scores)


def _scores(model, params, batcher):
  """[n, 2] scores by model.apply on one device (no mesh, no shardings), in file order."""
  score = jax.jit(lambda p, batch: pm.pm_scores(p, model, batch)[0])
  out = []
  for batch in batcher.in_order():
    n = int(batch.pop("num_valid"))
    out.append(np.asarray(score(params, batch))[:n])
  return np.concatenate(out)


# --- (a) preference-model pretraining -------------------------------------------------------------

def test_pmp_stage_runs_first_in_its_own_directory(run):
  with Checkpointer(str(run.pmp_dir / "checkpoints")) as ckpt:
    assert ckpt.all_steps() == [PMP_STEPS]
  with Checkpointer(str(run.workdir / "checkpoints")) as ckpt:
    assert ckpt.all_steps() == [STEPS]
  assert [r["step"] for r in read_metrics(str(run.pmp_dir))] == list(range(1, PMP_STEPS + 1))
  assert [r["step"] for r in read_metrics(str(run.workdir))] == list(range(1, STEPS + 1))

  pmp_cfg = json.loads((run.pmp_dir / "config.json").read_text())
  main_cfg = json.loads((run.workdir / "config.json").read_text())
  assert pmp_cfg["data"]["path"] == run.pmp_file and pmp_cfg["train"]["steps"] == PMP_STEPS
  assert pmp_cfg["init_from"] == ""
  # 10% of the 160 PMP comparisons held out; the main stage: 10% of the first 200 of harmless-base.
  assert (pmp_cfg["num_train_comparisons"], pmp_cfg["num_eval_comparisons"]) == (144, 16)
  assert main_cfg["init_from"] == str(run.pmp_dir)
  assert main_cfg["data"]["path"] == "" and main_cfg["train"]["steps"] == STEPS
  assert (main_cfg["num_train_comparisons"], main_cfg["num_eval_comparisons"]) == (180, 20)


def test_pmp_stage_learns_its_own_data(run):
  # Held-out PMP comparisons (polite vs curt) are easy: 10 steps separate them.
  last = read_metrics(str(run.pmp_dir))[-1]
  assert last["eval_accuracy"] >= 0.8
  assert last["eval_preference_loss"] < np.log(2)


def test_tokenizer_is_trained_once_and_inherited(run):
  pmp_tok, main_tok = run.pmp_dir / MODEL_FILE, run.workdir / MODEL_FILE
  assert pmp_tok.exists() and main_tok.exists()
  assert pmp_tok.read_bytes() == main_tok.read_bytes()
  # Trained on the PMP file (the first stage): all its made-up syllables are single pieces (one
  # trained on harmless-base has only 4 of the 20: ter, re, ish, um).
  tok = Tokenizer(str(main_tok))
  assert [s for s in SYLLABLES if len(tok.encode(s)) != 1] == []


def test_main_stage_starts_from_pmp_params(run):
  config, model, pmp_params = _model_and_params(run.workdir, run.pmp_dir)
  # A fresh init's scalar head is zero, so without PMP every first score would be 0 and the first
  # loss ln 2; PMP has moved it.
  params_rng = jax.random.split(jax.random.PRNGKey(config.train.seed))[0]  # as loop.initial_state
  fresh = nn.meta.unbox(init_params(model.cfg, params_rng))
  assert np.all(np.asarray(fresh["scalar_head"]) == 0)
  assert np.max(np.abs(pmp_params["scalar_head"])) > 1e-4

  # The first logged step's metrics are those of the params it started from, on its first batch.
  train_recs, _, _ = train_eval_records(config, str(run.workdir))
  first = _batcher(config, run.workdir, train_recs).batch_at(0)
  logged = read_metrics(str(run.workdir))[0]

  score = jax.jit(lambda p: pm.pm_scores(p, model, first)[0])  # one device, no mesh

  def first_metrics(params):
    scores = np.asarray(score(params), np.float64)
    return np.mean(np.logaddexp(0.0, scores[:, 1] - scores[:, 0])), scores.mean()

  loss, mean_score = first_metrics(pmp_params)
  assert logged["loss"] == pytest.approx(loss, abs=1e-5)
  assert logged["mean_score"] == pytest.approx(mean_score, abs=1e-5)
  fresh_loss, fresh_mean_score = first_metrics(fresh)
  assert (fresh_loss, fresh_mean_score) == (pytest.approx(np.log(2)), 0.0)
  assert abs(logged["loss"] - fresh_loss) > 1e-3  # what a run without PMP would have logged
  assert abs(logged["mean_score"] - fresh_mean_score) > 1e-3


# --- (b) evaluation reports -----------------------------------------------------------------------

def test_evaluation_reports_match_recomputed_scores(run):
  config, model, params = _model_and_params(run.workdir)
  _, eval_recs, _ = train_eval_records(config, str(run.workdir))
  assert len(eval_recs) == 20
  scores = _scores(model, params, _batcher(config, run.workdir, eval_recs))

  report = json.loads((run.workdir / "eval_pm.json").read_text())
  acc = report["accuracy"]
  assert set(acc) == {"accuracy", "low", "high", "n"}
  assert acc["n"] == 20
  _assert_accuracy_close(acc["accuracy"], np.mean(scores[:, 0] > scores[:, 1]), scores)
  assert 0.0 <= acc["low"] <= acc["accuracy"] <= acc["high"] <= 1.0
  assert acc["high"] - acc["low"] > 0.3  # 20 comparisons: a wide interval
  # The train loop's last evaluation saw the same held-out comparisons with the same params.
  _assert_accuracy_close(run.last["eval_accuracy"], acc["accuracy"], scores)
  assert report["mean_margin"] == pytest.approx(np.mean(scores[:, 0] - scores[:, 1]), abs=1e-5)
  assert report["ece"] == pytest.approx(cal.calibration(scores[:, 0], scores[:, 1]).ece, abs=_ece_tolerance(scores))

  norm = json.loads((run.workdir / cal.NORMALISATION_FILE).read_text())
  assert norm == report["normalisation"] == cal.load_normalisation(str(run.workdir))
  assert norm["n"] == 40  # both responses of every held-out comparison
  assert norm["mean"] == pytest.approx(np.mean(scores), abs=1e-5)
  assert norm["std"] == pytest.approx(np.std(scores), rel=1e-4)

  table = (run.workdir / "calibration.md").read_text()
  assert f"Expected calibration error: {report['ece']:.4f}" in table
  counts = [int(line.rsplit("|", 2)[1]) for line in table.splitlines() if line.startswith("| 0.")]
  assert len(counts) == 10 and sum(counts) == 40
  assert (run.workdir / "reliability.png").read_bytes()[:8] == PNG


# --- (c) train-PM / test-PM halves ----------------------------------------------------------------

def _train_cli(workdir, *overrides):
  return [sys.executable, "-m", "rlhf_jax", "train_pm", "--config=configs/pm.py:tiny", f"--workdir={workdir}",
          "--config.train.batch_size=8", "--config.train.seq_len=64", "--config.mesh.shape=(1,1,1)",
          "--config.progress_bar=False", *overrides]


def test_halves_train_on_disjoint_halves(run, tmp_path):
  path = _write_comparisons(tmp_path / "halves.jsonl.gz", 52, seed=1)  # 5 held out, 47 to split
  # Both halves at once, from the command line, one device each (logs to files: no pipe to fill).
  procs = {}
  try:
    for half in "ab":
      with open(tmp_path / f"{half}.log", "w") as log:
        procs[half] = subprocess.Popen(
            _train_cli(tmp_path / half, f"--config.data.path={path}", f"--config.data.half={half}",
                       f"--config.tokenizer.path={run.workdir / MODEL_FILE}",  # no need to train another
                       "--config.train.steps=2", "--config.train.eval_every=2",
                       "--config.model.num_layers=1"),  # compiles faster; the split is what is tested
            cwd=ROOT, env=ENV, stdout=log, stderr=subprocess.STDOUT)
    for half, proc in procs.items():
      assert proc.wait(timeout=300) == 0, (tmp_path / f"{half}.log").read_text()[-3000:]
  finally:
    for proc in procs.values():
      if proc.poll() is None:
        proc.kill()

  counts, lines = {}, {}
  for half in "ab":
    saved = json.loads((tmp_path / half / "config.json").read_text())
    assert saved["data"]["half"] == half and saved["num_eval_comparisons"] == 5
    counts[half] = saved["num_train_comparisons"]
    with Checkpointer(str(tmp_path / half / "checkpoints")) as ckpt:
      assert ckpt.all_steps() == [2]
    assert (tmp_path / half / "eval_pm.json").exists()
    config = load_run_config(str(tmp_path / half))
    lines[half] = {r["line"] for r in inputs.comparison_records(config, str(tmp_path / half))[0]}

  full_train, _, _ = train_eval_records(config, str(tmp_path))
  assert len(full_train) == 47
  a, b = split_in_halves(full_train, seed=0)
  assert (counts["a"], counts["b"]) == (len(a), len(b)) == (23, 24)
  assert lines["a"] == {r["line"] for r in a} and lines["b"] == {r["line"] for r in b}
  assert not lines["a"] & lines["b"]
  assert lines["a"] | lines["b"] == {r["line"] for r in full_train}


# --- (d) the eval_pm command line -----------------------------------------------------------------

def _copy_run(run, dst):
  # config.json's init_from still names the original PMP directory (and its tokenizer).
  return shutil.copytree(run.workdir, dst, ignore=shutil.ignore_patterns("tfds", "tb", "pmp"))


def test_eval_pm_command_line_on_another_file(run, tmp_path):
  pm_dir = _copy_run(run, tmp_path / "pm")
  for name in ["eval_pm.json", "calibration.md", "reliability.png", cal.NORMALISATION_FILE]:
    os.remove(os.path.join(pm_dir, name))
  data = _write_comparisons(tmp_path / "other.jsonl.gz", 37, seed=2)  # not a multiple of batch 8
  out = subprocess.run([sys.executable, "-m", "rlhf_jax", "eval_pm", f"--pm_dir={pm_dir}",
                        f"--data_path={data}"], cwd=ROOT, env=ENV, capture_output=True, text=True,
                       timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  report = json.loads((tmp_path / "pm" / "eval_pm.json").read_text())
  assert json.loads(out.stdout) == report
  assert report["accuracy"]["n"] == 37
  assert report["normalisation"]["n"] == 74
  for name in ["calibration.md", "reliability.png", cal.NORMALISATION_FILE]:
    assert (tmp_path / "pm" / name).exists()

  # On one device the PM scores as it does here on eight.
  config, model, params = _model_and_params(run.workdir)
  records, _ = read_comparisons(data)
  scores = _scores(model, params, _batcher(config, run.workdir, records))
  _assert_accuracy_close(report["accuracy"]["accuracy"], np.mean(scores[:, 0] > scores[:, 1]), scores)
  assert report["normalisation"]["mean"] == pytest.approx(np.mean(scores), abs=1e-5)
  assert report["normalisation"]["std"] == pytest.approx(np.std(scores), rel=1e-4)


def test_eval_pm_evaluates_the_whole_file(run, tmp_path):
  pm_dir = _copy_run(run, tmp_path / "pm")
  data = _write_comparisons(tmp_path / "long.jsonl.gz", 230, seed=3)  # the run had max_examples=200
  assert evaluate_pm(str(pm_dir), data)["accuracy"]["n"] == 230
