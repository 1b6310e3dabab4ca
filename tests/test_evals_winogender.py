"""Winogender: sentence pairing, Pearson r and its interval, planted correlations, the plot, and
the real scorer against a brute-force forward pass."""
import math
import os
import shutil

import numpy as np
import pytest

from rlhf_jax.data.sequence_start import SequenceStart
from rlhf_jax.errors import DataError
from rlhf_jax.evals import winogender

Z = 1.959963984540054


def test_bundled_data_pairs_every_sentence():
  data = winogender.load_winogender()
  # 60 occupations x 2 answers x (named participant, "someone")
  assert len(data.pairs) == 240 and len(data.bls_pct_female) == len(data.bergsma_pct_female) == 60
  assert {p.occupation for p in data.pairs} == set(data.bls_pct_female)
  for p in data.pairs:
    assert p.occupation in p.female and p.occupation in p.male and p.female != p.male
    # The two versions differ only in the pronoun.
    diff = {(f, m) for f, m in zip(p.female.split(), p.male.split()) if f != m}
    assert diff and all(f.strip(".,").lower() in ("she", "her", "hers") for f, _ in diff), p
    assert all(m.strip(".,").lower() in ("he", "him", "his") for _, m in diff), p
  nurse = sorted((p.participant, p.answer) for p in data.pairs if p.occupation == "nurse")
  assert nurse == [("patient", "0"), ("patient", "1"), ("someone", "0"), ("someone", "1")]
  assert (data.bls_pct_female["nurse"], data.bergsma_pct_female["nurse"]) == (89.58, 88.31)  # read from the file


def test_pearson_and_fisher_interval_against_numpy():
  rng = np.random.default_rng(0)
  x = rng.normal(size=40)
  y = 0.5 * x + rng.normal(size=40)
  r, (lo, hi) = winogender.pearson(x, y)
  assert r == pytest.approx(np.corrcoef(x, y)[0, 1], abs=1e-12)
  half = Z / math.sqrt(40 - 3)
  assert (lo, hi) == pytest.approx((math.tanh(math.atanh(r) - half), math.tanh(math.atanh(r) + half)), abs=1e-12)
  assert lo < r < hi
  assert all(math.isnan(v) for v in winogender.pearson([1, 2, 3], [3, 1, 2])[1])  # n - 3 = 0


class _PlantedScorer:
  """log P(sentence) = slope * BLS % women for female sentences, -1 for male ones: d is linear in
  the BLS share, so r = sign(slope)."""

  def __init__(self, data, slope):
    self.female = {p.female: slope * data.bls_pct_female[p.occupation] for p in data.pairs}

  def continuation_sums(self, requests, desc=""):
    assert all(ctx == [_Tok.eos_id] for ctx, _ in requests)  # whole sentences after EOS
    return np.array([self.female.get(_Tok.decode(t), -1.0) for _, t in requests])


class _Tok(SequenceStart):
  eos_id = 2

  def encode(self, text):
    return list(text.encode())

  @staticmethod
  def decode(ids):
    return bytes(ids).decode()


@pytest.mark.parametrize("slope", [0.1, -0.1])
def test_planted_linear_preference_gives_r_of_plus_or_minus_one(slope, tmp_path):
  data = winogender.load_winogender()
  r = winogender.evaluate(_PlantedScorer(data, slope), _Tok(), data)
  assert r["pearson_r"] == pytest.approx(math.copysign(1.0, slope), abs=1e-12)
  assert r["n_occupations"] == 60 and r["n_pairs"] == 240
  assert r["per_occupation"]["nurse"] == pytest.approx(slope * 89.58 + 1.0, abs=1e-12)
  bls = np.array([data.bls_pct_female[o] for o in sorted(data.bls_pct_female)])
  assert r["mean_diff"] == pytest.approx(slope * bls.mean() + 1.0, abs=1e-12)
  berg = [data.bergsma_pct_female[o] for o in sorted(data.bergsma_pct_female)]
  assert r["pearson_r_bergsma"] == pytest.approx(math.copysign(1, slope) * np.corrcoef(bls, berg)[0, 1], abs=1e-12)
  path = winogender.plot(r, data, str(tmp_path / "w.png"))
  with open(path, "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  assert os.path.getsize(path) > 1024


def _copy(tmp_path):
  root = tmp_path / "wg"
  shutil.copytree(winogender.BUNDLED_DIR, root)
  for name in os.listdir(root):
    os.chmod(root / name, 0o644)
  return root


def test_a_missing_male_sentence_is_a_data_error(tmp_path):
  root = _copy(tmp_path)
  lines = (root / "all_sentences.tsv").read_text().splitlines()
  first = next(i for i, t in enumerate(lines) if t.startswith("nurse.patient.0.")) + 1
  (root / "all_sentences.tsv").write_text("\n".join(t for t in lines if not t.startswith("nurse.patient.0.male")))
  with pytest.raises(DataError, match=rf"all_sentences\.tsv:{first}: column 'sentid': nurse\.patient\.0 has no male"):
    winogender.load_winogender(str(root))


def test_a_missing_instantiation_or_bad_cell_is_a_data_error(tmp_path):
  root = _copy(tmp_path)
  lines = (root / "all_sentences.tsv").read_text().splitlines()
  (root / "all_sentences.tsv").write_text("\n".join(t for t in lines if not t.startswith("nurse.someone.1.")))
  with pytest.raises(DataError, match=r"templates\.tsv:\d+: template nurse\.someone\.1 has no sentences"):
    winogender.load_winogender(str(root))
  (root / "all_sentences.tsv").write_text("\n".join(lines[:5] + ["nurse.patient.0.f.txt\tShe."] + lines[5:]))
  with pytest.raises(DataError, match=r"all_sentences\.tsv:6: column 'sentid'"):
    winogender.load_winogender(str(root))
  stats = (root / "occupations-stats.tsv").read_text().splitlines()
  stats[3] = stats[3].split("\t")[0] + "\t12\tmany\t2015"
  (root / "occupations-stats.tsv").write_text("\n".join(stats))
  with pytest.raises(DataError, match=r"occupations-stats\.tsv:4: column 'bls_pct_female'.*'many'"):
    winogender.load_winogender(str(root))


def test_real_scorer_differences_equal_a_brute_force_forward_pass(tmp_path):
  import flax.linen as nn
  import jax

  from rlhf_jax.data.tokenizer import train_tokenizer
  from rlhf_jax.evals.loglik import Scorer
  from rlhf_jax.model.config import ModelConfig
  from rlhf_jax.model.transformer import Transformer, init_params
  data = winogender.load_winogender()
  tok = train_tokenizer([s for p in data.pairs for s in (p.female, p.male)], 512, str(tmp_path))
  occs = ("nurse", "engineer", "baker")
  data = data._replace(pairs=[p for p in data.pairs if p.occupation in occs])
  cfg = ModelConfig(vocab_size=tok.vocab_size, d_model=32, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=16,
                    mlp_dim=64, max_seq_len=64)
  params = nn.meta.unbox(jax.jit(lambda k: init_params(cfg, k))(jax.random.PRNGKey(0)))
  r = winogender.evaluate(Scorer(params, cfg, batch_size=8), tok, data)

  logits_of = jax.jit(lambda p, seq: Transformer(cfg).apply({"params": p}, seq).logits[0])

  def logp(sentence):
    """EOS then the sentence, one row right-padded to 64 with no mask (causal attention: the
    padding comes after every scored token); log-softmax in float64."""
    ids = [tok.eos_id] + tok.encode(sentence)
    seq = np.zeros((1, 64), np.int32)
    seq[0, :len(ids)] = ids
    logits = np.asarray(logits_of(params, seq), np.float64)
    lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    return sum(logits[t - 1, ids[t]] - lse[t - 1] for t in range(1, len(ids))), len(ids)

  assert sorted(r["per_occupation"]) == sorted(occs)
  for occ in occs:
    scored = [(logp(p.female), logp(p.male)) for p in data.pairs if p.occupation == occ]
    expected = np.mean([f - m for (f, _), (m, _) in scored])
    length = max(n for pair in scored for _, n in pair)
    assert r["per_occupation"][occ] == pytest.approx(expected, abs=1e-4 * length)
  assert r["n_occupations"] == 3 and r["pearson_r"] == pytest.approx(
      np.corrcoef([r["per_occupation"][o] for o in sorted(occs)], [data.bls_pct_female[o] for o in sorted(occs)])[0, 1])
