"""Scalar metrics logging: one JSON line per step in `<logdir>/metrics.jsonl`, mirrored to TensorBoard.

The JSONL file is the record of truth: it needs no TensorBoard to read, survives a killed process
(each line is flushed as it is written) and a reopened writer appends to it, so a resumed run
continues the same file. TensorBoard events go to `<logdir>/tb` via tensorboardX (no TensorFlow).

A logdir on object storage (gs://, rlhf_jax.storage) cannot be appended to: the writer keeps the
file's lines in memory and rewrites the whole object at most every FLUSH_SECONDS while writing, and
on `flush()` and `close()` (the training loop flushes before each checkpoint, so a resumed run's
metrics are complete up to its last checkpoint). Its TensorBoard events are written to a local
temporary directory and uploaded to `<logdir>/tb/` at the same moments: tensorboardX's own gs://
writer uploads from a background thread (a failure there stalls `add_scalar` once its queue
fills) and is kept alive by an atexit hook that uploads again at exit.

Only one process should write a given logdir: on multi-process jobs the lead process
(rlhf_jax.hosts) constructs the writer, the others an UnwrittenMetrics.
"""
from __future__ import annotations

import collections
import contextlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
import uuid
from typing import Any, Iterable, Iterator, Mapping, Optional, Union

import jax
import numpy as np
import tqdm

from rlhf_jax import storage

METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.json"
TB_DIR = "tb"
# Wall-clock figures of a metrics row: two runs of the same steps differ in these and nothing else.
TIMING_KEYS = ("steps_per_second", "first_step_seconds")
FLUSH_SECONDS = 5.0  # how stale a remote metrics object may get while a run writes


def without_timings(row: Mapping[str, Any]) -> dict:
  return {k: v for k, v in row.items() if k not in TIMING_KEYS}


class StepClock:
  """The steady training rate of a loop that starts at step `start`. The first step a process
  runs compiles it: that step is timed on its own (first_step_seconds, reported once), and
  steps_per_second counts the steps after it, leaving out the time spent in `paused()` blocks
  (evaluations)."""

  def __init__(self, start: int):
    self.start, self.t0 = start, time.perf_counter()
    self.first: Optional[float] = None
    self.since: Optional[float] = None
    self.paused_seconds, self.reported_first = 0.0, False

  def stepped(self, outputs: Any) -> None:
    """After each step; on the first, waits for its outputs (one host sync per process)."""
    if self.since is None:
      jax.block_until_ready(outputs)
      self.since = time.perf_counter()
      self.first = self.since - self.t0

  @contextlib.contextmanager
  def paused(self) -> Iterator[None]:
    t = time.perf_counter()
    try:
      yield
    finally:
      self.paused_seconds += time.perf_counter() - t

  def rates(self, step: int) -> dict[str, float]:
    """The timing keys to log at `step` (after at least one `stepped`)."""
    out = {}
    if not self.reported_first:
      out["first_step_seconds"], self.reported_first = self.first, True
    if step > self.start + 1:
      out["steps_per_second"] = (step - self.start - 1) / (time.perf_counter() - self.since - self.paused_seconds)
    return out


def to_scalar(value: Any) -> Union[bool, int, float]:
  """Python bool/int/float for a Python, numpy or jax scalar (0-d array); rejects anything else."""
  # Python numbers first: np.asarray would turn an int beyond int64 into an object array.
  if isinstance(value, bool):
    return value
  if isinstance(value, int):
    return int(value)
  if isinstance(value, float):  # includes np.float64, a float subclass
    return float(value)
  arr = np.asarray(value)  # pulls jax arrays to host
  if arr.ndim != 0:
    raise ValueError(f"metric must be a scalar, got shape {arr.shape}")
  if arr.dtype == np.bool_:
    return bool(arr)
  if arr.dtype.kind in "iu":
    return int(arr)  # keep integers exact (counts, token totals) rather than rounding via float
  # bfloat16 (ml_dtypes, what jax returns for bf16) has kind 'V', so it is named explicitly.
  if arr.dtype.kind == "f" or arr.dtype.name == "bfloat16":
    return float(arr)
  # Strings, objects and complex numbers are not values a plot can show.
  raise TypeError(f"metric must be real-valued, got dtype {arr.dtype}")


class MetricsWriter:
  """Appends `{"step": step, **metrics}` lines to `<logdir>/metrics.jsonl` and TensorBoard scalars.

  Non-finite values (NaN, +-inf) are written to the JSONL file as `null`: `json.dumps` would
  otherwise emit the bare token `NaN`, which strict JSON parsers (jq, JavaScript) reject, and the
  file must stay readable by any tool. The loss of which non-finite value it was is accepted; the
  TensorBoard copy keeps the real value, and `nonfinite` counts the replacements per key so a run
  can notice (and e.g. stop on) a diverging metric.
  """

  def __init__(self, logdir: str, *, tensorboard: bool = True, flush_seconds: Optional[float] = None):
    self.logdir, self.remote = logdir, storage.is_remote(logdir)
    self.flush_seconds = FLUSH_SECONDS if flush_seconds is None else flush_seconds
    storage.makedirs(logdir)
    self.path = storage.join(logdir, METRICS_FILE)
    self.closed = False
    self.nonfinite: collections.Counter[str] = collections.Counter()
    self._file, self._lines, self._dirty = None, [], False
    self._uploaded_at, self._tb_sent = -math.inf, {}
    if self.remote:
      lines = _complete_lines(self.path)
      self._lines, self._dirty = lines or [], lines is None  # none yet: an empty file, as a local writer leaves
    else:
      _drop_torn_tail(self.path)
      self._file = open(self.path, "a", encoding="utf-8")
    self._tb, self._tb_dir = None, None
    if tensorboard:
      # Imported lazily so JSONL-only users (tests, analysis scripts) do not pay for it.
      from tensorboardX import SummaryWriter
      self._tb_dir = tempfile.mkdtemp(prefix="rlhf_jax-tb-") if self.remote else storage.join(logdir, TB_DIR)
      # tensorboardX names event files by the second and hostname and opens them with "wb", so a
      # writer reopened within the same second (a fast restart) would erase the earlier file;
      # a unique suffix keeps each writer's events in a file of its own.
      self._tb = SummaryWriter(logdir=self._tb_dir, filename_suffix=f".{os.getpid()}.{uuid.uuid4().hex[:8]}")
    if self.remote and self._dirty:
      self._upload()
      self._uploaded_at = -math.inf  # that was the empty file: the first row still goes up at once

  def write(self, step: int, metrics: Mapping[str, Any]) -> None:
    if self.closed:
      raise ValueError("MetricsWriter is closed")
    if "step" in metrics:
      raise ValueError("'step' is reserved for the step number")
    step = int(step)
    values = {k: to_scalar(v) for k, v in metrics.items()}
    record: dict[str, Any] = {"step": step}
    for k, v in values.items():
      if isinstance(v, float) and not math.isfinite(v):
        self.nonfinite[k] += 1
        v = None
      record[k] = v
    line = json.dumps(record, allow_nan=False) + "\n"
    if self.remote:
      self._lines.append(line)
      self._dirty = True
    else:
      # One write of a complete line, then flush: a killed process leaves at most a torn last line.
      self._file.write(line)
      self._file.flush()
    if self._tb is not None:
      for k, v in values.items():
        self._tb.add_scalar(k, float(v), step)
    if self.remote and time.monotonic() - self._uploaded_at >= self.flush_seconds:
      self.flush()

  def write_config(self, config: Mapping[str, Any]) -> None:
    """Writes `<logdir>/config.json` (replacing it), so a run's settings sit beside its metrics."""
    text = json.dumps(dict(config), indent=2, sort_keys=True, default=_config_default) + "\n"
    storage.write_atomic(storage.join(self.logdir, CONFIG_FILE), text)  # a reader never sees half of it

  def flush(self) -> None:
    """Everything written so far, on disk or in the bucket (TensorBoard: what tensorboardX's
    worker has taken from its queue; all of it on close)."""
    if self.closed:
      return
    if self._file is not None:
      self._file.flush()
    if self._tb is not None:
      self._tb.flush()
    if self.remote:
      self._upload()

  def _upload(self) -> None:
    """Rewrites the metrics object (when it changed) and uploads the event files that grew."""
    if self._dirty:
      storage.write_atomic(self.path, "".join(self._lines))
      self._dirty = False
    if self._tb_dir is not None:
      for name in sorted(os.listdir(self._tb_dir)):
        local = os.path.join(self._tb_dir, name)
        size = os.path.getsize(local)
        if size != self._tb_sent.get(name):  # an event file only grows
          with open(local, "rb") as f:
            storage.write_atomic(storage.join(self.logdir, TB_DIR, name), f.read())
          self._tb_sent[name] = size
    self._uploaded_at = time.monotonic()

  def close(self) -> None:
    if self.closed:
      return
    self.closed = True
    try:
      if self._file is not None:
        self._file.close()
      if self._tb is not None:
        self._tb.close()  # writes every queued event to its (local) file
      if self.remote:
        self._upload()
    finally:
      self._file, self._tb = None, None
      if self.remote and self._tb_dir is not None:
        shutil.rmtree(self._tb_dir, ignore_errors=True)

  def __enter__(self) -> "MetricsWriter":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


class UnwrittenMetrics:
  """A MetricsWriter's place on a process that does not write the run's files (rlhf_jax.hosts)."""

  def write(self, step: int, metrics: Mapping[str, Any]) -> None:
    del step, metrics

  def write_config(self, config: Mapping[str, Any]) -> None:
    del config

  def flush(self) -> None:
    pass

  def close(self) -> None:
    pass


def _config_default(obj: Any) -> Any:
  # Configs hold numpy/jax scalars, tuples-as-lists, dtypes, nested ConfigDicts; the file is a
  # human-readable record, not something parsed back into objects, so str() is an acceptable
  # fallback for the rest.
  if isinstance(obj, Mapping):
    return dict(obj)
  try:
    return to_scalar(obj)
  except (TypeError, ValueError):
    return str(obj)


def _drop_torn_tail(path: str) -> None:
  """Truncates a last line left without its newline by a killed writer, so appends start clean
  (a local file: only there can a writer append)."""
  if not os.path.exists(path):
    return
  with open(path, "rb+") as f:
    data = f.read()
    if data and not data.endswith(b"\n"):
      f.truncate(data.rfind(b"\n") + 1)


def _complete_lines(path: str) -> Optional[list[str]]:
  """The complete lines of a metrics file, each with its newline (None where there is no file); a
  torn last line (a file copied from a killed local run) is dropped, as `_drop_torn_tail` does."""
  try:
    lines = storage.read_text(path).split("\n")
  except FileNotFoundError:
    return None
  return [line + "\n" for line in lines[:-1]]


def read_metrics(path: str) -> list[dict]:
  """Reads a metrics.jsonl (or the logdir holding one) back as a list of dicts, in file order;
  `path` may be local or on object storage.

  A final line without a newline is a write cut short by a killed process and is skipped; a
  malformed line anywhere else means real corruption and raises.
  """
  if storage.isdir(path):
    path = storage.join(path, METRICS_FILE)
  lines = storage.read_text(path).split("\n")
  # split leaves "" after a trailing newline, or the torn fragment when there is none.
  return [json.loads(line) for line in lines[:-1] if line.strip()]


def progress(iterable_or_total: Union[Iterable, int], desc: Optional[str] = None,
             disable: Optional[bool] = None, **kwargs) -> tqdm.tqdm:
  """A tqdm bar over an iterable (or a manual bar of `total` steps, advanced with `.update`).

  `disable=None` hides the bar unless its output stream is a terminal: in batch-job logs a bar
  is thousands of carriage-return updates. Pass `disable=False` to force it on.
  """
  file = kwargs.pop("file", None) or sys.stderr  # tqdm's default stream
  if disable is None:
    isatty = getattr(file, "isatty", None)
    disable = not (isatty is not None and isatty())
  if isinstance(iterable_or_total, (int, np.integer)):
    return tqdm.tqdm(total=iterable_or_total, desc=desc, disable=disable, file=file, **kwargs)
  return tqdm.tqdm(iterable_or_total, desc=desc, disable=disable, file=file, **kwargs)
