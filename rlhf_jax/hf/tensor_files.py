"""safetensors files: read by memory map, written one tensor at a time.

The format (github.com/huggingface/safetensors) is an 8-byte little-endian header length, a JSON
header {name: {dtype, shape, data_offsets}, "__metadata__": {...}} and the raw little-endian
tensors: data only, nothing executed on load. Reading through np.memmap means a sharded load
touches only the bytes of its own slices; the safetensors package's numpy reader cannot read
bfloat16, the dtype most checkpoints are stored in. (Little-endian hosts, as every JAX platform is.)
"""
from __future__ import annotations

import json
import os
import struct
import tempfile
from typing import Callable, Iterable, NamedTuple

import ml_dtypes
import numpy as np

from rlhf_jax import storage
from rlhf_jax.errors import ConfigError, DataError

DTYPES = {"F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
          "BF16": np.dtype(ml_dtypes.bfloat16)}
NAMES = {dtype: name for name, dtype in DTYPES.items()}
INDEX_FILE = "model.safetensors.index.json"
MAX_HEADER = 100 * 2 ** 20  # the reference implementation's bound


class TensorInfo(NamedTuple):
  path: str
  dtype: np.dtype
  shape: tuple[int, ...]
  offset: int  # of the first byte, from the start of the file


def read_header(path: str) -> tuple[dict[str, TensorInfo], dict]:
  """({name: TensorInfo}, metadata) of one file; a malformed file is a DataError naming it."""
  size = os.path.getsize(path)
  with open(path, "rb") as f:
    head = f.read(8)
    n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
    if not 0 < n <= min(MAX_HEADER, size - 8):
      raise DataError(f"{path}: not a safetensors file (header length {n}, file size {size})")
    try:
      header = json.loads(f.read(n))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
      raise DataError(f"{path}: unreadable safetensors header ({e})") from None
  metadata = header.pop("__metadata__", None) or {}
  tensors = {}
  for name, entry in header.items():
    if entry.get("dtype") not in DTYPES:
      raise DataError(f"{path}: tensor {name} has dtype {entry.get('dtype')}; floating-point weights "
                      f"({', '.join(DTYPES)}) expected")
    dtype, shape = DTYPES[entry["dtype"]], tuple(int(d) for d in entry["shape"])
    begin, stop = entry["data_offsets"]
    if stop - begin != int(np.prod(shape)) * dtype.itemsize or not 0 <= begin <= stop <= size - 8 - n:
      raise DataError(f"{path}: tensor {name} (shape {list(shape)}, {entry['dtype']}) has byte range "
                      f"[{begin}, {stop}), which does not fit it or the file (truncated?)")
    tensors[name] = TensorInfo(path, dtype, shape, 8 + n + begin)
  return tensors, metadata


def tensor(info: TensorInfo) -> np.ndarray:
  """The tensor as a read-only memory map: slicing it reads only the slice."""
  if not info.shape or 0 in info.shape:
    return np.zeros(info.shape, info.dtype)
  return np.memmap(info.path, dtype=info.dtype, mode="r", offset=info.offset, shape=info.shape)


def index_directory(directory: str) -> dict[str, TensorInfo]:
  """Every tensor of a model directory: the files its model.safetensors.index.json names, else
  every *.safetensors file in it. A name twice, or a name the index puts in a file that lacks
  it, is an error naming both."""
  index_path = os.path.join(directory, INDEX_FILE)
  if os.path.exists(index_path):
    with open(index_path, encoding="utf-8") as f:
      weight_map = json.load(f).get("weight_map")
    if not isinstance(weight_map, dict):
      raise ConfigError(f"{index_path}: no weight_map")
    files = sorted(set(weight_map.values()))
  else:
    weight_map = None
    files = sorted(f for f in os.listdir(directory) if f.endswith(".safetensors"))
  if not files:
    raise ConfigError(f"{directory}: no *.safetensors files (pickled *.bin checkpoints are not read: "
                      f"convert them to safetensors first)")
  out: dict[str, TensorInfo] = {}
  for name in files:
    path = os.path.join(directory, name)
    if not os.path.exists(path):
      raise ConfigError(f"{index_path} names {name}, which is not in {directory}")
    for key, info in read_header(path)[0].items():
      if key in out:
        raise ConfigError(f"tensor {key} is in both {out[key].path} and {path}")
      out[key] = info
  for key, name in (weight_map or {}).items():
    if key not in out or os.path.basename(out[key].path) != name:
      raise ConfigError(f"{index_path} puts tensor {key} in {name}, which does not hold it")
  return out


def write(path: str, entries: Iterable[tuple[str, np.dtype, tuple[int, ...]]],
          fetch: Callable[[str], np.ndarray], metadata: dict[str, str]) -> None:
  """Writes a safetensors file of entries (name, dtype, shape) in that order; fetch(name) gives
  each tensor when its turn comes, so only one is ever held. Written to path.tmp, then renamed; a
  path in a bucket is written on local disk first, then uploaded (read whole: an object is one upload)."""
  if storage.is_remote(path):
    with tempfile.TemporaryDirectory(prefix="rlhf_jax-") as d:
      local = os.path.join(d, storage.basename(path))
      write(local, entries, fetch, metadata)
      storage.copy(local, path)
    return
  entries = list(entries)
  header, offset = {}, 0
  for name, dtype, shape in entries:
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    header[name] = {"dtype": NAMES[np.dtype(dtype)], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
    offset += nbytes
  text = json.dumps({"__metadata__": metadata, **header}, separators=(",", ":")).encode()
  text += b" " * (-len(text) % 8)  # the tensors start 8-byte aligned, as the reference writer does
  tmp = path + ".tmp"
  with open(tmp, "wb") as f:
    f.write(struct.pack("<Q", len(text)) + text)
    for name, dtype, shape in entries:
      array = np.ascontiguousarray(fetch(name))
      if array.dtype != np.dtype(dtype) or array.shape != tuple(shape):
        raise ValueError(f"{name}: got {array.dtype}{list(array.shape)}, expected {np.dtype(dtype)}{list(shape)}")
      f.write(array.tobytes())
  os.replace(tmp, path)
