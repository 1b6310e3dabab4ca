"""Pretraining on a text corpus (data.corpus): batches against a brute-force tokenise-concatenate-cut,
resume from the token cache, held-out rows, every source format (local, gzip, URL, TFDS), one clear
error for each bad input, and the dialogues unchanged when no corpus is named."""
import gzip
import http.server
import json
import os
import socket
import sys
import threading

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir))
from configs import lm as lm_config
from rlhf_jax.data import corpus, corpus_sources
from rlhf_jax.data.batching import Batcher, Encoded, encode_dialogue, pack, pad_batch
from rlhf_jax.data.hh_rlhf import catalog
from rlhf_jax.data.hh_rlhf.records import read_comparisons
from rlhf_jax.data.inputs import trainer_data
from rlhf_jax.data.lm_data import tokenizer_texts, train_eval_records
from rlhf_jax.data.tokenizer import EOC_ID, Tokenizer, load_tokenizer, train_tokenizer
from rlhf_jax.errors import ConfigError

SEQ, BATCH, EVAL_ROWS = 32, 4, 5


@pytest.fixture(scope="module")
def records():
  return read_comparisons(os.path.join(catalog.SAMPLE_DIR, "harmless-base", "test.jsonl.gz"))[0]


@pytest.fixture(scope="module")
def tok(records, tmp_path_factory):
  return train_tokenizer([r["chosen"] for r in records[:150]], 512, str(tmp_path_factory.mktemp("tok")))


@pytest.fixture(scope="module")
def docs(records):
  """Documents of very different lengths (a few tokens to several rows), unicode included."""
  texts = [r["chosen"] for r in records[150:230]]
  return [t[: 40 + 97 * i % 900] for i, t in enumerate(texts)] + ["Zoë's café — naïve?", ""]


def _jsonl(path, docs, opener=open):
  with opener(path, "wt", encoding="utf-8") as f:
    for d in docs:
      f.write(json.dumps({"id": len(d), "text": d}) + "\n")
  return str(path)


def _config(tok, corpus_spec, **data):
  c = lm_config.get_config("tiny")
  c.train.batch_size, c.train.seq_len = BATCH, SEQ
  c.model.vocab_size = 512
  c.tokenizer.path = tok.path if tok else ""  # "" trains one into the run directory
  c.data.corpus, c.data.corpus_eval_rows = corpus_spec, EVAL_ROWS
  for key, value in data.items():
    c.data[key] = value
  return c


def _expected_rows(tok, docs):
  """Brute force: each document on its own (BOS, text, EOS), pack's cut, eval first, training from the
  first document starting after the held-out rows."""
  encoded = [Encoded(tok.bos_prefix() + tok.encode(d) + [tok.eos_id],
                     [False] * len(tok.bos_prefix()) + [True] * (len(tok.encode(d)) + 1)) for d in docs]
  starts = np.cumsum([0] + [len(e.tokens) for e in encoded])[:-1]
  first = next(i for i, s in enumerate(starts) if s >= EVAL_ROWS * SEQ)
  return pack(encoded[first:], SEQ), pack(encoded, SEQ)[:EVAL_ROWS]


def _same_batch(a, b):
  assert a.keys() == b.keys()
  for key in a:
    assert a[key].dtype == b[key].dtype, key
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def _with_bos(tok):
  """The same tokenizer, as a model pretrained with a BOS opening every sequence would use it."""
  bos_tok = Tokenizer(tok.path)
  bos_tok.add_bos, bos_tok.bos_id = True, EOC_ID
  return bos_tok


@pytest.mark.parametrize("bos", [False, True])
def test_batches_equal_brute_force_tokenise_concatenate_cut(tok, docs, tmp_path, bos):
  tok = _with_bos(tok) if bos else tok
  data = corpus.corpus_batchers(_config(tok, _jsonl(tmp_path / "c.jsonl", docs)), str(tmp_path), tok)
  train_rows, eval_rows = _expected_rows(tok, docs)
  train, held_out, skipped = data
  assert (len(train), len(held_out), skipped) == (len(train_rows), EVAL_ROWS, 0)
  n = len(train_rows)
  for p in (0, 1, n - 2, 3 * n + 5):  # n - 2 and beyond wrap around into the next epoch
    want = pad_batch([train_rows[(p + i) % n] for i in range(BATCH)], SEQ, tok.pad_id)
    _same_batch(train.batch_at(p), want)
  got_eval = held_out.in_order()
  assert [int(b["num_valid"]) for b in got_eval] == [4, 1]
  fill = [Encoded([tok.pad_id], [False])] * 3  # the last batch is padded with all-masked rows
  for got, want in zip(got_eval, [eval_rows[:4], eval_rows[4:] + fill], strict=True):
    _same_batch({k: v for k, v in got.items() if k != "num_valid"}, pad_batch(want, SEQ, tok.pad_id))
  assert (train.batch_at(0)["loss_mask"] == 0).any() == bos  # BOS is never a target


def test_trainer_data_reads_the_corpus_and_resumes_without_tokenising(tok, docs, tmp_path, monkeypatch):
  config = _config(tok, _jsonl(tmp_path / "c.jsonl", docs))
  (tmp_path / "run").mkdir()  # as train_lm makes it
  first = trainer_data(config, str(tmp_path / "run"), "lm")
  positions = (0, 7, 123)
  batches = [first.train.batch_at(p) for p in positions]
  cache = tmp_path / "run" / "corpus"
  mtimes = {p.name: p.stat().st_mtime_ns for p in cache.iterdir()}

  def no_reading(*args, **kwargs):
    raise AssertionError("the corpus was read again")
  monkeypatch.setattr(corpus_sources, "documents", no_reading)
  monkeypatch.setattr(Tokenizer, "encode_batch", no_reading)
  monkeypatch.setattr(Tokenizer, "encode", no_reading)
  resumed = trainer_data(config, str(tmp_path / "run"), "lm")  # a fresh process would do the same
  for p, batch in zip(positions, batches):
    _same_batch(resumed.train.batch_at(p), batch)
  assert {p.name: p.stat().st_mtime_ns for p in cache.iterdir()} == mtimes
  assert not [name for name in mtimes if name.endswith(".part")]


def test_eval_rows_are_disjoint_from_training_rows(tok, docs, tmp_path):
  stream = corpus.token_stream(_config(tok, _jsonl(tmp_path / "c.jsonl", docs)), str(tmp_path), tok)
  train, held_out = corpus.split_rows(stream, SEQ, EVAL_ROWS)
  ends = np.append(stream.starts[1:], len(stream.tokens))
  eval_docs = {i for i, (s, e) in enumerate(zip(stream.starts, ends)) if s < EVAL_ROWS * SEQ}
  train_end = train.start + len(train) * SEQ
  train_docs = {i for i, (s, e) in enumerate(zip(stream.starts, ends)) if e > train.start and s < train_end}
  assert eval_docs and train_docs and not eval_docs & train_docs
  assert train.start in set(stream.starts.tolist()) and train.start >= EVAL_ROWS * SEQ
  # Every row a training batch can read lies in the training span, at any position.
  batcher = corpus.CorpusBatcher(train, batch_size=BATCH, seq_len=SEQ, seed=0, pad_id=0)
  assert {batcher._index(p) for p in range(3 * len(train))} == set(range(len(train)))


def _stream(config, workdir, tok):
  return np.asarray(corpus.token_stream(config, str(workdir), tok).tokens)


def test_txt_jsonl_json_and_gzip_give_the_same_stream(tok, docs, tmp_path):
  want = _stream(_config(tok, _jsonl(tmp_path / "c.jsonl", docs)), tmp_path / "a", tok)
  txts = []
  for i, d in enumerate(docs):  # .txt: one document a file
    path = tmp_path / f"doc{i}.txt{'.gz' if i % 2 else ''}"
    with (gzip.open if i % 2 else open)(path, "wt", encoding="utf-8") as f:
      f.write(d)
    txts.append(str(path))
  half = len(docs) // 2
  mixed = ",".join([_jsonl(tmp_path / "a.jsonl.gz", docs[:half], gzip.open), _jsonl(tmp_path / "b.json", docs[half:])])
  for name, spec in (("txt", ",".join(txts)), ("mixed", mixed)):
    np.testing.assert_array_equal(_stream(_config(tok, spec), tmp_path / name, tok), want)


class _Files(http.server.SimpleHTTPRequestHandler):
  requests = []

  def do_GET(self):
    _Files.requests.append(self.path)
    super().do_GET()

  def log_message(self, *args):
    pass


@pytest.fixture
def server(tmp_path, monkeypatch):
  """A loopback HTTP server on tmp_path/www, in a thread: tests stay offline."""
  for key in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY"):
    monkeypatch.delenv(key, raising=False)
  (tmp_path / "www").mkdir()
  handler = lambda *a, **k: _Files(*a, directory=str(tmp_path / "www"), **k)
  httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
  threading.Thread(target=httpd.serve_forever, daemon=True).start()
  _Files.requests.clear()
  yield f"http://127.0.0.1:{httpd.server_address[1]}", tmp_path / "www"
  httpd.shutdown()
  httpd.server_close()


def test_url_is_downloaded_once_and_read_like_the_file(tok, docs, tmp_path, server):
  base, www = server
  _jsonl(www / "docs.jsonl.gz", docs, gzip.open)
  url = f"{base}/docs.jsonl.gz"
  config = _config(tok, url, corpus_cache_dir=str(tmp_path / "shared"))
  got = _stream(config, tmp_path / "run1", tok)
  np.testing.assert_array_equal(got, _stream(_config(tok, str(www / "docs.jsonl.gz")), tmp_path / "local", tok))
  downloads = list((tmp_path / "shared" / "downloads").iterdir())
  assert len(downloads) == 1 and downloads[0].name.endswith("-docs.jsonl.gz")
  corpus_sources.download(url, str(tmp_path / "shared"))  # already there: no second request
  np.testing.assert_array_equal(_stream(config, tmp_path / "run2", tok), got)  # shared cache: a second run
  assert _Files.requests == ["/docs.jsonl.gz"]


def _closed_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_unreachable_or_missing_url_is_one_config_error(tok, tmp_path, server):
  base, _ = server
  for url in (f"http://127.0.0.1:{_closed_port()}/c.jsonl", f"{base}/absent.jsonl"):
    with pytest.raises(ConfigError, match=f"cannot download {url} .*name the local file"):
      corpus.corpus_batchers(_config(tok, url), str(tmp_path), tok)
    assert not [p for p in (tmp_path / "corpus" / "downloads").iterdir()]  # no partial file left


def _write(path, text, opener=open):
  with opener(path, "wt", encoding="utf-8") as f:
    f.write(text)
  return str(path)


BAD_LINES = [
    ('{"text": "fine"}\n{"text": "broken\n', r"line 2: not JSON"),
    ('{"text": "fine"}\n\n{"body": "x"}\n', r"line 3: no field 'text' \(data.corpus_field; fields: \['body'\]\)"),
    ('{"text": 7}\n', r"line 1: field 'text' is int, not text"),
    ('["text"]\n', r"line 1: not a JSON object but list"),
]


@pytest.mark.parametrize("content,message", BAD_LINES)
def test_malformed_line_names_file_line_and_field(tok, tmp_path, content, message):
  path = _write(tmp_path / "bad.jsonl", content)
  with pytest.raises(ConfigError, match=f"{path} {message}.*skip_malformed=True"):
    corpus.corpus_batchers(_config(tok, path), str(tmp_path), tok)


def test_skip_malformed_skips_counts_and_prints(tok, docs, tmp_path, capsys):
  good = docs[:40]
  lines = [json.dumps({"text": d}) for d in good]
  for i, bad in enumerate(['{"text": ', '{"title": "x"}', '{"text": null}']):
    lines.insert(5 + 7 * i, bad)
  path = _write(tmp_path / "mixed.jsonl", "\n".join(lines) + "\n")
  train, _, skipped = corpus.corpus_batchers(_config(tok, path, skip_malformed=True), str(tmp_path / "a"), tok)
  assert skipped == 3
  assert "skipped 3 malformed lines" in capsys.readouterr().out
  np.testing.assert_array_equal(_stream(_config(tok, path, skip_malformed=True), tmp_path / "a", tok),
                                _stream(_config(tok, _jsonl(tmp_path / "good.jsonl", good)), tmp_path / "b", tok))
  corpus.corpus_batchers(_config(tok, path, skip_malformed=True), str(tmp_path / "a"), tok)  # cached: said again
  assert "3 malformed lines skipped" in capsys.readouterr().out


def test_bad_sources_are_one_config_error(tok, docs, tmp_path):
  cases = {
      str(tmp_path / "absent.jsonl"): r"absent.jsonl: no such file",
      _write(tmp_path / "notes.csv", "a,b\n"): r"notes.csv: expected a .jsonl, .json or .txt file",
      _write(tmp_path / "empty.jsonl", "\n"): r"no documents",
      _write(tmp_path / "short.jsonl", json.dumps({"text": docs[0]}) + "\n"): r"shorter than one batch: \d+ tokens",
      _write(tmp_path / "fake.jsonl.gz", "not gzip"): r"fake.jsonl.gz: cannot read",
  }
  with open(tmp_path / "latin1.txt", "wb") as f:
    f.write("café".encode("latin-1"))
  cases[str(tmp_path / "latin1.txt")] = r"latin1.txt: not UTF-8 text \(byte 3\)"
  for spec, message in cases.items():
    with pytest.raises(ConfigError, match=message):
      corpus.corpus_batchers(_config(tok, spec), str(tmp_path / "run"), tok)
  all_skipped = _write(tmp_path / "all_bad.jsonl", "{\n{\n")
  with pytest.raises(ConfigError, match=r"no documents \(2 malformed lines skipped\)"):
    corpus.corpus_batchers(_config(tok, all_skipped, skip_malformed=True), str(tmp_path / "run"), tok)
  good = _jsonl(tmp_path / "c.jsonl", docs)
  with pytest.raises(ConfigError, match=r"data.corpus_eval_rows=0: must be a positive"):
    corpus.corpus_batchers(_config(tok, good, corpus_eval_rows=0), str(tmp_path / "run"), tok)
  with pytest.raises(ConfigError, match=r"tfds:no_such_corpus_xyz: cannot load TFDS dataset .*not found"):
    corpus.corpus_batchers(_config(tok, "tfds:no_such_corpus_xyz"), str(tmp_path / "run"), tok)


def test_tfds_source_reads_a_locally_built_dataset(tok, docs, tmp_path):
  import tensorflow_datasets as tfds

  class TinyCorpusForTests(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({"body": tfds.features.Text()}))

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples(docs[:30]), "validation": self._generate_examples(docs[30:])}

    def _generate_examples(self, texts):
      for i, text in enumerate(texts):
        yield i, {"body": text}

  data_dir = str(tmp_path / "tfds")
  TinyCorpusForTests(data_dir=data_dir, file_format="array_record").download_and_prepare()
  source = tfds.builder("tiny_corpus_for_tests", data_dir=data_dir).as_data_source("validation")
  in_order = [source[i]["body"].decode("utf-8") for i in range(len(source))]  # TFDS's own order
  config = _config(tok, "tfds:tiny_corpus_for_tests:validation", tfds_dir=data_dir, corpus_field="body")
  np.testing.assert_array_equal(_stream(config, tmp_path / "a", tok),
                                _stream(_config(tok, _jsonl(tmp_path / "c.jsonl", in_order)), tmp_path / "b", tok))
  with pytest.raises(ConfigError, match=r"no feature 'text' \(data.corpus_field\); features: \['body'\]"):
    _stream(_config(tok, "tfds:tiny_corpus_for_tests", tfds_dir=data_dir), tmp_path / "c", tok)


def _dialogue_batchers(config, workdir, tok):
  """Today's LM data, built here step by step: records, encode_dialogue, pack, Batcher."""
  train_recs, eval_recs, _ = train_eval_records(config, workdir)
  t = config.train
  enc = lambda recs: [encode_dialogue(tok, r["chosen"], assistant_only=config.objective == "sft") for r in recs]
  rows = (lambda recs: pack(enc(recs), t.seq_len)) if config.objective == "pretrain" else enc
  return [Batcher(rows(recs), batch_size=t.batch_size, seq_len=t.seq_len, seed=t.seed, pad_id=tok.pad_id)
          for recs in (train_recs, eval_recs)]


@pytest.mark.parametrize("objective,corpus_spec", [("pretrain", ""), ("sft", "corpus.jsonl")])
def test_dialogues_unchanged_without_a_corpus_or_when_not_pretraining(tok, docs, tmp_path, objective, corpus_spec):
  spec = _jsonl(tmp_path / corpus_spec, docs) if corpus_spec else ""
  config = _config(tok, spec, max_examples=60)
  config.objective = objective
  (tmp_path / "run").mkdir()
  got = trainer_data(config, str(tmp_path / "run"), "lm")
  want_train, want_eval = _dialogue_batchers(config, str(tmp_path / "run"), tok)
  assert not isinstance(got.train, corpus.CorpusBatcher) and len(got.train) == len(want_train)
  for p in (0, 3, 250):
    _same_batch(got.train.batch_at(p), want_train.batch_at(p))
  for a, b in zip(got.eval.in_order(), want_eval.in_order(), strict=True):
    _same_batch(a, b)
  assert not (tmp_path / "run" / "corpus").exists()


def test_tokenizer_learns_from_a_bounded_corpus_sample(docs, tmp_path):
  word = "Quetzalcoatlus"  # a rare word the dialogues do not hold, frequent in this corpus
  texts = [d + f" {word}" * 10 for d in docs]
  config = _config(None, _jsonl(tmp_path / "c.jsonl", texts), corpus_tokenizer_chars=sum(map(len, texts[:50])))
  config.model.vocab_size = 512
  assert tokenizer_texts(config, str(tmp_path / "s")) == texts[:50]
  (tmp_path / "run").mkdir()
  trained = trainer_data(config, str(tmp_path / "run"), "lm").tokenizer
  assert trained.path == str(tmp_path / "run" / "tokenizer.model")
  config.objective = "sft"  # dialogues: the word is never seen whole
  dialogue_tok = train_tokenizer(tokenizer_texts(config, str(tmp_path / "d")), 512, str(tmp_path / "d"))
  assert len(trained.encode(f" {word}")) == 1 < len(dialogue_tok.encode(f" {word}"))


def test_paper_sweep_names_a_public_corpus_the_lm_stages_read():

  from rlhf_jax.experiments.config_files import load_module
  from rlhf_jax.experiments.stage_configs import lm_config, pm_config
  config = load_module(os.path.join(os.path.dirname(__file__), os.pardir, "experiments", "paper_sweep.py")).get_config()
  lm = lm_config(config, "/tmp/sweep", "13m")
  assert lm.data.corpus.startswith("https://huggingface.co/") and "/resolve/main/" in lm.data.corpus
  corpus_sources.check(lm)  # a format it reads
  assert corpus.uses_corpus(lm) and pm_config(config, "/tmp/sweep", "13m").data.corpus == ""


def test_train_lm_pretrains_on_the_corpus_unchanged(docs, tmp_path):
  """The trainer needs no change: a few tiny steps read full corpus rows (no padding) and record
  the corpus's row counts."""
  from conftest import small_run_config

  from rlhf_jax.trainers import train_lm
  config = small_run_config(_config(None, _jsonl(tmp_path / "c.jsonl", docs * 2)), 2, max_examples=0)
  config.data.corpus_eval_rows = 8
  out = train_lm.train(config, str(tmp_path / "run"))
  t = config.train
  assert np.isfinite(out["loss"]) and np.isfinite(out["eval_loss"])
  assert out["num_tokens"] == t.batch_size * (t.seq_len - 1)  # every position of every row a target
  with open(tmp_path / "run" / "config.json", encoding="utf-8") as f:
    info = json.load(f)
  stream = corpus.token_stream(config, str(tmp_path / "run"), load_tokenizer(str(tmp_path / "run")))
  train, held_out = corpus.split_rows(stream, t.seq_len, 8)
  assert (info["num_train_examples"], info["num_eval_examples"]) == (len(train), len(held_out)) and len(train) > 8
