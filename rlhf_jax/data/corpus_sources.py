"""The documents of a pretraining corpus (data.corpus), read in order from its sources.

data.corpus names comma-separated sources, each read whole and in order:
  PATH or URL ending .jsonl / .json (+ .gz)   JSON Lines: one object a line, the text in data.corpus_field
  PATH or URL ending .txt (+ .gz)             one document: the whole file (many documents: use JSON Lines)
  tfds:NAME[:SPLIT]                           a TFDS dataset in data.tfds_dir (ArrayRecord, no TensorFlow),
                                              the text in the feature data.corpus_field; SPLIT "train" by default
An http(s) URL is downloaded once into <cache>/downloads/ (data.corpus_cache_dir, "" = <workdir>/corpus),
under a temporary name renamed when complete, so an interrupted download is never read as a whole file.
A PATH may be in a bucket (gs://...), read as it streams. A cache or data.tfds_dir in a bucket is
stood in for by a directory on this host's disk (locations.local_cache): the token cache is
memory-mapped and TFDS's ArrayRecord files are opened by C++, neither of which reaches a bucket.
A malformed line stops the run with file, line and field; data.skip_malformed=True skips and counts it.
"""
from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import os
import shutil
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from typing import Iterator

from rlhf_jax import storage
from rlhf_jax.data import locations
from rlhf_jax.errors import ConfigError

TFDS_PREFIX = "tfds:"
_KINDS = {".jsonl": "jsonl", ".json": "jsonl", ".txt": "txt"}
_SKIP_HINT = "data.skip_malformed=True skips and counts such lines"


def sources(config) -> list[str]:
  """data.corpus split at commas; [] when it is empty (the hh-rlhf dialogues are used)."""
  return [s.strip() for s in (config.data.get("corpus") or "").split(",") if s.strip()]


def cache_dir(config, workdir: str) -> str:
  """The corpus cache: always a local directory (for a configured one in a bucket, this host's own)."""
  return locations.local_cache("corpus", config.data.get("corpus_cache_dir") or storage.join(workdir, "corpus"))


def is_url(source: str) -> bool:
  return source.startswith(("http://", "https://"))


def _kind(source: str) -> str:
  name = urllib.parse.urlparse(source).path if is_url(source) else source
  name = name[:-3] if name.endswith(".gz") else name
  kind = _KINDS.get(os.path.splitext(name)[1])
  if kind is None:
    raise ConfigError(f"data.corpus: {source}: expected a .jsonl, .json or .txt file (optionally .gz), "
                      f"an http(s) URL of one, or tfds:NAME[:SPLIT]")
  return kind


def identity(config, workdir: str, source: str) -> str:
  """What the token cache is keyed by: a URL (downloaded once, never changes), a local file's
  path, size and modification time, a TFDS dataset's name, split and data_dir."""
  if source.startswith(TFDS_PREFIX):
    return f"{source}@{storage.absolute(tfds_dir(config, workdir))}"
  if is_url(source):
    return source
  path = _local(source)
  if storage.is_remote(path):  # an object's size and update time, as a file's below
    from etils import epath  # the layer rlhf_jax.storage goes through; it has no stat of its own
    stat = epath.Path(path).stat()
    return f"{path}:{stat.length}:{stat.mtime}"
  stat = os.stat(path)
  return f"{os.path.abspath(path)}:{stat.st_size}:{stat.st_mtime_ns}"


def check(config) -> None:
  """Fails fast, before any download or tokenising, on a source that cannot be read."""
  for source in sources(config):
    if not source.startswith(TFDS_PREFIX):
      _kind(source)
      if not is_url(source):
        _local(source)


def _local(source: str) -> str:
  path = source if storage.is_remote(source) else os.path.expanduser(source)
  if not storage.isfile(path):
    raise ConfigError(f"data.corpus: {source}: no such file")
  return path


def download(url: str, directory: str) -> str:
  """The local copy of url in directory/downloads, fetched once; atomic, so safe to share."""
  name = os.path.basename(urllib.parse.urlparse(url).path) or "corpus"
  path = os.path.join(directory, "downloads", f"{hashlib.sha256(url.encode()).hexdigest()[:16]}-{name}")
  if os.path.exists(path):
    return path
  os.makedirs(os.path.dirname(path), exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=f".{name}.", suffix=".part")
  try:
    with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as response:
      shutil.copyfileobj(response, out, 1 << 20)
    os.replace(tmp, path)
  except (OSError, ValueError) as e:  # URLError, HTTPError and timeouts are OSErrors
    reason = getattr(e, "reason", None) or e
    raise ConfigError(f"data.corpus: cannot download {url} ({reason}); offline, fetch it elsewhere and name "
                      f"the local file in data.corpus") from None
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return path


def tfds_dir(config, workdir: str) -> str:
  """data.tfds_dir as configured (a bucket's is read through a local stand-in: _tfds_documents)."""
  return config.data.get("tfds_dir") or storage.join(workdir, "tfds")


def documents(config, workdir: str, skipped: dict) -> Iterator[str]:
  """Every document of data.corpus in order (at most data.max_examples, 0 = all). Malformed lines
  skipped (data.skip_malformed) are counted in skipped[source][problem] and printed."""
  d = config.data
  limit, count = d.get("max_examples") or 0, 0
  for source in sources(config):
    for text in _source_documents(config, workdir, source, skipped.setdefault(source, {})):
      if limit and count >= limit:
        return
      count += 1
      yield text


def _source_documents(config, workdir: str, source: str, skipped: dict) -> Iterator[str]:
  field = config.data.get("corpus_field") or "text"
  if source.startswith(TFDS_PREFIX):
    yield from _tfds_documents(source, field, tfds_dir(config, workdir))
    return
  kind = _kind(source)
  path = download(source, cache_dir(config, workdir)) if is_url(source) else _local(source)
  try:
    if kind == "txt":
      yield _txt_document(source, path)
    else:
      yield from _jsonl_documents(source, path, field, config.data.skip_malformed, skipped)
  except (OSError, EOFError) as e:  # a corrupt or truncated gzip, a file that vanished
    raise ConfigError(f"data.corpus: {source}: cannot read ({e})") from None
  finally:
    if skipped:
      print(f"data.corpus: {source}: skipped {sum(skipped.values())} malformed lines {skipped}")


@contextlib.contextmanager
def _open(path: str):
  if not storage.is_remote(path):
    with gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb") as f:
      yield f
    return
  with storage.open_file(path, "rb") as raw:  # streamed: a corpus may not fit in memory
    if not path.endswith(".gz"):
      yield raw
      return
    with gzip.GzipFile(fileobj=raw, mode="rb") as f:
      yield f


def _txt_document(source: str, path: str) -> str:
  with _open(path) as f:
    data = f.read()
  try:
    return data.decode("utf-8")
  except UnicodeDecodeError as e:
    raise ConfigError(f"data.corpus: {source}: not UTF-8 text (byte {e.start})") from None


def _problem(line: bytes, field: str) -> tuple[str | None, str, str]:
  """(problem, its short name for the counts, the text): problem None for a good line."""
  try:
    record = json.loads(line)
  except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
    return f"not JSON ({e})", "not JSON", ""
  if not isinstance(record, dict):
    return f"not a JSON object but {type(record).__name__}", "not an object", ""
  if field not in record:
    return f"no field {field!r} (data.corpus_field; fields: {sorted(record)[:8]})", f"no {field!r}", ""
  if not isinstance(record[field], str):
    return f"field {field!r} is {type(record[field]).__name__}, not text", f"{field!r} not text", ""
  return None, "", record[field]


def _jsonl_documents(source: str, path: str, field: str, skip_malformed: bool, skipped: dict) -> Iterator[str]:
  with _open(path) as f:
    for number, line in enumerate(f, 1):
      if not line.strip():  # blank lines (a trailing newline) hold no record
        continue
      problem, short, text = _problem(line, field)
      if problem is None:
        yield text
      elif skip_malformed:
        skipped[short] = skipped.get(short, 0) + 1
      else:
        raise ConfigError(f"data.corpus: {source} line {number}: {problem}; {_SKIP_HINT}")


def _tfds_documents(source: str, field: str, data_dir: str) -> Iterator[str]:
  parts = source[len(TFDS_PREFIX):].split(":")
  name, split = parts[0], (parts[1] if len(parts) > 1 and parts[1] else "train")
  import tensorflow_datasets as tfds  # heavy: only a tfds: corpus pays for it
  tfds.disable_progress_bar()
  try:
    make = lambda: tfds.builder(name, data_dir=locations.local_cache("tfds", data_dir), file_format="array_record")
    with locations.preparing(os.fspath(make().data_dir)):
      builder = make()  # made again under the lock: what another process prepared meanwhile is read
      builder.download_and_prepare()  # a no-op where data_dir holds it prepared already
    data = builder.as_data_source(split)
  except Exception as e:  # TFDS raises many kinds; any of them means this source cannot be read
    first_line = (str(e).splitlines() or [""])[0]
    raise ConfigError(f"data.corpus: {source}: cannot load TFDS dataset {name!r} split {split!r} from "
                      f"{data_dir} (data.tfds_dir): {type(e).__name__}: {first_line}") from None
  features = builder.info.features
  if field not in features:
    raise ConfigError(f"data.corpus: {source}: no feature {field!r} (data.corpus_field); features: {sorted(features)}")
  for i in range(len(data)):
    text = data[i][field]
    yield text.decode("utf-8") if isinstance(text, bytes) else str(text)
