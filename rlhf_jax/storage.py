"""Where a run's files live: one path layer for local disk and object storage (gs://, s3://).

Every file a run reads or writes (configs, metrics, tokenizers, stage markers, results, tables,
plots, imports' caches) goes through these functions, which take a path string and send it through
etils.epath, the layer orbax and TFDS use: a local path goes to the OS, `gs://BUCKET/PATH` to gcsfs
(`s3://` to s3fs, where installed). Paths stay strings so that configs and JSON keep them as written.

Object storage differs from a disk in three ways the callers rely on being handled here:
- there is no append: `MetricsWriter` rewrites its object (training.metrics);
- one object's upload is atomic, a rename is a copy: `write_atomic` writes a local file through a
  temporary name and an object directly;
- listings are cached per process: a host must see what another host wrote, so the remote
  filesystem's cache is dropped before every existence check and listing.
A remote failure (missing bucket, refused credentials, a server that stops answering after the
client's bounded retries) is a `StorageError`: one line naming the URL.
"""
from __future__ import annotations

import contextlib
import functools
import io
import logging
import os
import posixpath
import tempfile
from typing import IO, Any, Iterator, Union

from rlhf_jax.errors import StorageError

PathLike = Union[str, "os.PathLike[str]"]
REMOTE_SCHEMES = ("gs://", "s3://")


def is_remote(path: PathLike) -> bool:
  return os.fspath(path).startswith(REMOTE_SCHEMES)


def _epath(path: PathLike):
  from etils import epath  # lazily: the analysis and tests of pure maths never touch storage
  return epath.Path(os.fspath(path))


@functools.lru_cache(maxsize=None)
def _quiet_gcsfs() -> None:
  # gcsfs asks every bucket whether it has a hierarchical namespace and, without application
  # default credentials (an emulator, a token in the environment), logs a warning per call.
  # Its retry loop also logs each failure it gives up on with a traceback; the caller reports it
  # as one StorageError line instead.
  class _NoBucketTypeNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
      message = record.getMessage()
      return not any(s in message for s in ("Could not determine bucket type", "out of retries on exception",
                                            "non-retriable exception"))
  logging.getLogger("gcsfs").addFilter(_NoBucketTypeNotice())


def _fresh(path: PathLike) -> None:
  """Drops the remote filesystem's listing cache, so this host sees what another one wrote."""
  if is_remote(path):
    _quiet_gcsfs()
    p = _epath(path)
    p._backend.fs(os.fspath(p)).invalidate_cache()  # pylint: disable=protected-access


def _remote_errors(fn):
  """A remote call's failure as one line naming the URL; local errors pass through unchanged
  (callers catch FileNotFoundError and friends on both)."""
  @functools.wraps(fn)
  def wrapped(path, *args, **kwargs):
    if not is_remote(path):
      return fn(path, *args, **kwargs)
    _quiet_gcsfs()
    try:
      return fn(path, *args, **kwargs)
    except (FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError):
      raise
    except StorageError:
      raise
    except Exception as e:  # gcsfs/aiohttp raise HttpError, ClientError, OSError, TimeoutError
      raise StorageError(f"{os.fspath(path)}: {describe(e)}") from e
  return wrapped


_TRANSPORT_MESSAGES = ("UNAVAILABLE", "DEADLINE_EXCEEDED", "UNAUTHENTICATED", "PERMISSION_DENIED",
                       "Connection refused", "Connect call failed", "Cannot connect to host")


def transport_error(e: BaseException) -> bool:
  """Whether `e` (or what caused it) is the storage service failing (unreachable, timing out,
  refusing credentials) rather than a file being missing or damaged."""
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    if isinstance(e, (ConnectionError, TimeoutError)) or any(s in str(e) for s in _TRANSPORT_MESSAGES):
      return True
    if type(e).__module__.startswith(("aiohttp", "google.auth")):
      return True
    code = getattr(e, "code", None)
    if type(e).__name__ == "HttpError" and isinstance(code, int) and (code >= 500 or code in (401, 403)):
      return True
    e = e.__cause__ or e.__context__
  return False


def describe(e: BaseException) -> str:
  text = " ".join(str(e).split())
  return f"{type(e).__name__}: {text}"[:300]


def join(path: PathLike, *parts: str) -> str:
  path = os.fspath(path)
  return posixpath.join(path, *parts) if is_remote(path) else os.path.join(path, *parts)


def basename(path: PathLike) -> str:
  path = os.fspath(path).rstrip("/")
  return posixpath.basename(path) if is_remote(path) else os.path.basename(os.path.normpath(path))


def dirname(path: PathLike) -> str:
  path = os.fspath(path).rstrip("/")
  return posixpath.dirname(path) if is_remote(path) else os.path.dirname(path)


def absolute(path: PathLike) -> str:
  """An absolute local path, or the URL as it is."""
  path = os.fspath(path)
  return path.rstrip("/") if is_remote(path) else os.path.abspath(path)


@_remote_errors
def exists(path: PathLike) -> bool:
  _fresh(path)
  return _epath(path).exists()


@_remote_errors
def isdir(path: PathLike) -> bool:
  _fresh(path)
  return _epath(path).is_dir()


@_remote_errors
def isfile(path: PathLike) -> bool:
  _fresh(path)
  return _epath(path).is_file()


@_remote_errors
def makedirs(path: PathLike) -> None:
  """A directory and its parents (on object storage directories are implied by their objects:
  nothing is written)."""
  _epath(path).mkdir(parents=True, exist_ok=True)


@_remote_errors
def listdir(path: PathLike) -> list[str]:
  """Names directly under `path`, sorted."""
  _fresh(path)
  return sorted(p.name for p in _epath(path).iterdir())


@_remote_errors
def walk_files(path: PathLike) -> list[str]:
  """Every file under `path` as a '/'-separated path relative to it, sorted."""
  _fresh(path)
  root = _epath(path)
  bare = lambda p: os.fspath(p).split("://", 1)[-1].rstrip("/")  # fsspec's walk drops the scheme
  out = []
  for dirpath, _, files in root.walk():
    rel = bare(dirpath)[len(bare(root)):].strip("/")
    out += [f"{rel}/{f}" if rel else f for f in files]
  return sorted(out)


@_remote_errors
def open_file(path: PathLike, mode: str = "r", encoding: str = "utf-8") -> IO[Any]:
  """A file object; text modes use `encoding`. Appending to an object is refused, not emulated."""
  if "a" in mode and is_remote(path):
    raise StorageError(f"{os.fspath(path)}: object storage cannot append (rewrite the object instead)")
  if "b" in mode:
    return _epath(path).open(mode)
  return _epath(path).open(mode, encoding=encoding)


@_remote_errors
def read_text(path: PathLike) -> str:
  return _epath(path).read_text(encoding="utf-8")


@_remote_errors
def read_bytes(path: PathLike) -> bytes:
  return _epath(path).read_bytes()


@_remote_errors
def write_atomic(path: PathLike, data: Union[str, bytes]) -> None:
  """Writes the whole file so that a reader (or a killed writer) never sees half of it: locally
  through a temporary name and a rename, remotely as one object upload (atomic by itself)."""
  raw = data.encode("utf-8") if isinstance(data, str) else data
  if is_remote(path):
    _epath(path).write_bytes(raw)
    return
  path = os.fspath(path)
  tmp = f"{path}.{os.getpid()}.tmp"  # each process its own: two writing one file never share a half
  with open(tmp, "wb") as f:
    f.write(raw)
  os.replace(tmp, path)


@_remote_errors
def remove(path: PathLike) -> None:
  _epath(path).unlink()


@_remote_errors
def rmtree(path: PathLike) -> None:
  _epath(path).rmtree()


@_remote_errors
def move(src: PathLike, dst: PathLike) -> None:
  """Moves a file or a directory to `dst` (which must not exist). Local: one atomic rename.
  Remote: a copy of every object, then the deletion of the originals (not atomic)."""
  if not is_remote(src):
    os.replace(src, dst)
    return
  p = _epath(src)
  if p.is_dir():
    for rel in walk_files(src):
      copy(join(src, rel), join(dst, rel))
    p.rmtree()
  else:
    p.rename(_epath(dst))


def save_figure(fig: Any, path: PathLike, **savefig_kwargs: Any) -> str:
  """A matplotlib figure written to `path` (its format from the suffix); returns the path."""
  buf = io.BytesIO()
  fig.savefig(buf, format=os.fspath(path).rsplit(".", 1)[-1], **savefig_kwargs)
  write_atomic(path, buf.getvalue())
  return os.fspath(path)


def copy(src: PathLike, dst: PathLike) -> None:
  """Copies one file, between any two places (local or remote)."""
  write_atomic(dst, read_bytes(src))


@contextlib.contextmanager
def local_copy(path: PathLike) -> Iterator[str]:
  """A local file with the contents of `path`, for a library that opens files by name itself; a
  local path is handed over as it is."""
  if not is_remote(path):
    yield os.fspath(path)
    return
  with tempfile.TemporaryDirectory(prefix="rlhf_jax-") as d:
    local = os.path.join(d, basename(path))
    with open(local, "wb") as f:
      f.write(read_bytes(path))
    yield local


def check_writable(workdir: PathLike) -> None:
  """Fails early, with one line, where a run could not write its directory: a missing bucket,
  refused credentials, an unreachable server (each named by its URL)."""
  probe = join(workdir, ".rlhf_jax_write_check")
  try:
    makedirs(workdir)
    write_atomic(probe, b"ok")
    if read_bytes(probe) != b"ok":
      raise StorageError(f"{os.fspath(workdir)}: wrote a probe object and read back something else")
    remove(probe)
  except StorageError:
    raise
  except OSError as e:
    raise StorageError(f"{os.fspath(workdir)}: cannot write the run directory ({describe(e)})") from e
