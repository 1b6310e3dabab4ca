"""The data layer with its files in a bucket (the fake GCS server of tests/fake_gcs.py): tokenizers
saved into gs:// and loaded back encode as the local ones, hh-rlhf prepared for a gs:// data.tfds_dir
(through this host's local stand-in) gives the local examples, and comparison, prompt and corpus
files in gs:// read as the same files on disk."""
import gzip
import json
import os
import uuid

import ml_collections
import numpy as np
import pytest
import tokenizers
from tokenizers import decoders, models, pre_tokenizers

from rlhf_jax import storage
from rlhf_jax.data import corpus, corpus_sources, locations
from rlhf_jax.data.hh_rlhf import catalog
from rlhf_jax.data.hh_rlhf.load import load_split
from rlhf_jax.data.hh_rlhf.records import read_comparisons, read_prompts
from rlhf_jax.data.json_tokenizer import CHAT_TEMPLATE_FILE, SPECIALS_FILE, JsonTokenizer
from rlhf_jax.data.tokenizer import MODEL_FILE, Tokenizer, load_tokenizer, same_tokenizer, train_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LLAMA = os.path.join(ROOT, "tests", "fixtures", "hf", "llama")  # a pretrained SentencePiece model
SAMPLE = os.path.join(catalog.SAMPLE_DIR, "harmless-base", "test.jsonl.gz")
TEXTS = ["\n\nHuman: How do I bake bread?\n\nAssistant: Flour, water, yeast, 230°C.", "  spaces  and\ttabs ",
         "digits 12345 and ünïcödé ☃", ""]


def _bucket(name: str) -> str:
  return f"gs://runs/test_storage_data/{name}/{uuid.uuid4().hex}"


@pytest.fixture(scope="module")
def dialogues():
  return [r["chosen"] for r in read_comparisons(SAMPLE)[0][:60]]


def _same_encoding(a, b) -> None:
  for text in TEXTS:
    assert a.encode(text) == b.encode(text), text
  assert (a.vocab_size, a.pad_id, a.eos_id, a.eoc_id, a.bos_id, a.add_bos) == \
         (b.vocab_size, b.pad_id, b.eos_id, b.eoc_id, b.bos_id, b.add_bos)


def test_a_trained_sentencepiece_tokenizer_saved_in_a_bucket_encodes_as_the_local_one(gcs_server, dialogues,
                                                                                     tmp_path):
  local = train_tokenizer(dialogues, 400, str(tmp_path))
  trained_there = train_tokenizer(dialogues, 400, _bucket("spm"))  # the trainer's output written to the bucket
  copied = _bucket("spm_copy")
  local.copy_to(copied)
  for remote in (trained_there, load_tokenizer(copied)):
    assert remote.path.startswith("gs://") and not remote.pretrained
    _same_encoding(local, remote)
    assert storage.read_bytes(remote.path) == (tmp_path / MODEL_FILE).read_bytes()
  assert same_tokenizer(str(tmp_path), copied).encode(TEXTS[0]) == local.encode(TEXTS[0])


def test_a_pretrained_sentencepiece_tokenizer_keeps_its_ids_in_a_bucket(gcs_server, tmp_path):
  # An imported model's tokenizer.model with its special ids beside it: read from the bucket, its
  # dummy prefix is dropped as locally, and copy_to carries the ids along.
  (tmp_path / MODEL_FILE).write_bytes(open(os.path.join(LLAMA, MODEL_FILE), "rb").read())
  (tmp_path / SPECIALS_FILE).write_text(json.dumps({"bos_id": 1, "eos_id": 2, "pad_id": 0, "unk_id": 0,
                                                    "eoc_id": 2, "add_bos": True}))
  local = Tokenizer(str(tmp_path / MODEL_FILE))
  remote_dir = _bucket("spm_pretrained")
  local.copy_to(remote_dir)
  remote = load_tokenizer(remote_dir)
  assert local.pretrained and remote.pretrained
  _same_encoding(local, remote)
  assert remote.encode_sequence("Hi") == local.encode_sequence("Hi") and remote.encode_sequence("Hi")[0] == 1


def test_a_tokenizer_json_saved_in_a_bucket_encodes_as_the_local_one(gcs_server, dialogues, tmp_path):
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator(dialogues, tokenizers.trainers.BpeTrainer(
      vocab_size=400, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
      show_progress=False))
  tok.save(str(tmp_path / "tokenizer.json"))
  (tmp_path / SPECIALS_FILE).write_text(json.dumps({"bos_id": 0, "eos_id": 1, "pad_id": 1, "unk_id": 1,
                                                    "eoc_id": 1, "add_bos": True}))
  (tmp_path / CHAT_TEMPLATE_FILE).write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
  local = load_tokenizer(str(tmp_path))
  remote_dir = _bucket("json")
  storage.write_atomic(storage.join(remote_dir, MODEL_FILE), b"an earlier run's")  # replaced by copy_to
  local.copy_to(remote_dir)
  assert not storage.exists(storage.join(remote_dir, MODEL_FILE))
  remote = load_tokenizer(remote_dir)
  assert isinstance(remote, JsonTokenizer) and remote.path == storage.join(remote_dir, "tokenizer.json")
  _same_encoding(local, remote)
  assert remote.chat_template() == local.chat_template() is not None
  assert remote.decode(remote.encode(TEXTS[2])) == TEXTS[2]
  assert same_tokenizer(remote_dir, str(tmp_path)).encode(TEXTS[0]) == local.encode(TEXTS[0])


def test_hh_rlhf_for_a_bucket_tfds_dir_is_prepared_on_this_host_and_reads_the_same(gcs_server, tmp_path,
                                                                                   monkeypatch):
  # ArrayRecord files cannot be written to a bucket (C++ open()); a gs:// data.tfds_dir stands for a
  # directory of this host's cache, the bucket is left untouched, and the examples are the local ones.
  monkeypatch.setenv(locations.CACHE_ENV, str(tmp_path / "cache"))
  remote = storage.join(_bucket("tfds"), "tfds")
  local = load_split("harmless-base", "test", data_dir=str(tmp_path / "tfds"), source_dir=catalog.SAMPLE_DIR)
  there = load_split("harmless-base", "test", data_dir=remote, source_dir=catalog.SAMPLE_DIR)
  assert len(local.records) > 300 and there.records == local.records
  assert (there.skipped, there.ties) == (local.skipped, local.ties)
  stand_in = locations.local_cache("tfds", remote, catalog.SAMPLE_DIR)
  assert stand_in.startswith(str(tmp_path / "cache")) and os.listdir(os.path.join(stand_in, "hh_rlhf"))
  assert not storage.exists(remote)
  assert load_split("harmless-base", "test", data_dir=remote, source_dir=catalog.SAMPLE_DIR).records == local.records


def _write_both(tmp_path, name: str, data: bytes) -> tuple[str, str]:
  local, remote = str(tmp_path / name), storage.join(_bucket("files"), name)
  with open(local, "wb") as f:
    f.write(data)
  storage.write_atomic(remote, data)
  return local, remote


@pytest.mark.parametrize("name", ["prefs.jsonl", "prefs.jsonl.gz"])
def test_a_preference_file_in_a_bucket_reads_as_the_local_file(gcs_server, tmp_path, name):
  with gzip.open(SAMPLE, "rb") as f:
    lines = f.read().split(b"\n")[:40]
  lines[5] = b'{"chosen": "no turns", "rejected": 3}'  # malformed: skipped and counted alike
  data = b"\n".join(lines) + b"\n"
  local, remote = _write_both(tmp_path, name, gzip.compress(data, mtime=0) if name.endswith(".gz") else data)
  want, want_report = read_comparisons(local, skip_malformed=True)
  got, got_report = read_comparisons(remote, skip_malformed=True)
  assert len(want) > 30 and got == want
  assert (got_report.records, dict(got_report.skipped), got_report.ties) == \
         (want_report.records, dict(want_report.skipped), want_report.ties)
  prompts = b"".join(json.dumps({"prompt": r["prompt"]}).encode() + b"\n" for r in want)
  local, remote = _write_both(tmp_path, "prompts.jsonl", prompts)
  assert read_prompts(remote)[0] == read_prompts(local)[0] == [r["prompt"] for r in want]


def _corpus_config(source: str) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({"objective": "pretrain", "data": {
      "corpus": source, "corpus_field": "text", "corpus_cache_dir": "", "max_examples": 0, "skip_malformed": False,
      "tfds_dir": ""}})


def test_a_corpus_in_a_bucket_tokenises_as_the_local_one(gcs_server, dialogues, tmp_path, monkeypatch):
  # A gs:// corpus file streams through gzip; the token cache of a gs:// workdir is memory-mapped
  # from this host's stand-in directory.
  monkeypatch.setenv(locations.CACHE_ENV, str(tmp_path / "cache"))
  data = gzip.compress(b"".join(json.dumps({"text": d}).encode() + b"\n" for d in dialogues), mtime=0)
  local, remote = _write_both(tmp_path, "corpus.jsonl.gz", data)
  tok = train_tokenizer(dialogues, 400, str(tmp_path / "tok"))
  want = corpus.token_stream(_corpus_config(local), str(tmp_path / "run"), tok)
  workdir = _bucket("corpus_run")
  got = corpus.token_stream(_corpus_config(remote), workdir, tok)
  assert list(corpus_sources.documents(_corpus_config(remote), workdir, {})) == dialogues
  np.testing.assert_array_equal(got.tokens, want.tokens)
  np.testing.assert_array_equal(got.starts, want.starts)
  cache = corpus_sources.cache_dir(_corpus_config(remote), workdir)
  assert cache.startswith(str(tmp_path / "cache")) and not storage.exists(storage.join(workdir, "corpus"))


def _flat_params(run_dir: str, mesh) -> dict:
  from flax import traverse_util

  from rlhf_jax.training import loop
  from rlhf_jax.training.saved_runs import FrozenModel
  params = loop.restore_params(run_dir, FrozenModel(run_dir, mesh).abstract)
  return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(params).items()}


@pytest.mark.parametrize("name", ["llama", "qwen2"])  # tokenizer.model, tokenizer.json
def test_an_hf_import_into_a_bucket_loads_and_exports_as_a_local_one(gcs_server, tmp_path, name):
  from rlhf_jax.errors import ConfigError
  from rlhf_jax.hf import runs
  from rlhf_jax.hf.export_model import export_run
  from rlhf_jax.training import sharding as shd
  source = os.path.join(ROOT, "tests", "fixtures", "hf", name)
  local = runs.import_model(source, str(tmp_path / "local"))
  cache = _bucket("hf_import")
  remote = runs.imported(f"hf:{source}", cache)
  assert remote.startswith(cache + "/") and runs.imported(f"hf:{source}", cache) == remote  # imported once
  assert not storage.exists(storage.join(remote, runs.IMPORTING))
  mesh = shd.make_mesh((1, -1, 1))
  want, got = _flat_params(local, mesh), _flat_params(remote, mesh)
  assert sorted(got) == sorted(want)
  for key, value in want.items():
    assert got[key].dtype == value.dtype and got[key].tobytes() == value.tobytes(), key
  assert load_tokenizer(remote).encode(TEXTS[0]) == load_tokenizer(local).encode(TEXTS[0])
  with pytest.raises(ConfigError, match="exists: import into a new directory"):
    runs.import_model(source, remote)
  out_local, out_remote = export_run(local, str(tmp_path / "out_local")), export_run(remote, str(tmp_path / "out"))
  assert sorted(os.listdir(out_remote)) == sorted(os.listdir(out_local))
  for file in os.listdir(out_local):
    with open(os.path.join(out_local, file), "rb") as a, open(os.path.join(out_remote, file), "rb") as b:
      assert a.read() == b.read(), file


def test_a_killed_import_into_a_bucket_is_redone_and_other_directories_are_kept(gcs_server, tmp_path):
  from rlhf_jax.errors import ConfigError
  from rlhf_jax.hf import runs
  source = os.path.join(ROOT, "tests", "fixtures", "hf", "llama")
  killed = _bucket("killed")
  storage.write_atomic(storage.join(killed, runs.IMPORTING), "")  # what a killed import leaves
  storage.write_atomic(storage.join(killed, "checkpoints", "half"), b"x")
  assert not runs.is_complete(killed)
  runs.import_model(source, killed)
  assert runs.is_complete(killed) and not storage.exists(storage.join(killed, "checkpoints", "half"))
  assert not storage.exists(storage.join(killed, runs.IMPORTING))
  someone_elses = _bucket("not_an_import")
  storage.write_atomic(storage.join(someone_elses, "notes.txt"), "keep me")
  with pytest.raises(ConfigError, match="exists: import into a new directory"):
    runs.import_model(source, someone_elses)
  assert storage.read_text(storage.join(someone_elses, "notes.txt")) == "keep me"
