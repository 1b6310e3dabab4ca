"""OOD detection: distances against numpy references, AUROC against brute force and analytic values."""
import gzip
import json
import math

import numpy as np
import pytest

from rlhf_jax.data.sequence_start import SequenceStart
from rlhf_jax.errors import DataError
from rlhf_jax.evals import ood


def _gaussians(seed=0, d=6, n=400):
  rng = np.random.default_rng(seed)
  a = rng.normal(size=(d, d))
  return rng.normal(size=(n, d)) @ a.T + rng.normal(size=d), a @ a.T + np.eye(d)


def test_mahalanobis_and_relative_match_an_inverse_based_loop():
  x, _ = _gaussians()
  mean, cov = ood.fit_gaussian(x[:300], ridge_rel=0.0)
  np.testing.assert_allclose(mean, x[:300].mean(0), rtol=1e-12)
  np.testing.assert_allclose(cov, np.cov(x[:300].T, bias=True), rtol=1e-10)
  bg_mean, bg_cov = ood.fit_gaussian(x, ridge_rel=0.0)
  inv, bg_inv = np.linalg.inv(cov), np.linalg.inv(bg_cov)
  ref = np.array([(v - mean) @ inv @ (v - mean) for v in x[300:]])
  ref_bg = np.array([(v - bg_mean) @ bg_inv @ (v - bg_mean) for v in x[300:]])
  np.testing.assert_allclose(ood.mahalanobis(x[300:], mean, cov), ref, rtol=1e-8)
  np.testing.assert_allclose(ood.relative_mahalanobis(x[300:], mean, cov, bg_mean, bg_cov), ref - ref_bg,
                             rtol=1e-7, atol=1e-9)


def test_auroc_equals_the_pairwise_count_with_ties_half():
  rng = np.random.default_rng(1)
  a = rng.integers(0, 5, 60).astype(float)  # many ties
  b = rng.integers(1, 7, 45).astype(float)
  brute = np.mean([[1.0 if y > x else 0.5 if y == x else 0.0 for y in b] for x in a])
  assert ood.auroc(a, b) == pytest.approx(brute, abs=1e-12)
  assert ood.auroc([0, 1], [2, 3]) == 1.0 and ood.auroc([2, 3], [0, 1]) == 0.0


@pytest.mark.parametrize("delta", [0.5, 1.0])
def test_auroc_of_shifted_gaussians_is_phi_of_delta_over_root_two(delta):
  rng = np.random.default_rng(2)
  a, b = rng.normal(size=4000), rng.normal(delta, 1.0, size=4000)
  analytic = 0.5 * (1 + math.erf(delta / 2))  # Phi(delta / sqrt 2)
  got = ood.auroc(a, b)
  # Hanley-McNeil standard error of an AUROC from n = m = 4000 (about 0.005 here)
  q1, q2 = analytic / (2 - analytic), 2 * analytic ** 2 / (1 + analytic)
  se = math.sqrt((analytic * (1 - analytic) + 3999 * (q1 - analytic ** 2) + 3999 * (q2 - analytic ** 2)) / 4000 ** 2)
  assert got == pytest.approx(analytic, abs=4 * se)
  lo, hi = ood.auroc_ci(a, b, reps=300, seed=0)
  assert lo < got < hi and (hi - lo) == pytest.approx(2 * 1.96 * se, rel=0.25)  # the bootstrap's width


def test_outlier_exposure_raises_auroc():
  # In-distribution N(0, I) in 16 dims; outliers shifted by 1.5 along one axis. Their squared
  # distance grows by 2.25 against a chi-square(16) spread of sd ~5.7: plain Mahalanobis is weak
  # (AUROC ~0.6). With k known outliers the score is a projection onto their mean, whose noise has
  # norm sqrt(16 / k): cos = 1.5 / sqrt(2.25 + 16 / k), AUROC = Phi(1.5 cos / sqrt 2), about 0.79
  # at k = 10 and 0.85 at k = 100.
  rng = np.random.default_rng(3)
  d = 16
  shift = np.zeros(d)
  shift[0] = 1.5
  train, test_in = rng.normal(size=(2000, d)), rng.normal(size=(500, d))
  test_out, pool = rng.normal(size=(500, d)) + shift, rng.normal(size=(100, d)) + shift
  r = ood.detect(train, test_in, test_out, pool, ks=(0, 10, 100, 200), seed=0)
  plain, k10, k100 = (r["outlier_exposure"][k]["auroc"] for k in ("0", "10", "100"))
  assert plain < 0.66 and plain == r["auroc_mahalanobis"]
  phi = lambda z: 0.5 * (1 + math.erf(z / math.sqrt(2)))
  cos = 1.5 / math.sqrt(2.25 + d / 100)
  assert k100 == pytest.approx(phi(1.5 * cos / math.sqrt(2)), abs=0.04)  # ~3 sds of 500 + 500 test points
  # Ten outliers' mean direction varies a lot between draws (AUROC 0.70 to 0.82 seen): only the gain is asserted.
  assert k10 > plain + 0.05 and k100 > plain + 0.15
  assert r["outlier_exposure"]["200"] == {"skipped": "only 100 known outliers available"}


def test_ridge_keeps_scores_finite_with_more_features_than_prompts():
  rng = np.random.default_rng(4)
  train = rng.normal(size=(10, 50))
  mean, cov = ood.fit_gaussian(train)
  assert np.all(np.isfinite(ood.mahalanobis(rng.normal(size=(5, 50)), mean, cov)))


def test_prompt_files_of_both_kinds_and_a_malformed_line(tmp_path):
  prompts = tmp_path / "p.jsonl"
  prompts.write_text(json.dumps({"prompt": "\n\nHuman: hi\n\nAssistant:"}) + "\n")
  assert ood.load_prompt_texts(str(prompts)) == ["\n\nHuman: hi\n\nAssistant:"]
  comparisons = tmp_path / "c.jsonl.gz"
  with gzip.open(comparisons, "wt") as f:
    for q in ("Where is Paris?", "How do I bake bread?"):
      f.write(json.dumps({"chosen": f"\n\nHuman: {q}\n\nAssistant: a", "rejected": f"\n\nHuman: {q}\n\nAssistant: b"}) + "\n")
  assert ood.load_prompt_texts(str(comparisons), max_prompts=1) == ["\n\nHuman: Where is Paris?\n\nAssistant:"]
  bad = tmp_path / "bad.jsonl"
  bad.write_text(json.dumps({"prompt": "ok"}) + "\n" + json.dumps({"prompt": 3}) + "\n")
  with pytest.raises(ValueError, match=r"bad\.jsonl, line 2, field 'prompt'"):
    ood.load_prompt_texts(str(bad))
  other = tmp_path / "other.jsonl"
  other.write_text(json.dumps({"text": "x"}) + "\n")
  with pytest.raises(DataError, match=r"other\.jsonl:1: expected"):
    ood.load_prompt_texts(str(other))


class _FeatureScorer:
  """mean_activations = a fixed function of the tokens (so features are known in advance)."""

  def mean_activations(self, token_lists, layer=-1, desc=""):
    return np.array([[len(t), sum(t) % 7, t[0] % 5] for t in token_lists], np.float64)


class _Tok(SequenceStart):
  def encode(self, text):
    return [ord(c) for c in text]


def test_evaluate_splits_prompts_and_equals_detect_on_the_same_features():
  inside = [f"question number {i}" for i in range(30)]
  outside = [f"a harmful request of kind {i} !!" for i in range(24)]
  r = ood.evaluate(_FeatureScorer(), _Tok(), inside, outside, ks=(0, 1, 10), seed=5)
  assert (r["n_train_in"], r["n_test_in"], r["n_outlier_pool"], r["n_test_out"]) == (15, 15, 10, 14)
  feats_in = _FeatureScorer().mean_activations([_Tok().encode(p) for p in inside])
  feats_out = _FeatureScorer().mean_activations([_Tok().encode(p) for p in outside])
  rng = np.random.default_rng(5)
  o_in, o_out = rng.permutation(30), rng.permutation(24)
  ref = ood.detect(feats_in[np.sort(o_in[:15])], feats_in[np.sort(o_in[15:])], feats_out[np.sort(o_out[10:])],
                   feats_out[np.sort(o_out[:10])], (0, 1, 10), 5)
  assert r["auroc_mahalanobis"] == ref["auroc_mahalanobis"] and r["outlier_exposure"] == ref["outlier_exposure"]
  with pytest.raises(ValueError, match="too few prompts"):
    ood.evaluate(_FeatureScorer(), _Tok(), inside[:3], outside, ks=(0,))
