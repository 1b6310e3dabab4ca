"""HuggingFace checkpoints in and out (rlhf_jax.hf), against a fixture made by transformers itself.

tests/fixtures/hf/make_fixture.py built tiny random Llama (untied, GQA, sharded files), Mistral
(tied, bfloat16) and Gemma models with SentencePiece tokenizers, and Llama 3 (rotary scaling
"llama3"), SmolLM2 (tied Llama), Qwen2 (q/k/v biases) and Qwen3 (q/k norms, bfloat16) models with
byte-level BPE tokenizer.json files, with transformers, and stored their logits on fixed tokens
(expected.json). Here: our logits equal those; import / export round trips are exact; a load onto
8 devices equals a single-device one; mistakes are one clear error; the tokenizer's ids; and
init_from=hf:DIR through the LM and PM trainers.
"""
import json
import os
import shutil
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from conftest import small_run_config
from flax import traverse_util

from rlhf_jax.data.json_tokenizer import JsonTokenizer
from rlhf_jax.data.tokenizer import MODEL_FILE, SPECIALS_FILE, Tokenizer, load_tokenizer
from rlhf_jax.errors import ConfigError
from rlhf_jax.hf import config as hf_config
from rlhf_jax.hf import runs, tensor_files, weights
from rlhf_jax.hf.export_model import export_run
from rlhf_jax.model.config import ModelConfig, param_counts
from rlhf_jax.model.transformer import Transformer, init_params
from rlhf_jax.objectives import lm
from rlhf_jax.trainers import config_checks
from rlhf_jax.training import loop
from rlhf_jax.training import sharding as shd
from rlhf_jax.training.metrics import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = os.path.join(ROOT, "tests", "fixtures", "hf")
MODELS = ("llama", "mistral", "gemma")  # with tokenizer.model (SentencePiece)
BPE_MODELS = ("llama3", "smollm2", "qwen2", "qwen3")  # with tokenizer.json only (byte-level BPE)
sys.path.insert(0, ROOT)
from configs import lm as lm_config  # noqa: E402
from configs import pm as pm_config  # noqa: E402

with open(os.path.join(FIXTURE, "expected.json"), encoding="utf-8") as _f:
  EXPECTED = json.load(_f)


def _logits(name, cfg, params):
  return np.asarray(Transformer(cfg).apply({"params": params}, jnp.asarray(EXPECTED["tokens"])).logits)


def _flat(params):
  return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(params).items()}


@pytest.fixture(scope="module")
def mesh():
  return shd.make_mesh((1, -1, 1))  # FSDP over the session's 8 fake devices


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))  # the prepared hh-rlhf sample, shared by the trainers


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
  """Each fixture model imported as a run directory once, when a test first asks for it."""
  return _Imports(tmp_path_factory.mktemp("imported"))


class _Imports(dict):
  def __init__(self, root):
    super().__init__()
    self.root = root

  def __missing__(self, name):
    self[name] = runs.import_model(os.path.join(FIXTURE, name), str(self.root / name))
    return self[name]


def _load(name, mesh):
  cfg = hf_config.model_config(os.path.join(FIXTURE, name))
  return cfg, weights.load_params(os.path.join(FIXTURE, name), cfg, mesh)


@pytest.mark.parametrize("name", MODELS + BPE_MODELS)
def test_logits_equal_transformers(name, mesh):
  # The tolerance: expected.json rounds to 1e-6, and float32 sums in another order (torch's CPU
  # kernels vs XLA's) differ by a few units of 2^-24 of the terms' magnitudes, compounded over
  # ~10 matmuls and norms of width <= 128 with logits of order 1-6: a bound of ~4e-5, 2.5e-6
  # measured. Every convention slip tried (below and test_parity_notices_a_missing_feature)
  # moves the logits by more than 1e-2, a hundred times the tolerance.
  cfg, params = _load(name, mesh)
  np.testing.assert_allclose(_logits(name, cfg, params), np.array(EXPECTED[name]["logits"]), atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", BPE_MODELS)
def test_imported_run_computes_the_same_logits(name, imported, mesh):
  # The run directory hf:DIR becomes keeps the new ModelConfig fields (rotary scaling, biases,
  # q/k norms) in its config.json: what every trainer reads back.
  from rlhf_jax.training.saved_runs import load_policy
  policy = load_policy(imported[name], mesh)
  assert policy.model.cfg == hf_config.model_config(os.path.join(FIXTURE, name))
  np.testing.assert_allclose(_logits(name, policy.model.cfg, policy.params), np.array(EXPECTED[name]["logits"]),
                             atol=1e-4, rtol=0)


def _zero_biases(params):
  return jax.tree_util.tree_map_with_path(
      lambda path, x: x * 0 if jax.tree_util.keystr(path).endswith(("['bq']", "['bk']", "['bv']")) else x, params)


@pytest.mark.parametrize("name,changes,edit", [
    ("llama3", {"rope_scaling": "none"}, None),  # Llama 3.1's rotary scaling ignored
    ("llama3", {"rope_scaling": "linear"}, None),  # every frequency divided, not only the low ones
    ("llama3", {"rope_high_freq_factor": 2.0}, None),  # only the one smoothed frequency moves
    ("qwen2", {}, _zero_biases),  # Qwen2 without its q/k/v biases
    ("qwen3", {"qk_norm": False}, None),  # Qwen3 without its q/k norms
])
def test_parity_notices_a_missing_feature(name, changes, edit, mesh):
  cfg, params = _load(name, mesh)
  wrong = cfg.__class__(**dict(cfg.to_dict(), **changes))
  params = edit(params) if edit else params
  assert np.abs(_logits(name, wrong, params) - np.array(EXPECTED[name]["logits"])).max() > 1e-2


def test_parity_notices_a_wrong_convention(mesh):
  # The check above can fail: Meta's interleaved rotary layout, or Gemma without its (1 + w) norm
  # gain, moves the logits far past the tolerance.
  cfg = hf_config.model_config(os.path.join(FIXTURE, "llama"))
  params = weights.load_params(os.path.join(FIXTURE, "llama"), cfg, mesh)
  interleave = lambda w: w.reshape(w.shape[:-1] + (2, -1)).swapaxes(-1, -2).reshape(w.shape)
  for layer in ("layer_0", "layer_1"):
    for key in ("wq", "wk"):
      params[layer]["attn"][key] = interleave(params[layer]["attn"][key])
  assert np.abs(_logits("llama", cfg, params) - np.array(EXPECTED["llama"]["logits"])).max() > 1e-2
  gemma = hf_config.model_config(os.path.join(FIXTURE, "gemma"))
  params = weights.load_params(os.path.join(FIXTURE, "gemma"), gemma, mesh)
  no_offset = gemma.__class__(**dict(gemma.to_dict(), norm_offset=0.0))
  assert np.abs(_logits("gemma", no_offset, params) - np.array(EXPECTED["gemma"]["logits"])).max() > 1e-2


def test_model_configs():
  llama = hf_config.model_config(os.path.join(FIXTURE, "llama"))
  assert (llama.d_model, llama.num_heads, llama.num_kv_heads, llama.head_dim, llama.mlp_dim) == (64, 4, 2, 32, 96)
  assert (llama.rope_theta, llama.norm_eps, llama.tie_embeddings, llama.max_seq_len) == (500000.0, 1e-5, False, 256)
  gemma = hf_config.model_config(os.path.join(FIXTURE, "gemma"), {"scan_layers": True, "dtype": "bfloat16"})
  assert (gemma.mlp_activation, gemma.scale_embeddings, gemma.norm_offset, gemma.tie_embeddings) == (
      "gelu_tanh", True, 1.0, True)
  assert gemma.scan_layers and gemma.dtype == "bfloat16"
  new = {name: hf_config.model_config(os.path.join(FIXTURE, name)) for name in BPE_MODELS}
  assert (new["llama3"].rope_scaling, new["llama3"].rope_factor, new["llama3"].rope_low_freq_factor,
          new["llama3"].rope_high_freq_factor, new["llama3"].rope_original_max_len) == ("llama3", 8.0, 1.0, 4.0, 64)
  assert (new["smollm2"].tie_embeddings, new["smollm2"].rope_scaling, new["smollm2"].rope_theta) == (True, "none", 1e5)
  assert (new["qwen2"].qkv_bias, new["qwen2"].qk_norm, new["qwen2"].head_dim, new["qwen2"].tie_embeddings) == (
      True, False, 16, False)
  assert (new["qwen3"].qkv_bias, new["qwen3"].qk_norm, new["qwen3"].head_dim, new["qwen3"].tie_embeddings) == (
      False, True, 32, True)
  for cfg in (llama, gemma, *new.values()):  # the analytic counts hold, biases and q/k norms included
    shapes = jax.eval_shape(lambda r: nn.meta.unbox(init_params(cfg, r)), jax.random.PRNGKey(0))
    assert param_counts(cfg)["total"] == sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
  with pytest.raises(ValueError, match="mlp_activation='relu'"):
    ModelConfig(mlp_activation="relu")


def test_config_json_of_each_family_reads_back_and_matches_the_fixture(tmp_path):
  # What hf_export writes for a model with no source config.json. transformers itself loads these
  # (checked once with the fixtures' scratch environment: the same logits, to expected.json's 1e-6
  # rounding); here, field by field against the config.json transformers saved.
  for name in MODELS + BPE_MODELS:
    cfg = hf_config.model_config(os.path.join(FIXTURE, name))
    hf = hf_config.config_json(cfg, {"bos_id": 1, "eos_id": 2, "pad_id": None}, "float32")
    (tmp_path / name).mkdir()
    (tmp_path / name / "config.json").write_text(json.dumps(hf))
    assert hf_config.model_config(str(tmp_path / name)) == cfg, name
    fixture = hf_config.read_json(os.path.join(FIXTURE, name, "config.json"))
    same = set(hf) & set(fixture) - {"bos_token_id", "eos_token_id", "pad_token_id", "model_type", "architectures"}
    assert {k: hf[k] for k in same} == {k: fixture[k] for k in same}, name
    assert hf["model_type"] == (fixture["model_type"] if name != "mistral" else "llama")  # no window: a Llama
    rope = dict(hf["rope_scaling"] or {"rope_type": "default"}, rope_theta=hf["rope_theta"])
    assert rope == fixture["rope_parameters"], name  # transformers 5 writes rope_parameters
  with pytest.raises(ConfigError, match=r"no HuggingFace family computes .*qkv_bias=True, qk_norm=True"):
    hf_config.config_json(ModelConfig(qkv_bias=True, qk_norm=True), {"bos_id": 1, "eos_id": 2, "pad_id": None},
                          "float32")


def _source_tensors(name):
  infos = tensor_files.index_directory(os.path.join(FIXTURE, name))
  return {k: np.array(tensor_files.tensor(v)) for k, v in infos.items()}


@pytest.mark.parametrize("name", ["llama", "mistral", *BPE_MODELS])
def test_import_then_export_reproduces_the_tensors(name, imported, tmp_path):
  out = export_run(imported[name], str(tmp_path / "out"))
  got = {k: np.array(tensor_files.tensor(v)) for k, v in tensor_files.index_directory(out).items()}
  want = _source_tensors(name)
  assert sorted(got) == sorted(want)
  for key, value in want.items():  # bitwise, in the source's dtype (bfloat16 for mistral)
    assert got[key].dtype == value.dtype and got[key].tobytes() == value.tobytes(), key
  safetensors = pytest.importorskip("safetensors")
  with safetensors.safe_open(os.path.join(out, "model.safetensors"), framework="flax") as f:  # the reference reader
    assert sorted(f.keys()) == sorted(want) and f.metadata() == {"format": "pt"}
    np.testing.assert_array_equal(np.asarray(f.get_tensor("model.norm.weight"), np.float32),
                                  want["model.norm.weight"].astype(np.float32))
  with open(os.path.join(out, "config.json"), encoding="utf-8") as f, \
       open(os.path.join(FIXTURE, name, "config.json"), encoding="utf-8") as g:
    assert json.load(f) == json.load(g)
  for file in (MODEL_FILE if name in MODELS else "tokenizer.json", "tokenizer_config.json"):
    with open(os.path.join(out, file), "rb") as f, open(os.path.join(FIXTURE, name, file), "rb") as g:
      assert f.read() == g.read()


@pytest.mark.parametrize("name", BPE_MODELS)
def test_weights_out_and_back_are_bitwise(name, tmp_path):
  # hf/weights.py alone, both ways, for the new tensors (Qwen2's biases, Qwen3's q/k norms): loaded
  # with layers scanned onto 8 devices (fsdp 4, tensor 2), each HF tensor taken back out equals the
  # source's bits, and a directory written from those loads back to the same params.
  cfg = hf_config.model_config(os.path.join(FIXTURE, name), {"scan_layers": True})
  mesh = shd.make_mesh((1, 4, 2))
  params = weights.load_params(os.path.join(FIXTURE, name), cfg, mesh)
  want = _source_tensors(name)
  assert sorted(weights.hf_names(cfg)) == sorted(want)
  got = {key: weights.hf_tensor(params, cfg, key).astype(value.dtype) for key, value in want.items()}
  for key, value in want.items():
    assert got[key].shape == value.shape and got[key].tobytes() == value.tobytes(), key
  shutil.copyfile(os.path.join(FIXTURE, name, "config.json"), tmp_path / "config.json")
  tensor_files.write(str(tmp_path / "model.safetensors"), [(k, v.dtype, v.shape) for k, v in got.items()], got.get,
                     {"format": "pt"})
  a, b = _flat(params), _flat(weights.load_params(str(tmp_path), cfg, mesh))
  assert sorted(a) == sorted(b)
  for key in a:
    assert a[key].dtype == b[key].dtype and a[key].tobytes() == b[key].tobytes(), key


@pytest.mark.parametrize("name", ["llama", "qwen2", "qwen3"])
def test_export_then_import_is_bitwise(name, imported, tmp_path, mesh):
  first = loop.restore_params(imported[name], _abstract(imported[name], mesh))
  out = export_run(imported[name], str(tmp_path / "out"))
  again = runs.import_model(out, str(tmp_path / "again"))
  second = loop.restore_params(again, _abstract(again, mesh))
  a, b = _flat(first), _flat(second)
  assert sorted(a) == sorted(b)
  for key in a:
    assert a[key].dtype == b[key].dtype and a[key].tobytes() == b[key].tobytes(), key


def _abstract(run_dir, mesh):
  from rlhf_jax.training.saved_runs import FrozenModel
  return FrozenModel(run_dir, mesh).abstract


def test_sharded_load_equals_single_device_load():
  # A (fsdp 4, tensor 2) mesh over the 8 fake devices, layers scanned, against one device.
  cfg = hf_config.model_config(os.path.join(FIXTURE, "llama"), {"scan_layers": True})
  sharded = weights.load_params(os.path.join(FIXTURE, "llama"), cfg, shd.make_mesh((1, 4, 2)))
  single = weights.load_params(os.path.join(FIXTURE, "llama"), cfg, shd.make_mesh((1, 1, 1), jax.devices()[:1]))
  wq = sharded["layers"]["attn"]["wq"]  # [layers, d_model, heads, head_dim]: embed over fsdp, heads over tensor
  assert len(wq.sharding.device_set) == 8 and wq.addressable_shards[0].data.shape == (2, 16, 2, 32)
  assert sharded["embedding"].addressable_shards[0].data.shape == (192, 16)
  a, b = _flat(sharded), _flat(single)
  for key in a:
    np.testing.assert_array_equal(a[key], b[key])


def _copy(tmp_path, name="llama"):
  target = tmp_path / name
  shutil.copytree(os.path.join(FIXTURE, name), target)
  return target


def _edit_config(directory, **changes):
  path = directory / "config.json"
  config = json.loads(path.read_text())
  config.update(changes)
  path.write_text(json.dumps(config))


@pytest.mark.parametrize("changes,message", [
    ({"model_type": "gpt2"}, r"config.json: unsupported: model_type=gpt2"),
    ({"model_type": "gemma2"}, r"unsupported: model_type=gemma2 \(not implemented: logit soft-capping, "),
    ({"model_type": "gemma3_text"}, r"unsupported: model_type=gemma3_text \(not implemented: alternating sliding"),
    ({"rope_parameters": None, "rope_scaling": {"type": "dynamic", "factor": 2.0}},
     r"config.json: unsupported: rope_scaling.type=dynamic \(implemented: default, linear, llama3\)"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4}}, r"unsupported: rope_parameters.rope_type=yarn"),
    ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, r"unsupported: both rope_scaling and rope_parameters"),
    ({"rope_parameters": {"rope_type": "linear", "factor": 2.0, "partial_rotary_factor": 0.5}},
     r"unsupported: rope_parameters.partial_rotary_factor=0.5 for rope_type=linear"),
    ({"rope_parameters": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0}},
     r"config.json: rope_parameters.high_freq_factor missing \(rope_type=llama3 needs it\)"),
    ({"rope_parameters": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0, "high_freq_factor": 1.0}},
     r"config.json: rope_low_freq_factor=4.0 and rope_high_freq_factor=1.0: expected 0 < low < high"),
    ({"use_sliding_window": False}, r"unsupported field use_sliding_window=False for model_type=llama"),
    ({"attention_bias": True}, r"unsupported: attention_bias=True"),
    ({"mlp_bias": True}, r"unsupported: mlp_bias=True"),
    ({"hidden_act": "gelu"}, r"unsupported: hidden_act='gelu'"),
    ({"sliding_window": 128}, r"unsupported field sliding_window=128 for model_type=llama"),
    ({"num_key_value_heads": 3}, r"num_heads=4 must be a multiple of num_kv_heads=3"),
])
def test_unsupported_configs_are_clear_errors(tmp_path, changes, message):
  directory = _copy(tmp_path)
  _edit_config(directory, **changes)
  with pytest.raises(ConfigError, match=message):
    runs.import_model(str(directory), str(tmp_path / "run"))
  assert not os.path.exists(tmp_path / "run") and not os.path.exists(tmp_path / "run.partial")


@pytest.mark.parametrize("name,changes,message", [
    # without layer_types, the window is in the layers from max_window_layers (1 here) on
    ("qwen2", {"use_sliding_window": True, "sliding_window": 32, "layer_types": None},
     r"qwen2/config.json: unsupported: sliding_window=32 < max_position_embeddings=256"),
    ("qwen3", {"use_sliding_window": True, "sliding_window": 32,
               "layer_types": ["full_attention", "sliding_attention"]},
     r"unsupported: sliding_window=32 < max_position_embeddings=256"),
    ("qwen3", {"layer_types": ["full_attention", "chunked_attention"]},
     r"unsupported: layer_types=\['full_attention', "),
    ("qwen3", {"attention_bias": True}, r"qwen3/config.json: unsupported: attention_bias=True"),  # o_proj's too
    ("qwen2", {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6}},
     r"unsupported: rope_parameters.rope_type=yarn"),
])
def test_unsupported_qwen_configs_are_clear_errors(tmp_path, name, changes, message):
  directory = _copy(tmp_path, name)
  _edit_config(directory, **changes)
  with pytest.raises(ConfigError, match=message):
    hf_config.model_config(str(directory))


def test_qwen_window_unused_is_plain_attention_and_old_rope_fields_read(tmp_path):
  # As Qwen2.5 ships: a window, but use_sliding_window false; or the window only in layers that
  # layer_types marks full. And transformers 4's rope_theta + rope_scaling read as 5's rope_parameters.
  directory = _copy(tmp_path, "qwen2")
  want = hf_config.model_config(str(directory))
  _edit_config(directory, use_sliding_window=False, sliding_window=32, layer_types=None)
  assert hf_config.model_config(str(directory)) == want
  _edit_config(directory, use_sliding_window=True, sliding_window=32, layer_types=["full_attention"] * 2)
  assert hf_config.model_config(str(directory)) == want
  directory = _copy(tmp_path, "llama3")
  want = hf_config.model_config(str(directory))
  rope = json.loads((directory / "config.json").read_text())["rope_parameters"]
  _edit_config(directory, rope_parameters=None, rope_theta=rope.pop("rope_theta"), rope_scaling=rope)
  assert hf_config.model_config(str(directory)) == want
  del rope["original_max_position_embeddings"]  # then transformers takes max_position_embeddings
  _edit_config(directory, rope_scaling=rope)
  assert hf_config.model_config(str(directory)).rope_original_max_len == 256


def test_mistral_sliding_window_only_when_it_covers_every_position(tmp_path):
  directory = _copy(tmp_path, "mistral")
  _edit_config(directory, sliding_window=256)  # = max_position_embeddings: plain causal attention
  hf_config.model_config(str(directory))
  _edit_config(directory, sliding_window=64)
  with pytest.raises(ConfigError, match=r"unsupported: sliding_window=64 < max_position_embeddings=256"):
    hf_config.model_config(str(directory))


def _rewrite(path, drop=(), reshape=None):
  infos, metadata = tensor_files.read_header(str(path))
  arrays = {k: np.array(tensor_files.tensor(v)) for k, v in infos.items() if k not in drop}
  if reshape:
    arrays[reshape] = arrays[reshape][:-1]
  tensor_files.write(str(path), [(k, a.dtype, a.shape) for k, a in arrays.items()], arrays.get, metadata)


def test_missing_and_misshapen_tensors_are_named(tmp_path):
  directory = _copy(tmp_path, "mistral")
  _rewrite(directory / "model.safetensors", drop=["model.layers.1.mlp.up_proj.weight"])
  with pytest.raises(ConfigError, match=r"missing tensor model.layers.1.mlp.up_proj.weight"):
    runs.import_model(str(directory), str(tmp_path / "run"))
  directory = _copy(tmp_path / "b", "mistral")
  _rewrite(directory / "model.safetensors", reshape="model.layers.0.self_attn.k_proj.weight")
  with pytest.raises(ConfigError, match=r"model.safetensors: tensor model.layers.0.self_attn.k_proj.weight has "
                                        r"shape \[15, 64\] but config.json implies \[16, 64\]"):
    runs.import_model(str(directory), str(tmp_path / "run"))
  directory = _copy(tmp_path / "c", "mistral")
  _rewrite(directory / "model.safetensors")
  infos, metadata = tensor_files.read_header(str(directory / "model.safetensors"))
  arrays = {k: np.array(tensor_files.tensor(v)) for k, v in infos.items()}
  arrays["model.layers.0.self_attn.q_proj.bias"] = np.zeros(64, np.float32)
  tensor_files.write(str(directory / "model.safetensors"), [(k, a.dtype, a.shape) for k, a in arrays.items()],
                     arrays.get, metadata)
  with pytest.raises(ConfigError, match=r"unexpected tensor model.layers.0.self_attn.q_proj.bias"):
    runs.import_model(str(directory), str(tmp_path / "run"))


@pytest.mark.parametrize("name,tensor", [("qwen2", "model.layers.1.self_attn.v_proj.bias"),
                                         ("qwen3", "model.layers.0.self_attn.k_norm.weight")])
def test_missing_bias_or_head_norm_is_named(tmp_path, name, tensor):
  directory = _copy(tmp_path, name)
  _rewrite(directory / "model.safetensors", drop=[tensor])
  cfg = hf_config.model_config(str(directory))
  with pytest.raises(ConfigError, match=rf"missing tensor {tensor} \(implied by config.json\)"):
    weights.check_tensors(tensor_files.index_directory(str(directory)), cfg, str(directory))


def test_sharded_index_naming_a_missing_file(tmp_path):
  directory = _copy(tmp_path)
  os.remove(directory / "model-00002-of-00003.safetensors")
  with pytest.raises(ConfigError, match=r"names model-00002-of-00003.safetensors, which is not in"):
    runs.import_model(str(directory), str(tmp_path / "run"))


def test_command_line_mistake_is_one_line_and_status_2(tmp_path):
  directory = _copy(tmp_path)
  _edit_config(directory, rope_scaling={"rope_type": "dynamic", "factor": 2.0}, rope_parameters=None)
  env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-m", "rlhf_jax", "hf_import", f"--hf_dir={directory}",
                         f"--out={tmp_path / 'run'}"], capture_output=True, text=True, cwd=ROOT, env=env)
  assert proc.returncode == 2, proc.stderr
  assert proc.stderr.strip().splitlines() == [
      f"error: {directory / 'config.json'}: unsupported: rope_scaling.rope_type=dynamic (implemented: default, "
      f"linear, llama3)"]


@pytest.mark.parametrize("name", MODELS)
def test_tokenizer_ids_and_specials(name, imported):
  expected = EXPECTED[name]
  tok = Tokenizer(os.path.join(imported[name], MODEL_FILE))
  for text, ids, hf_ids in zip(EXPECTED["strings"], expected["sentencepiece_ids_no_dummy_prefix"],
                               expected["transformers_ids"]):
    assert tok.encode(text) == ids and tok.decode(ids) == text
    if name == "gemma":  # no dummy prefix in Gemma's tokenizer: transformers' ids are ours
      assert ids == hf_ids
  assert (tok.bos_id, tok.eos_id) == (expected["bos_id"], expected["eos_id"])
  assert tok.pad_id == (expected["pad_id"] if expected["pad_id"] is not None else tok.unk_id)
  assert tok.eoc_id == tok.eos_id and tok.vocab_size == 384
  assert tok.decode([tok.bos_id, tok.pad_id] + tok.encode("Hi") + [tok.eos_id, tok.eoc_id]) == "Hi"


@pytest.mark.parametrize("name", BPE_MODELS)
def test_tokenizer_json_ids_and_specials_equal_transformers(name, imported):
  """tokenizer.json families: our ids are transformers' for every fixed string, with and without
  the specials it adds (BOS for Llama 3 only), and its BOS / EOS / pad are the run's."""
  expected = EXPECTED[name]
  tok = load_tokenizer(imported[name])
  assert isinstance(tok, JsonTokenizer) and tok.vocab_size == expected["tokenizer_size"]
  for text, ids, with_specials in zip(EXPECTED["strings"], expected["transformers_ids"],
                                      expected["transformers_ids_with_specials"]):
    assert tok.encode(text) == ids and tok.encode_sequence(text) == with_specials and tok.decode(ids) == text
  assert (tok.bos_id, tok.eos_id) == (expected["bos_id"], expected["eos_id"])
  assert tok.pad_id == (expected["pad_id"] if expected["pad_id"] is not None else tok.eos_id)
  assert tok.add_bos == (name == "llama3") and tok.eoc_id == tok.eos_id
  template = os.path.join(FIXTURE, name, "chat_template.jinja")
  assert tok.chat_template() == (open(template, encoding="utf-8").read() if os.path.exists(template) else None)


def test_tokenizer_specials_travel_with_the_tokenizer(imported, tmp_path):
  tok = Tokenizer(os.path.join(imported["gemma"], MODEL_FILE))
  tok.copy_to(str(tmp_path))
  assert Tokenizer(str(tmp_path / MODEL_FILE)).eos_id == 1
  mistral = Tokenizer(os.path.join(imported["mistral"], MODEL_FILE))
  mistral.copy_to(str(tmp_path))
  assert Tokenizer(str(tmp_path / MODEL_FILE)).pad_id == 0  # mistral's own specials replaced gemma's
  os.remove(tmp_path / SPECIALS_FILE)
  with pytest.raises(ValueError, match="not trained by rlhf_jax.data.tokenizer.train_tokenizer"):
    Tokenizer(str(tmp_path / MODEL_FILE))  # without its specials it is a foreign tokenizer again


def test_lm_starts_from_hf_dir(tmp_path, monkeypatch, mesh, tfds_dir):
  from rlhf_jax.data.inputs import trainer_data
  from rlhf_jax.trainers import train_lm
  monkeypatch.setenv(runs.CACHE_ENV, str(tmp_path / "cache"))
  config = small_run_config(lm_config.get_config("tiny"), steps=1, max_examples=40)
  config.init_from = f"hf:{os.path.join(FIXTURE, 'gemma')}"
  config.train.async_checkpointing, config.data.tfds_dir = False, tfds_dir
  train_lm.train(config, str(tmp_path / "lm"))
  (cached,) = os.listdir(tmp_path / "cache")
  with open(tmp_path / "lm" / "config.json", encoding="utf-8") as f:
    saved = json.load(f)
  assert saved["init_from"] == str(tmp_path / "cache" / cached)
  assert saved["model"]["norm_offset"] == 1.0 and saved["model"]["vocab_size"] == 384
  # Step 1's loss is that of the imported weights on the first batch.
  resolved = config_checks.inherit_model_config(runs.resolve(config, str(tmp_path / "lm"), ("init_from",)))
  cfg = hf_config.model_config(os.path.join(FIXTURE, "gemma"))
  params = weights.load_params(os.path.join(FIXTURE, "gemma"), cfg, mesh)
  batch = trainer_data(resolved, str(tmp_path / "lm"), "lm").train.batch_at(0)
  loss, _ = lm.lm_loss(params, Transformer(cfg), {k: jnp.asarray(v) for k, v in batch.items()})
  (row,) = read_metrics(str(tmp_path / "lm"))
  assert row["loss"] == pytest.approx(float(loss), rel=1e-5)


def test_pm_starts_from_hf_dir_with_a_fresh_head(tmp_path, mesh, tfds_dir):
  from rlhf_jax.trainers import train_pm
  config = small_run_config(pm_config.get_config("tiny"), steps=2, max_examples=40)
  config.init_from = f"hf:{os.path.join(FIXTURE, 'llama')}"
  config.optimizer.learning_rate, config.optimizer.warmup_steps = 1e-5, 0
  config.train.async_checkpointing, config.data.tfds_dir = False, tfds_dir
  train_pm.train(config, str(tmp_path / "pm"))
  (cached,) = os.listdir(tmp_path / "pm" / "hf_import")  # the default cache: inside the workdir
  imported_dir = str(tmp_path / "pm" / "hf_import" / cached)
  pm_params = _flat(loop.restore_params(str(tmp_path / "pm"), _abstract(str(tmp_path / "pm"), mesh)))
  start = _flat(loop.restore_params(imported_dir, _abstract(imported_dir, mesh)))
  assert not np.any(start[("scalar_head",)]) and float(start[("scalar_bias",)]) == 0.0  # fresh: zeros
  for key, value in start.items():  # two Adam steps of 1e-5 from the imported trunk
    assert np.abs(pm_params[key] - value).max() <= 2.5e-5, key
  assert np.abs(pm_params[("scalar_head",)]).max() > 0  # the head trained
  assert os.path.exists(tmp_path / "pm" / "eval_pm.json")


def _scratch_run(run_dir, mesh):
  """A run as train_lm leaves it, for a model and tokenizer made here (no HuggingFace source)."""
  from rlhf_jax.data.hh_rlhf import catalog
  from rlhf_jax.data.hh_rlhf.records import read_comparisons
  from rlhf_jax.data.tokenizer import train_tokenizer
  from rlhf_jax.training.checkpointing import Checkpointer
  from rlhf_jax.training.optimizer import make_optimizer
  from rlhf_jax.training.train_state import create_train_state
  records = read_comparisons(os.path.join(catalog.SAMPLE_DIR, "harmless-base", "test.jsonl.gz"))[0]
  tok = train_tokenizer([r["chosen"] for r in records[:100]], 400, str(run_dir))
  cfg = ModelConfig(vocab_size=400, d_model=32, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=16, mlp_dim=64,
                    max_seq_len=128)
  config = lm_config.get_config("tiny")
  config.model = cfg.to_dict()
  (run_dir / "config.json").write_text(json.dumps(config.to_dict()))
  state, _ = create_train_state(lambda r: init_params(cfg, r), make_optimizer(config.optimizer, 10), mesh,
                                jax.random.PRNGKey(1))
  with Checkpointer(str(run_dir / "checkpoints"), async_save=False) as ckpt:
    ckpt.save(3, state)
  return tok, state.params


def test_model_trained_here_exports_as_llama_and_comes_back(tmp_path, mesh):
  tok, params = _scratch_run(tmp_path / "run", mesh)
  out = export_run(str(tmp_path / "run"), str(tmp_path / "out"))
  hf = json.loads((tmp_path / "out" / "config.json").read_text())
  assert hf["architectures"] == ["LlamaForCausalLM"] and hf["torch_dtype"] == "float32"
  assert (hf["bos_token_id"], hf["eos_token_id"], hf["pad_token_id"], hf["num_key_value_heads"]) == (None, 2, 0, 1)
  again = runs.import_model(out, str(tmp_path / "again"))
  back = loop.restore_params(again, _abstract(again, mesh))
  a, b = _flat(params), _flat(back)
  for key in a:
    assert a[key].tobytes() == b[key].tobytes(), key
  tok2 = Tokenizer(os.path.join(again, MODEL_FILE))  # our special ids, the end-of-context piece included
  assert (tok2.pad_id, tok2.unk_id, tok2.eos_id, tok2.eoc_id, tok2.bos_id) == (0, 1, 2, 3, None)
  assert tok2.encode(EXPECTED["strings"][0]) == tok.encode(EXPECTED["strings"][0])


def test_hf_references_are_checked_before_a_run_and_load_as_policies(tmp_path, mesh):
  from rlhf_jax.training.saved_runs import load_policy
  config = small_run_config(pm_config.get_config("tiny"), steps=1, max_examples=40)
  config.init_from = f"hf:{os.path.join(FIXTURE, 'mistral', 'nowhere')}"
  with pytest.raises(ConfigError, match=r"init_from=hf:.*nowhere: .* is not a directory"):
    config_checks.validate(config, "pm")
  config.init_from = f"hf:{_copy(tmp_path, 'mistral')}"
  _edit_config(tmp_path / "mistral", sliding_window=8)
  with pytest.raises(ConfigError, match=r"init_from=hf:.*unsupported: sliding_window=8"):
    config_checks.validate(config, "pm")
  ppo = ml_collections.ConfigDict({"policy_from": f"hf:{os.path.join(FIXTURE, 'mistral')}",
                                   "mesh": {"shape": (1, -1, 1)}})  # what train_ppo resolves
  resolved = runs.resolve(ppo, str(tmp_path / "ppo"), ("policy_from", "init_policy_from"))
  policy = load_policy(resolved.policy_from, mesh)
  assert policy.step == 0 and policy.tokenizer_dir == resolved.policy_from
  assert policy.model.cfg == hf_config.model_config(os.path.join(FIXTURE, "mistral"))
