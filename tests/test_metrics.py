"""MetricsWriter: JSONL round trip, resume, non-finite values, and TensorBoard event contents.

The event files are read back without TensorFlow: the TFRecord framing is parsed (and its CRCs
checked) here, and only the protobuf message class comes from tensorboardX.
"""
import glob
import io
import json
import math
import os
import struct

import jax.numpy as jnp
import numpy as np
import pytest
from tensorboardX.proto import event_pb2

from rlhf_jax.training import metrics
from rlhf_jax.training.metrics import MetricsWriter, StepClock, progress, read_metrics, without_timings

# --- TFRecord reader ------------------------------------------------------------------------------

def _crc32c_table():
  poly = 0x82F63B78  # Castagnoli polynomial, bit-reversed
  table = []
  for i in range(256):
    c = i
    for _ in range(8):
      c = (c >> 1) ^ poly if c & 1 else c >> 1
    table.append(c)
  return table


_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
  crc = 0xFFFFFFFF
  for b in data:
    crc = _TABLE[(crc ^ b) & 0xFF] ^ (crc >> 8)
  return crc ^ 0xFFFFFFFF


def masked_crc(data: bytes) -> int:
  crc = crc32c(data)
  return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF


def read_tfrecords(path):
  """Yields each record's payload, checking both CRCs and that the file ends on a record boundary."""
  with open(path, "rb") as f:
    data = f.read()
  pos = 0
  while pos < len(data):
    assert len(data) - pos >= 12, "truncated record header"
    header = data[pos:pos + 8]
    (length,) = struct.unpack("<Q", header)
    (length_crc,) = struct.unpack("<I", data[pos + 8:pos + 12])
    assert length_crc == masked_crc(header)
    start, end = pos + 12, pos + 12 + length
    assert end + 4 <= len(data), "truncated record body"
    payload = data[start:end]
    (data_crc,) = struct.unpack("<I", data[end:end + 4])
    assert data_crc == masked_crc(payload)
    yield payload
    pos = end + 4
  assert pos == len(data)


def read_scalar_events(tb_dir):
  """[(tag, step, simple_value)] over every event file in tb_dir, in file order."""
  files = glob.glob(os.path.join(tb_dir, "events.out.tfevents.*"))
  assert files, f"no event files in {tb_dir}"
  per_file = []
  for path in files:
    events = [event_pb2.Event.FromString(r) for r in read_tfrecords(path)]
    assert events[0].file_version.startswith("brain.Event:")  # the header record of each file
    per_file.append(events)
  out = []
  # File names share a timestamp when written within one second; order by the header's wall time.
  for events in sorted(per_file, key=lambda evs: evs[0].wall_time):
    for ev in events[1:]:
      for v in ev.summary.value:
        out.append((v.tag, ev.step, v.simple_value))
  return out


def test_crc32c_known_answer():
  # The standard CRC-32C check value; guards the reader against a wrong table passing silently.
  assert crc32c(b"123456789") == 0xE3069283


# --- JSONL ----------------------------------------------------------------------------------------

def test_jsonl_round_trip_numpy_and_jax_scalars(tmp_path):
  with MetricsWriter(str(tmp_path), tensorboard=False) as w:
    w.write(0, {"loss": np.float32(0.1), "tokens": np.int64(2**40 + 3), "ok": np.bool_(True)})
    w.write(np.int32(5), {"loss": jnp.float32(2.5), "kl": jnp.array(0.125, jnp.bfloat16),
                          "n": jnp.int32(-7), "py": 1e-300, "big": 2**70})
  rows = read_metrics(str(tmp_path / "metrics.jsonl"))
  assert rows == [
      {"step": 0, "loss": float(np.float32(0.1)), "tokens": 2**40 + 3, "ok": True},
      {"step": 5, "loss": 2.5, "kl": 0.125, "n": -7, "py": 1e-300, "big": 2**70},
  ]
  # Types survive too: ints stay ints (not 5.0), the float32 value is exact, not 0.1 rounded.
  assert type(rows[1]["step"]) is int and type(rows[0]["tokens"]) is int
  assert rows[0]["loss"] == 0.10000000149011612
  assert read_metrics(str(tmp_path)) == rows  # a logdir is accepted too


def test_each_line_is_on_disk_before_close(tmp_path):
  w = MetricsWriter(str(tmp_path), tensorboard=False)
  w.write(1, {"a": 1.0})
  # No flush/close: a process killed here must still have left the line.
  with open(tmp_path / "metrics.jsonl") as f:
    assert f.read() == '{"step": 1, "a": 1.0}\n'
  w.close()


def test_reopen_appends(tmp_path):
  with MetricsWriter(str(tmp_path), tensorboard=False) as w:
    w.write(0, {"a": 1.0})
    w.write(1, {"a": 2.0})
  with MetricsWriter(str(tmp_path), tensorboard=False) as w:
    w.write(2, {"a": 3.0})
  assert [(r["step"], r["a"]) for r in read_metrics(str(tmp_path))] == [(0, 1.0), (1, 2.0), (2, 3.0)]


def test_torn_last_line_is_dropped(tmp_path):
  path = tmp_path / "metrics.jsonl"
  path.write_text('{"step": 0, "a": 1.0}\n{"step": 1, "a"')  # killed mid-write
  assert read_metrics(str(path)) == [{"step": 0, "a": 1.0}]
  with MetricsWriter(str(tmp_path), tensorboard=False) as w:
    w.write(1, {"a": 2.0})
  assert path.read_text() == '{"step": 0, "a": 1.0}\n{"step": 1, "a": 2.0}\n'


def test_corrupt_middle_line_raises(tmp_path):
  path = tmp_path / "metrics.jsonl"
  path.write_text('{"step": 0}\n{"step": \n{"step": 2}\n')
  with pytest.raises(json.JSONDecodeError):
    read_metrics(str(path))


def test_nonfinite_written_as_null_and_counted(tmp_path):
  with MetricsWriter(str(tmp_path), tensorboard=False) as w:
    w.write(0, {"loss": float("nan"), "kl": np.float32(np.inf), "ok": 1.0})
    w.write(1, {"loss": jnp.float32(jnp.nan), "kl": -math.inf})
    assert dict(w.nonfinite) == {"loss": 2, "kl": 2}
  text = (tmp_path / "metrics.jsonl").read_text()
  assert "NaN" not in text and "Infinity" not in text
  # Strict JSON: a parser that rejects the NaN/Infinity tokens still reads the file.
  def reject(token):
    raise AssertionError(f"non-strict JSON token {token}")
  rows = [json.loads(line, parse_constant=reject) for line in text.splitlines()]
  assert rows == [{"step": 0, "loss": None, "kl": None, "ok": 1.0},
                  {"step": 1, "loss": None, "kl": None}]


def test_rejects_bad_metrics(tmp_path):
  with MetricsWriter(str(tmp_path), tensorboard=False) as w:
    with pytest.raises(ValueError):
      w.write(0, {"v": np.zeros(3)})
    with pytest.raises(TypeError):
      w.write(0, {"v": "text"})
    with pytest.raises(ValueError):
      w.write(0, {"step": 1.0})
  assert read_metrics(str(tmp_path)) == []  # nothing partial was written
  with pytest.raises(ValueError):
    w.write(1, {"a": 1.0})  # closed


def test_write_config(tmp_path):
  with MetricsWriter(str(tmp_path), tensorboard=False) as w:
    w.write_config({"lr": np.float32(0.5), "layers": 4, "dims": (1, 2), "dtype": jnp.bfloat16,
                    "nested": {"beta": jnp.float32(0.25)}})
    w.write_config({"lr": 1.0})  # replaces, not appends
  with open(tmp_path / "config.json") as f:
    assert json.load(f) == {"lr": 1.0}
  with MetricsWriter(str(tmp_path), tensorboard=False) as w:
    w.write_config({"lr": np.float32(0.5), "dims": (1, 2), "nested": {"beta": jnp.float32(0.25)}})
  with open(tmp_path / "config.json") as f:
    assert json.load(f) == {"lr": 0.5, "dims": [1, 2], "nested": {"beta": 0.25}}


# --- TensorBoard ----------------------------------------------------------------------------------

def test_tensorboard_scalars_read_back(tmp_path):
  written = [(0, {"train/loss": np.float32(1.5), "train/kl": jnp.float32(0.001)}),
             (10, {"train/loss": 0.75, "eval/acc": np.int64(3)}),
             (20, {"train/loss": float("nan")})]
  with MetricsWriter(str(tmp_path)) as w:
    for step, m in written[:2]:
      w.write(step, m)
  # Resume: a second writer adds a second event file to the same directory.
  with MetricsWriter(str(tmp_path)) as w:
    w.write(*written[2])

  events = read_scalar_events(str(tmp_path / "tb"))
  assert len(glob.glob(str(tmp_path / "tb" / "events.out.tfevents.*"))) == 2
  # simple_value is a float32 field, so compare against the float32 rounding of what was written.
  expected = [(tag, step, float(np.float32(v))) for step, m in written for tag, v in m.items()]
  assert [(t, s) for t, s, _ in events] == [(t, s) for t, s, _ in expected]
  for (tag, step, got), (_, _, want) in zip(events, expected):
    if math.isnan(want):
      assert math.isnan(got), (tag, step)  # TensorBoard keeps the real value, unlike the JSONL
    else:
      assert got == want, (tag, step)
  assert events[1] == ("train/kl", 0, float(np.float32(0.001)))
  assert events[3] == ("eval/acc", 10, 3.0)


def test_tensorboard_disabled_writes_no_events(tmp_path):
  with MetricsWriter(str(tmp_path), tensorboard=False) as w:
    w.write(0, {"a": 1.0})
  assert not os.path.exists(tmp_path / "tb")


# --- progress -------------------------------------------------------------------------------------

def test_progress_disabled_off_tty_unless_forced():
  buf = io.StringIO()  # not a TTY
  bar = progress(range(3), "loop", file=buf)
  assert bar.disable and list(bar) == [0, 1, 2]
  assert buf.getvalue() == ""
  bar = progress(5, "manual", disable=False, file=buf)
  assert not bar.disable and bar.total == 5
  bar.update(5)
  bar.close()
  assert "manual" in buf.getvalue() and "5/5" in buf.getvalue()


def test_step_clock_times_the_compiling_step_alone_and_leaves_out_evaluations(monkeypatch):
  now = [100.0]
  monkeypatch.setattr(metrics.time, "perf_counter", lambda: now[0])
  clock = StepClock(start=4)  # a run resumed after step 4: its first step here is 5
  now[0] = 130.0  # step 5: compiled and run in 30 s
  clock.stepped(jnp.zeros(()))
  assert clock.rates(5) == {"first_step_seconds": 30.0}  # no rate from the compiling step
  for step, t in ((6, 132.0), (7, 134.0)):  # then 2 s a step
    now[0] = t
    clock.stepped(jnp.zeros(()))
  with clock.paused():  # a 50 s evaluation after step 7
    now[0] = 184.0
  for step, t in ((8, 186.0), (9, 188.0)):
    now[0] = t
    clock.stepped(jnp.zeros(()))
  assert clock.rates(9) == {"steps_per_second": 4 / (188.0 - 130.0 - 50.0)}  # 0.5: the steady rate
  row = {"loss": 1.0, "step": 9, **clock.rates(9), "first_step_seconds": 30.0}
  assert without_timings(row) == {"loss": 1.0, "step": 9}
