"""Winogender: sentence pairing, Pearson r and its interval, planted correlations, the plot."""
import math
import os
import shutil

import numpy as np
import pytest

from rlhf_jax.errors import DataError
from rlhf_jax.evals import winogender


def test_bundled_data_pairs_every_sentence():
  data = winogender.load_winogender()
  assert len(data.pairs) == 240 and len(data.bls_pct_female) == 60  # 60 occupations x 2 participants x 2 answers
  for occ, female, male in data.pairs:
    assert female != male and occ in female.lower() and occ in male.lower()
  nurse = [p for p in data.pairs if p[0] == "nurse"]
  assert len(nurse) == 4 and all(" she " in f" {f} " or " her " in f" {f} " for _, f, _ in nurse)


def test_pearson_and_fisher_interval_against_numpy():
  rng = np.random.default_rng(0)
  x = rng.normal(size=40)
  y = 0.5 * x + rng.normal(size=40)
  r, (lo, hi) = winogender.pearson(x, y)
  assert r == pytest.approx(np.corrcoef(x, y)[0, 1], abs=1e-12)
  half = 1.959963984540054 / math.sqrt(37)
  assert (lo, hi) == pytest.approx((math.tanh(math.atanh(r) - half), math.tanh(math.atanh(r) + half)), abs=1e-12)


class _PlantedScorer:
  """log P(sentence) = sign * (% women) / 10 for female sentences, 0 for male ones."""

  def __init__(self, data, sign):
    self.female = {f: sign * data.bls_pct_female[occ] / 10 for occ, f, _ in data.pairs}

  def continuation_sums(self, requests, desc=""):
    return np.array([self.female.get(bytes(t).decode(), 0.0) for _, t in requests])


class _Tok:
  eos_id = 2

  def encode(self, text):
    return list(text.encode())


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_planted_linear_preference_gives_r_of_plus_or_minus_one(sign, tmp_path):
  data = winogender.load_winogender()
  r = winogender.evaluate(_PlantedScorer(data, sign), _Tok(), data)
  assert r["pearson_r"] == pytest.approx(sign, abs=1e-12) and r["n_occupations"] == 60
  assert r["per_occupation"]["nurse"] == pytest.approx(sign * data.bls_pct_female["nurse"] / 10, abs=1e-12)
  path = winogender.plot(r, data, str(tmp_path / "w.png"))
  assert os.path.getsize(path) > 1000


def test_a_missing_male_sentence_or_bad_number_is_a_data_error(tmp_path):
  root = tmp_path / "wg"
  shutil.copytree(winogender.BUNDLED_DIR, root)
  lines = (root / "all_sentences.tsv").read_text().splitlines()
  (root / "all_sentences.tsv").write_text("\n".join(l for l in lines if not l.startswith("nurse.patient.0.male")) + "\n")
  with pytest.raises(DataError, match=r"all_sentences\.tsv: sentence nurse\.patient\.0 lacks its male version"):
    winogender.load_winogender(str(root))
  stats = (root / "occupations-stats.tsv").read_text().splitlines()
  stats[3] = stats[3].split("\t")[0] + "\tmany\t1\t2015"
  (root / "occupations-stats.tsv").write_text("\n".join(stats) + "\n")
  with pytest.raises(DataError, match=r"occupations-stats\.tsv:4: column"):
    winogender.load_winogender(str(root))


def test_real_model_differences_equal_separate_sentence_scores(tmp_path):
  import flax.linen as nn
  import jax

  from rlhf_jax.evals.loglik import Scorer, encode_requests
  from rlhf_jax.model import init_params
  from rlhf_jax.model_config import ModelConfig
  from rlhf_jax.tokenizer import train_tokenizer
  data = winogender.load_winogender()
  data = data._replace(pairs=[p for p in data.pairs if p[0] in ("nurse", "engineer", "baker", "doctor")])
  tok = train_tokenizer([s for _, f, m in data.pairs for s in (f, m)] * 30, 300, str(tmp_path))
  cfg = ModelConfig(vocab_size=tok.vocab_size, d_model=32, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=16,
                    mlp_dim=64)
  scorer = Scorer(nn.meta.unbox(init_params(cfg, jax.random.PRNGKey(2))), cfg, batch_size=8)
  r = winogender.evaluate(scorer, tok, data)
  for occ in ("nurse", "doctor"):
    pairs = [p for p in data.pairs if p[0] == occ]
    diffs = [np.diff(scorer.continuation_sums(encode_requests(tok, ["", ""], [m, f])))[0] for _, f, m in pairs]
    assert r["per_occupation"][occ] == pytest.approx(np.mean(diffs), abs=1e-9)
