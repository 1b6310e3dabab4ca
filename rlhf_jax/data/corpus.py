"""Pretraining on a text corpus (data.corpus) instead of the hh-rlhf dialogues, as Bai et al. pretrained
on a general corpus first; the sources and their formats are in rlhf_jax.data.corpus_sources.

Each document is tokenised as the dialogue packing does (batching.pack): BOS where the tokenizer's
model has one (not a target), the text, EOS; the documents are concatenated in source order and
the stream is cut into rows of train.seq_len, every token but BOS a target, no padding.

The stream is tokenised once into <cache>/tokens-<key>.npy (with the documents' start offsets and a
JSON record beside it; cache = data.corpus_cache_dir, "" = <workdir>/corpus, where a local directory
stands in for one in a bucket: corpus_sources.cache_dir), written under temporary names and renamed,
the record last. key = sha256 of the sources (a URL, or a file's path, size and modification time),
data.corpus_field, data.max_examples, data.skip_malformed and the tokenizer
(its file and BOS / EOS ids). The file is memory-mapped: a batch is a slice, and a resumed run
reads the same rows without tokenising anything again.

Rows are read in order, never shuffled: the corpus is assumed shuffled already (shuffle it once if not).
The first data.corpus_eval_rows rows are held out for evaluation. Training starts at the first
document that starts after them (the one document straddling the boundary is read by neither),
and position p (rows consumed, TrainState.data_position) reads training row p mod their number:
a second epoch repeats the first's order.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from itertools import chain, islice
from typing import Iterable, Iterator, NamedTuple, Sequence

import numpy as np

from rlhf_jax import storage
from rlhf_jax.data import corpus_sources
from rlhf_jax.data.batching import Batcher, Encoded
from rlhf_jax.data.json_tokenizer import SPECIALS_FILE
from rlhf_jax.errors import ConfigError

CACHE_VERSION = 1  # bump when the layout of the cache files or the tokenising conventions change
_CHUNK = 512  # documents encoded per encode_batch call


class TokenStream(NamedTuple):
  tokens: np.ndarray  # [num_tokens], memory-mapped
  starts: np.ndarray  # [num_documents] int64: offset of each document's first token (BOS, if any)
  bos: bool  # each document opens with a BOS, which is not a training target
  skipped: int  # malformed lines skipped when the stream was built


def uses_corpus(config) -> bool:
  """data.corpus is set and the objective is pretraining (SFT and distillation read dialogues)."""
  return bool(corpus_sources.sources(config)) and config.objective == "pretrain"


def sample_texts(config, workdir: str) -> Iterator[str]:
  """The first documents, up to data.corpus_tokenizer_chars characters: what a tokenizer trained
  for this corpus learns from (a bounded sample; it includes the held-out documents)."""
  corpus_sources.check(config)
  budget = config.data.get("corpus_tokenizer_chars") or 20_000_000
  for text in corpus_sources.documents(config, workdir, {}):
    if budget <= 0:
      return
    budget -= len(text)
    yield text


def _tokenizer_identity(tok) -> str:
  digest = hashlib.sha256()
  for path in (tok.path, storage.join(storage.dirname(tok.path), SPECIALS_FILE)):
    if storage.exists(path):  # the tokenizer may live in a run directory in a bucket
      digest.update(storage.read_bytes(path))
  return f"{digest.hexdigest()}:bos={tok.bos_prefix()}:eos={tok.eos_id}"


def cache_key(config, workdir: str, tok) -> str:
  d = config.data
  parts = {"version": CACHE_VERSION, "tokenizer": _tokenizer_identity(tok),
           "sources": [corpus_sources.identity(config, workdir, s) for s in corpus_sources.sources(config)],
           "field": d.get("corpus_field") or "text", "max_examples": d.get("max_examples") or 0,
           "skip_malformed": bool(d.skip_malformed)}
  return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:20]


def _token_dtype(tok) -> np.dtype:
  return np.dtype(np.uint16 if tok.vocab_size <= 1 << 16 else np.int32)  # half the disk for small vocabularies


def _encoded(tok, docs: Iterable[str]) -> Iterator[list[list[int]]]:
  """Chunks of documents as [BOS] + text + [EOS], the conventions of batching.encode_dialogue."""
  encode = getattr(tok, "encode_batch", None) or (lambda texts: [tok.encode(t) for t in texts])
  bos, docs = tok.bos_prefix(), iter(docs)
  while chunk := list(islice(docs, _CHUNK)):
    yield [bos + ids + [tok.eos_id] for ids in encode(chunk)]


def _write_raw(docs: Iterable[str], tok, tokens_file, starts_file) -> tuple[int, int]:
  """Appends the stream's tokens and the documents' start offsets to two raw files: (tokens, documents)."""
  num_tokens = num_docs = 0
  dtype = _token_dtype(tok)
  for chunk in _encoded(tok, docs):
    lengths = np.array([len(ids) for ids in chunk], np.int64)
    (num_tokens + np.cumsum(lengths) - lengths).tofile(starts_file)
    np.fromiter(chain.from_iterable(chunk), dtype, count=int(lengths.sum())).tofile(tokens_file)
    num_tokens, num_docs = num_tokens + int(lengths.sum()), num_docs + len(chunk)
  return num_tokens, num_docs


def _raw_to_npy(raw: str, dtype: np.dtype, count: int, path: str) -> None:
  """A raw file of count items as a .npy file at path, replaced atomically."""
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".npy.", suffix=".part")
  try:
    with os.fdopen(fd, "wb") as out, open(raw, "rb") as src:
      np.lib.format.write_array_header_1_0(out, {"descr": np.lib.format.dtype_to_descr(dtype),
                                                 "fortran_order": False, "shape": (count,)})
      shutil.copyfileobj(src, out, 1 << 24)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def _write_json(path: str, record: dict) -> None:
  tmp = f"{path}.{os.getpid()}.part"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(record, f, indent=1)
  os.replace(tmp, path)  # last: the stream counts as cached only once its record exists


def _paths(directory: str, key: str) -> tuple[str, str, str]:
  stem = os.path.join(directory, f"tokens-{key}")
  return f"{stem}.npy", f"{stem}.starts.npy", f"{stem}.json"


def _build(config, workdir: str, tok, key: str) -> None:
  directory = corpus_sources.cache_dir(config, workdir)
  os.makedirs(directory, exist_ok=True)
  tokens_path, starts_path, record_path = _paths(directory, key)
  skipped: dict = {}
  raws = [tempfile.mkstemp(dir=directory, prefix=".raw.", suffix=".part") for _ in range(2)]
  try:
    with os.fdopen(raws[0][0], "wb") as tokens_file, os.fdopen(raws[1][0], "wb") as starts_file:
      num_tokens, num_docs = _write_raw(corpus_sources.documents(config, workdir, skipped), tok, tokens_file,
                                        starts_file)
    num_skipped = sum(n for per_source in skipped.values() for n in per_source.values())
    if not num_docs:
      raise ConfigError(f"data.corpus={config.data.corpus!r}: no documents"
                        + (f" ({num_skipped} malformed lines skipped)" if num_skipped else ""))
    _raw_to_npy(raws[0][1], _token_dtype(tok), num_tokens, tokens_path)
    _raw_to_npy(raws[1][1], np.dtype(np.int64), num_docs, starts_path)
  finally:
    for _, raw in raws:
      if os.path.exists(raw):
        os.remove(raw)
  _write_json(record_path, {"version": CACHE_VERSION, "sources": corpus_sources.sources(config),
                            "num_tokens": num_tokens, "num_documents": num_docs, "bos": bool(tok.bos_prefix()),
                            "skipped": {s: c for s, c in skipped.items() if c}, "num_skipped": num_skipped})
  print(f"data.corpus: {num_docs} documents, {num_tokens} tokens, cached in {tokens_path}")


def token_stream(config, workdir: str, tok) -> TokenStream:
  """The corpus as one memory-mapped token stream, tokenised on the first call only."""
  corpus_sources.check(config)
  key = cache_key(config, workdir, tok)
  tokens_path, starts_path, record_path = _paths(corpus_sources.cache_dir(config, workdir), key)
  if not os.path.exists(record_path):
    _build(config, workdir, tok, key)
  with open(record_path, encoding="utf-8") as f:
    record = json.load(f)
  if record["num_skipped"]:  # a resumed run says it again: the count is part of what it trained on
    print(f"data.corpus: {record['num_skipped']} malformed lines skipped {record['skipped']}")
  return TokenStream(np.load(tokens_path, mmap_mode="r"), np.load(starts_path, mmap_mode="r"), record["bos"],
                     record["num_skipped"])


class PackedRows(Sequence):
  """Rows of seq_len tokens cut from a token stream: row i is tokens[start + i*seq_len:][:seq_len],
  read from the memory map when asked for."""

  def __init__(self, stream: TokenStream, start: int, num_rows: int, seq_len: int):
    self.stream, self.start, self.num_rows, self.seq_len = stream, start, num_rows, seq_len

  def __len__(self) -> int:
    return self.num_rows

  def __getitem__(self, i):
    if isinstance(i, slice):
      return [self[j] for j in range(*i.indices(self.num_rows))]
    if not -self.num_rows <= i < self.num_rows:
      raise IndexError(f"row {i} of {self.num_rows}")
    begin = self.start + (i % self.num_rows) * self.seq_len
    tokens = np.asarray(self.stream.tokens[begin:begin + self.seq_len], np.int32)
    mask = np.ones(self.seq_len, bool)
    if self.stream.bos:  # BOS opens a document; nothing before it predicts it
      starts = self.stream.starts
      mask[starts[np.searchsorted(starts, begin):np.searchsorted(starts, begin + self.seq_len)] - begin] = False
    return Encoded(tokens, mask)


class CorpusBatcher(Batcher):
  """The Batcher interface over packed corpus rows, in stream order: position p reads row p mod len."""

  def __init__(self, rows: PackedRows, *, batch_size: int, seq_len: int, seed: int, pad_id: int):
    # Not Batcher.__init__: it would read every row into memory; these are read as batches ask.
    self.batch_size, self.seq_len, self.seed, self.pad_id = batch_size, seq_len, seed, pad_id
    self.examples = rows

  def _index(self, p: int) -> int:
    return p % len(self.examples)


def split_rows(stream: TokenStream, seq_len: int, eval_rows: int) -> tuple[PackedRows, PackedRows]:
  """(train rows, eval rows): the first eval_rows rows, then rows from the first document starting
  after them."""
  num_tokens = len(stream.tokens)
  first = int(np.searchsorted(stream.starts, eval_rows * seq_len))
  train_start = int(stream.starts[first]) if first < len(stream.starts) else num_tokens
  num_train = max(0, (num_tokens - train_start) // seq_len)
  return PackedRows(stream, train_start, num_train, seq_len), PackedRows(stream, 0, eval_rows, seq_len)


def corpus_batchers(config, workdir: str, tok) -> tuple[CorpusBatcher, CorpusBatcher, int]:
  """(train batcher, eval batcher, malformed lines skipped) of data.corpus, for the LM trainer."""
  t, d = config.train, config.data
  eval_rows = d.get("corpus_eval_rows", 0)
  if not isinstance(eval_rows, int) or eval_rows < 1:
    raise ConfigError(f"data.corpus_eval_rows={eval_rows!r}: must be a positive number of held-out rows")
  stream = token_stream(config, workdir, tok)
  train, held_out = split_rows(stream, t.seq_len, eval_rows)
  if eval_rows * t.seq_len > len(stream.tokens) or len(train) < t.batch_size:
    raise ConfigError(
        f"data.corpus={d.corpus!r} is shorter than one batch: {len(stream.tokens)} tokens in "
        f"{len(stream.starts)} documents make {len(train)} training rows of train.seq_len={t.seq_len} after "
        f"data.corpus_eval_rows={eval_rows} held out; train.batch_size={t.batch_size} needs more than "
        f"{(eval_rows + t.batch_size) * t.seq_len} tokens (more documents, or lower these settings)")
  make = lambda rows: CorpusBatcher(rows, batch_size=t.batch_size, seq_len=t.seq_len, seed=t.seed,
                                    pad_id=tok.pad_id)
  return make(train), make(held_out), stream.skipped
