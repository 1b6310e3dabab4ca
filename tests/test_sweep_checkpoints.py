"""Sweep sizes that are checkpoints (models.<size> = {"from": "hf:DIR" | "gguf:FILE"}): the plan,
its refusals, the content hash, and one micro sweep of the tiny Qwen fixtures (tests/fixtures/hf:
qwen3 as size xs, qwen2 as gold; two families with one tokenizer) from import to results.jsonl.
"""
import hashlib
import json
import os
import shutil

import pytest
from conftest import micro_sweep_config

from rlhf_jax.analysis.results import load_results
from rlhf_jax.errors import ConfigError
from rlhf_jax.experiments import stage_configs, sweep
from rlhf_jax.hf import config as hf_config
from rlhf_jax.hf import runs
from rlhf_jax.model.config import param_counts

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "hf")


def _config(xs, gold, **changes):
  """The micro sweep with PPO only and no evaluation suites (the stages a checkpoint changes)."""
  return micro_sweep_config(models={"xs": xs, "gold": gold}, methods=("ppo",), evals={"suites": ""}, **changes)


def _ref(name):
  return f"hf:{os.path.join(FIXTURES, name)}"


def _flip_weight_byte(path):
  """Changes one byte of a safetensors file's tensor data (past its header), keeping its size."""
  with open(path, "r+b") as f:
    header = int.from_bytes(f.read(8), "little")
    f.seek(8 + header + 5)
    byte = f.read(1)
    f.seek(8 + header + 5)
    f.write(bytes([byte[0] ^ 0x01]))


def test_checkpoint_sizes_are_imported_not_pretrained(tmp_path):
  w = str(tmp_path)
  c = _config({"from": _ref("qwen3")}, {"from": _ref("qwen2")})
  plan = {s.name: s for s in sweep.plan(c, w)}
  assert list(plan) == ["lm_xs", "lm_gold", "sft_xs", "pm_gold", "labels_xs", "pm_xs", "ppo_xs", "bon_xs"]
  for name, fixture in (("xs", "qwen3"), ("gold", "qwen2")):
    stage = plan[f"lm_{name}"]
    model = hf_config.model_config(os.path.join(FIXTURES, fixture))
    assert stage.inputs == () and stage.settings == {
        "source": _ref(fixture), "source_hash": runs.content_hash(_ref(fixture)), "model": model.to_dict()}
    assert stage_configs.model_config(c, name) == model
  # Everything downstream reads lm_<size> as it reads a pretrained LM, with the checkpoint's tokenizer.
  sft, pm = stage_configs.sft_config(c, w, "xs"), stage_configs.pm_config(c, w, "gold")
  assert (sft.init_from, sft.tokenizer.path, plan["sft_xs"].inputs) == (os.path.join(w, "lm_xs"), "", ("lm_xs",))
  assert pm.init_from == os.path.join(w, "lm_gold") and sft.model.to_dict() == plan["lm_xs"].settings["model"]
  assert "lm_xs" in plan["pm_xs"].inputs
  # Runtime fields: the entry's, else the base preset's (how every size of the sweep computes).
  c = _config({"from": _ref("qwen3"), "scan_layers": True, "remat": "dots"}, {"from": _ref("qwen2")})
  cfg = stage_configs.model_config(c, "xs")
  assert (cfg.scan_layers, cfg.remat, cfg.d_model) == (True, "dots", 64)
  assert sweep.plan(c, w)[0].settings["model"]["scan_layers"] is True


@pytest.mark.parametrize("xs,gold,message", [
    ({"from": _ref("qwen3")}, {"from": _ref("smollm2")},
     r"^sizes 'xs' \(hf:.*qwen3\) and 'gold' \(hf:.*smollm2\) have different tokenizers"),
    ({"from": _ref("qwen3")}, {"d_model": 64, "num_layers": 1, "num_heads": 4, "head_dim": 16, "vocab_size": 384},
     r"^sizes \['xs'\] are checkpoints but \['gold'\] are pretrained here"),
    ({"from": _ref("qwen3"), "d_model": 128}, {"from": _ref("qwen2")},
     r"^models\.xs: \['d_model'\] beside 'from': a checkpoint's model is its own; only runtime fields"),
    ({"from": _ref("qwen3"), "preset": "tiny"}, {"from": _ref("qwen2")}, r"^models\.xs: \['preset'\] beside"),
    ({"from": os.path.join(FIXTURES, "qwen3")}, {"from": _ref("qwen2")},
     r"^models\.xs\.from='.*qwen3': expected 'hf:DIR' or 'gguf:FILE'"),
    ({"from": _ref("qwen3")}, {"from": _ref("nowhere")}, r"^hf:.*nowhere: .*nowhere does not exist"),
])
def test_checkpoint_sizes_are_checked_before_anything_runs(tmp_path, xs, gold, message):
  with pytest.raises(ConfigError, match=message) as e:
    sweep.plan(_config(xs, gold), str(tmp_path))
  assert "\n" not in str(e.value)
  assert not os.listdir(tmp_path)


def test_content_hash_is_of_the_contents_not_the_path_or_time(tmp_path):
  copy = str(tmp_path / "qwen3")
  shutil.copytree(os.path.join(FIXTURES, "qwen3"), copy)
  ref = f"hf:{copy}"
  assert runs.content_hash(ref) == runs.content_hash(_ref("qwen3"))
  os.utime(os.path.join(copy, "config.json"), ns=(1, 1))
  assert runs.content_hash(ref) == runs.content_hash(_ref("qwen3"))
  _flip_weight_byte(os.path.join(copy, "model.safetensors"))
  assert runs.content_hash(ref) != runs.content_hash(_ref("qwen3"))
  _flip_weight_byte(os.path.join(copy, "model.safetensors"))
  assert runs.content_hash(ref) == runs.content_hash(_ref("qwen3"))
  with open(os.path.join(copy, "tokenizer_config.json"), "a") as f:
    f.write(" ")  # a tokenizer file is part of the checkpoint too
  assert runs.content_hash(ref) != runs.content_hash(_ref("qwen3"))


def test_gguf_sizes_take_their_model_and_hash_from_the_file(tmp_path):
  pytest.importorskip("gguf")
  from test_gguf import SMOLLM2, write_gguf
  path = write_gguf(tmp_path / "smollm2.gguf")
  ref = f"gguf:{path}"
  plan = sweep.plan(_config({"from": ref}, {"from": ref}), str(tmp_path / "sweep"))
  with open(path, "rb") as f:
    digest = hashlib.sha256(f.read()).hexdigest()
  assert [s.name for s in plan[:3]] == ["lm_xs", "lm_gold", "sft_xs"]
  assert plan[0].settings == {"source": ref, "source_hash": digest,
                              "model": hf_config.model_config(SMOLLM2).to_dict()}
  with pytest.raises(ConfigError, match=r"^sizes 'xs' \(gguf:.*\) and 'gold' \(hf:.*qwen3\) have different"):
    sweep.plan(_config({"from": ref}, {"from": _ref("qwen3")}), str(tmp_path / "sweep"))


@pytest.fixture(scope="module")
def checkpoint_sweep(tmp_path_factory):
  """A micro sweep whose size xs is a copy of the qwen3 fixture (which a test edits) and whose gold
  size is the qwen2 fixture, run once for this module: (config, workdir, the copy)."""
  root = tmp_path_factory.mktemp("checkpoint_sweep")
  copy = str(root / "qwen3")
  shutil.copytree(os.path.join(FIXTURES, "qwen3"), copy)
  config, workdir = _config({"from": f"hf:{copy}"}, {"from": _ref("qwen2")}), str(root / "sweep")
  sweep.run_sweep(config, workdir)
  return config, workdir, copy


def test_checkpoint_sweep_runs_to_results_with_their_source(checkpoint_sweep):
  config, workdir, copy = checkpoint_sweep
  rows = load_results(workdir)
  ppo = [r for r in rows if r["method"] == "ppo"]
  bon = [r for r in rows if r["method"] == "bon"]
  assert [r["step"] for r in ppo] == [0, 2, 4] and [r["step"] for r in bon] == [1, 2, 4]
  params = param_counts(hf_config.model_config(copy))["non_embedding"]
  for r in rows:
    assert (r["size"], r["params"], r["source"], r["source_hash"]) == (
        "xs", params, f"hf:{copy}", runs.content_hash(_ref("qwen3")))
  assert not os.path.exists(os.path.join(workdir, "tokenizer"))  # no tokenizer trained on the corpus
  with open(os.path.join(workdir, "lm_xs", runs.HF_SUBDIR, runs.RECORD)) as f:
    assert json.load(f)["source"] == copy
  with open(os.path.join(FIXTURES, "qwen3", "tokenizer.json"), "rb") as f:
    tokenizer = f.read()
  for stage in ("sft_xs", "pm_gold"):  # the policy's and the gold PM's tokenizer is the checkpoints'
    with open(os.path.join(workdir, stage, "tokenizer.json"), "rb") as f:
      assert f.read() == tokenizer, stage
  for stage, lm in (("sft_xs", "lm_xs"), ("pm_gold", "lm_gold"), ("pm_xs", "lm_xs")):
    with open(os.path.join(workdir, stage, "config.json")) as f:
      assert json.load(f)["init_from"] == os.path.join(workdir, lm)


def test_checkpoint_sweep_resumes_and_refuses_an_edited_checkpoint(checkpoint_sweep, capsys):
  config, workdir, copy = checkpoint_sweep
  capsys.readouterr()
  sweep.run_sweep(config, workdir)
  assert capsys.readouterr().out.count("skipped") == len(sweep.plan(config, workdir)) == 8
  weights = os.path.join(copy, "model.safetensors")
  _flip_weight_byte(weights)
  try:
    with pytest.raises(ConfigError, match=r"stage lm_xs finished with other settings: source_hash \w+ -> \w+;"):
      sweep.run_sweep(config, workdir)
  finally:
    _flip_weight_byte(weights)


def test_label_budgets_vary_by_size_and_name_only_sizes(tmp_path):
  c = micro_sweep_config()
  c.sizes = ("xs", "s")
  stages = {s.name: s for s in sweep.plan(c, str(tmp_path))}
  unchanged = stages["labels_xs"].settings["labels"]
  assert unchanged == c.labels.to_dict()  # without budgets a sweep's stage settings are as before
  c.labels.budgets = {"xs": 16, "s": 48}
  stages = {s.name: s for s in sweep.plan(c, str(tmp_path))}
  assert [stages[f"labels_{n}"].settings["labels"]["num_pairs"] for n in ("xs", "s")] == [16, 48]
  c.labels.budgets = {"xs": 16, "m": 8}
  with pytest.raises(ConfigError, match=r"labels.budgets names \['m'\], which are not sizes"):
    sweep.plan(c, str(tmp_path))
  c.labels.budgets = {"xs": 0}
  with pytest.raises(ConfigError, match="positive number of pairs"):
    sweep.plan(c, str(tmp_path))
