"""A run directory in a bucket (tests/fake_gcs.py, a real GCS JSON-API server on loopback): metrics,
checkpoints and a whole LM run behave as they do on local disk.

- MetricsWriter: no append on object storage, so it rewrites the object; a resumed writer continues
  it, and the file ends up byte for byte what a local writer leaves; TensorBoard events reach the
  bucket;
- Checkpointer: saves and restores in the bucket bitwise; a damaged step is moved aside to
  `checkpoints_corrupt/` in the bucket and the step before it restores; a LoRA base's checkpoint
  hash is the same in a bucket as on disk, and as the first (os.walk) version computed it;
- train_lm with --workdir=gs://...: the same final params (bitwise) and metrics as the same run on
  disk; the metrics in the bucket are complete up to each checkpoint as it is saved.
"""
import os
import sys
import uuid

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import small_run_config
from test_metrics import read_scalar_events

from rlhf_jax import storage
from rlhf_jax.training import metrics
from rlhf_jax.training.checkpointing import CORRUPT_DIR, Checkpointer
from rlhf_jax.training.metrics import MetricsWriter, read_metrics, without_timings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from configs import lm as lm_config  # noqa: E402


def _bucket_dir(name: str) -> str:
  return f"gs://runs/test_storage_runs/{name}/{uuid.uuid4().hex}"


def _bucket_path(url: str) -> str:
  return url[len("gs://runs/"):]


# --- metrics --------------------------------------------------------------------------------------

ROWS = [(0, {"loss": np.float32(2.5), "tokens": np.int64(2**40 + 1)}),
        (1, {"loss": jnp.float32(2.25), "kl": jnp.array(0.125, jnp.bfloat16)}),
        (2, {"loss": float("nan"), "ok": True}),
        (3, {"loss": 1.75}),
        (4, {"loss": 1.5, "eval_loss": 1.625})]


def _write_with_a_resume(logdir: str) -> None:
  """Three rows, the writer closed (a run stopped), then a new writer on the same logdir (the run
  resumed) with the rest."""
  with MetricsWriter(logdir) as w:
    w.write_config({"lr": np.float32(0.5), "dims": (1, 2)})
    for step, row in ROWS[:3]:
      w.write(step, row)
  with MetricsWriter(logdir) as w:
    for step, row in ROWS[3:]:
      w.write(step, row)


def test_metrics_in_a_bucket_resume_and_equal_a_local_logdir(gcs_server, tmp_path):
  local, remote = str(tmp_path / "local"), _bucket_dir("metrics")
  _write_with_a_resume(local)
  _write_with_a_resume(remote)

  rows = read_metrics(remote)
  assert [r["step"] for r in rows] == [0, 1, 2, 3, 4]
  assert rows == read_metrics(local) and rows[2]["loss"] is None
  for name in ("metrics.jsonl", "config.json"):  # the same bytes as on disk
    assert storage.read_bytes(storage.join(remote, name)) == (tmp_path / "local" / name).read_bytes(), name

  # TensorBoard: one event file per writer, in the bucket, with the scalars of both.
  tb = storage.join(remote, metrics.TB_DIR)
  names = storage.listdir(tb)
  assert len(names) == 2 and all(n.startswith("events.out.tfevents.") for n in names), names
  assert gcs_server.objects("runs", _bucket_path(tb)) == [f"{_bucket_path(tb)}/{n}" for n in names]
  fetched = tmp_path / "fetched_tb"
  fetched.mkdir()
  for name in names:
    (fetched / name).write_bytes(storage.read_bytes(storage.join(tb, name)))
  events = read_scalar_events(str(fetched))
  assert _same_nan(events, read_scalar_events(str(tmp_path / "local" / metrics.TB_DIR)))
  assert [(tag, step) for tag, step, _ in events] == [(t, s) for s, row in ROWS for t in row]


def _same_nan(a, b) -> bool:
  """Event lists equal, NaN equal to NaN (TensorBoard keeps the real value)."""
  return len(a) == len(b) and all(x[:2] == y[:2] and (x[2] == y[2] or (np.isnan(x[2]) and np.isnan(y[2])))
                                  for x, y in zip(a, b))


def test_metrics_object_is_rewritten_lazily_and_on_flush(gcs_server):
  logdir = _bucket_dir("lazy")
  path = storage.join(logdir, metrics.METRICS_FILE)
  w = MetricsWriter(logdir, tensorboard=False, flush_seconds=3600)
  assert storage.read_text(path) == ""  # there at once, empty, as a local writer leaves it
  w.write(1, {"a": 1.0})  # the first row goes up at once: a run shows in the bucket as it starts
  w.write(2, {"a": 2.0})
  assert [r["step"] for r in read_metrics(logdir)] == [1]  # not yet: at most every flush_seconds
  w.flush()
  assert [r["step"] for r in read_metrics(logdir)] == [1, 2]
  w.write(3, {"a": 3.0})
  w.close()
  assert [r["step"] for r in read_metrics(logdir)] == [1, 2, 3]
  with pytest.raises(ValueError, match="closed"):
    w.write(4, {"a": 4.0})


def test_a_torn_last_line_in_a_bucket_is_dropped_on_resume(gcs_server):
  logdir = _bucket_dir("torn")
  path = storage.join(logdir, metrics.METRICS_FILE)
  storage.write_atomic(path, '{"step": 0, "a": 1.0}\n{"step": 1, "a"')  # e.g. copied from a killed run
  assert read_metrics(logdir) == [{"step": 0, "a": 1.0}]
  with MetricsWriter(logdir, tensorboard=False) as w:
    w.write(1, {"a": 2.0})
  assert storage.read_text(path) == '{"step": 0, "a": 1.0}\n{"step": 1, "a": 2.0}\n'


# --- checkpoints ----------------------------------------------------------------------------------

def _tree(seed: int) -> dict:
  rs = np.random.RandomState(seed)
  return {"w": jnp.asarray(rs.randn(64, 96).astype(np.float32)),
          "b": jnp.asarray(rs.randn(96).astype(np.float32)).astype(jnp.bfloat16),
          "step": jnp.int32(seed)}


def _assert_bitwise(actual, expected) -> None:
  assert jax.tree.structure(actual) == jax.tree.structure(expected)
  for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
    a, e = np.asarray(a), np.asarray(e)
    assert a.dtype == e.dtype and a.shape == e.shape and a.tobytes() == e.tobytes()


def test_checkpoints_in_a_bucket_restore_bitwise_and_a_damaged_step_is_moved_aside(gcs_server):
  import gcsfs
  run = _bucket_dir("ckpt")
  directory = storage.join(run, "checkpoints")
  trees = {1: _tree(1), 2: _tree(2)}
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), trees[1])
  with Checkpointer(directory) as ckpt:
    assert ckpt.directory == directory  # the URL as given, not made into a local path
    for step, tree in trees.items():
      assert ckpt.save(step, tree, {"note": f"step {step}"})
    ckpt.wait()
  with Checkpointer(directory) as ckpt:  # a new process sees only the bucket
    assert ckpt.all_steps() == [1, 2]
    state, meta = ckpt.restore(abstract)
  _assert_bitwise(state, trees[2])
  assert meta == {"note": "step 2", "step": 2}

  prefix = _bucket_path(storage.join(directory, "2"))
  before = gcs_server.objects("runs", prefix + "/")
  data = [o for o in before if "/state/" in o and "/d/" in o]  # the array data of step 2
  assert data, before
  fs = gcsfs.GCSFileSystem(skip_instance_cache=True)
  largest = max(data, key=lambda o: fs.size(f"runs/{o}"))
  fs.rm(f"runs/{largest}")

  with Checkpointer(directory) as ckpt:
    state, meta = ckpt.restore_newest_good(abstract)
    assert ckpt.all_steps() == [1]
  _assert_bitwise(state, trees[1])
  assert meta == {"note": "step 1", "step": 1}
  assert gcs_server.objects("runs", prefix + "/") == []  # gone from checkpoints/ ...
  corrupt = storage.join(run, CORRUPT_DIR)
  moved = storage.listdir(corrupt)
  assert len(moved) == 1 and moved[0].startswith("2-"), moved
  kept = gcs_server.objects("runs", _bucket_path(storage.join(corrupt, moved[0])) + "/")
  relative = lambda names, root: sorted(n[len(root):] for n in names)
  expected = [o for o in before if o != largest]
  assert relative(kept, _bucket_path(storage.join(corrupt, moved[0]))) == relative(expected, prefix)  # ... kept


def _hash_as_first_written(run_dir: str, step: int) -> str:
  """adapters.checkpoint_hash as it read local files before the storage layer (os.walk): the
  hashes already recorded in lora_base.json files."""
  import hashlib
  import json
  root, entries = os.path.join(run_dir, "checkpoints", str(step)), []
  for dirpath, _, files in sorted(os.walk(root)):
    for name in sorted(files):
      path = os.path.join(dirpath, name)
      with open(path, "rb") as f:
        entries.append((os.path.relpath(path, root), os.path.getsize(path), hashlib.sha256(f.read()).hexdigest()))
  return hashlib.sha256(json.dumps(entries).encode()).hexdigest()


def test_a_lora_base_hash_is_the_same_in_a_bucket_and_as_before(gcs_server, tmp_path):
  from rlhf_jax.training.adapters import checkpoint_hash
  local, remote = str(tmp_path / "base"), _bucket_dir("base")
  with Checkpointer(os.path.join(local, "checkpoints"), async_save=False) as ckpt:
    ckpt.save(3, _tree(3))
  step_dir = tmp_path / "base" / "checkpoints" / "3"
  (step_dir / "zz").write_text("a file after the directories")  # orders as os.walk did
  (step_dir / "state-x").mkdir()
  (step_dir / "state-x" / "f").write_text("a directory sorting before state/")
  for rel in storage.walk_files(str(step_dir)):
    storage.copy(str(step_dir / rel), storage.join(remote, "checkpoints", "3", rel))
  expected = _hash_as_first_written(local, 3)
  assert checkpoint_hash(local, 3) == expected
  assert checkpoint_hash(remote, 3) == expected
  (step_dir / "zz").write_text("changed")
  assert checkpoint_hash(local, 3) != expected


# --- a whole run ----------------------------------------------------------------------------------

def _tiny_lm_config(tokenizer_path: str = ""):
  config = small_run_config(lm_config.get_config("tiny"), 4, max_examples=120)
  config.train.checkpoint_every = 2  # a save mid-run: the metrics are flushed with it
  config.tokenizer.path = tokenizer_path
  return config


def _final_params(workdir: str):
  from rlhf_jax.training import loop
  config = _tiny_lm_config()
  s = loop.setup(config, workdir)
  s.ckpt.close()
  with Checkpointer(storage.join(workdir, "checkpoints")) as ckpt:
    assert ckpt.latest_step() == config.train.steps
    return jax.tree.map(np.asarray, ckpt.restore(s.abstract)[0].params)


@pytest.fixture(scope="module")
def local_lm(tmp_path_factory) -> str:
  """The tiny LM run on local disk that the bucket runs are compared with."""
  from rlhf_jax.trainers import train_lm
  local = str(tmp_path_factory.mktemp("local_lm") / "lm")
  train_lm.train(_tiny_lm_config(), local)
  return local


def test_lm_run_in_a_bucket_equals_the_same_run_on_disk(gcs_server, local_lm, monkeypatch):
  from rlhf_jax.trainers import train_lm
  local, remote = local_lm, _bucket_dir("lm")
  # The metrics object only on flush, and what the bucket holds as each checkpoint is saved.
  monkeypatch.setattr(metrics, "FLUSH_SECONDS", 3600.0)
  at_save, save = {}, Checkpointer.save
  def recording_save(self, step, *args, **kwargs):
    at_save[int(step)] = [r["step"] for r in read_metrics(remote)]
    return save(self, step, *args, **kwargs)
  monkeypatch.setattr(Checkpointer, "save", recording_save)
  # The tokenizer the local run trained (its own loading from a bucket is tested with the data).
  tokenizer = os.path.join(local, "tokenizer.model")
  train_lm.train(_tiny_lm_config(tokenizer), remote)
  assert at_save == {2: [1, 2], 4: [1, 2, 3, 4]}  # a resumed run's metrics: complete to its checkpoint

  _assert_bitwise(_final_params(remote), _final_params(local))
  rows, expected = read_metrics(remote), read_metrics(local)
  assert [r["step"] for r in rows] == [1, 2, 3, 4]
  assert [without_timings(r) for r in rows] == [without_timings(r) for r in expected]
  assert storage.exists(storage.join(remote, "config.json"))
  assert storage.listdir(storage.join(remote, "checkpoints")) == ["2", "4"]
  assert storage.listdir(storage.join(remote, metrics.TB_DIR))


def test_a_bucket_that_dies_mid_save_fails_in_one_line_and_the_rerun_loses_nothing(gcs_server, local_lm,
                                                                                    monkeypatch):
  """The server is killed as step 4 is saved: the run ends with a StorageError naming the bucket
  (after the clients' bounded retries) instead of hanging, step 2 stays committed, and once the
  server is back the same command resumes from step 2 to the uninterrupted run's weights."""
  from rlhf_jax.errors import StorageError, UserError
  from rlhf_jax.trainers import train_lm
  local, remote = local_lm, _bucket_dir("lm_dies")
  tokenizer = os.path.join(local, "tokenizer.model")
  save = Checkpointer.save
  def dying_save(self, step, *args, **kwargs):
    if int(step) == 4:
      gcs_server.kill()
    return save(self, step, *args, **kwargs)
  monkeypatch.setattr(Checkpointer, "save", dying_save)
  try:
    with pytest.raises(StorageError, match=remote) as e:
      train_lm.train(_tiny_lm_config(tokenizer), remote)
    assert isinstance(e.value, UserError) and "\n" not in str(e.value)
  finally:
    gcs_server.start()
  monkeypatch.setattr(Checkpointer, "save", save)
  assert storage.listdir(storage.join(remote, "checkpoints")) == ["2"]
  train_lm.train(_tiny_lm_config(tokenizer), remote)
  _assert_bitwise(_final_params(remote), _final_params(local))
  assert [r["step"] for r in read_metrics(remote)][-2:] == [3, 4]
