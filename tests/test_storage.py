"""rlhf_jax.storage on local disk and on a real GCS JSON-API server (tests/fake_gcs.py): the same
calls give the same answers, a second client sees what the first wrote, and failures are one line
naming the URL."""
import uuid

import pytest

from rlhf_jax import storage
from rlhf_jax.errors import StorageError, UserError

from fake_gcs import refusing_server


@pytest.fixture(params=["local", "gcs"])
def root(request, tmp_path):
  if request.param == "local":
    return str(tmp_path)
  request.getfixturevalue("gcs_server")
  return f"gs://runs/test_storage/{uuid.uuid4().hex}"


def test_files_and_directories_behave_alike(root):
  storage.makedirs(storage.join(root, "a", "b"))
  storage.write_atomic(storage.join(root, "a", "b", "x.json"), '{"k": 1}')
  storage.write_atomic(storage.join(root, "a", "y.bin"), b"\x00\x01")
  assert storage.read_text(storage.join(root, "a", "b", "x.json")) == '{"k": 1}'
  assert storage.read_bytes(storage.join(root, "a", "y.bin")) == b"\x00\x01"
  assert storage.listdir(storage.join(root, "a")) == ["b", "y.bin"]
  assert storage.walk_files(root) == ["a/b/x.json", "a/y.bin"]
  assert storage.isdir(storage.join(root, "a", "b")) and not storage.isfile(storage.join(root, "a", "b"))
  assert storage.isfile(storage.join(root, "a", "y.bin"))
  assert not storage.exists(storage.join(root, "nothing"))
  storage.write_atomic(storage.join(root, "a", "y.bin"), b"again")  # overwrite
  assert storage.read_bytes(storage.join(root, "a", "y.bin")) == b"again"

  storage.move(storage.join(root, "a"), storage.join(root, "moved"))  # a directory, with its files
  assert not storage.exists(storage.join(root, "a"))
  assert storage.walk_files(root) == ["moved/b/x.json", "moved/y.bin"]
  storage.copy(storage.join(root, "moved", "y.bin"), storage.join(root, "c.bin"))
  assert storage.read_bytes(storage.join(root, "c.bin")) == b"again"
  with storage.local_copy(storage.join(root, "c.bin")) as local:
    assert open(local, "rb").read() == b"again"
  storage.remove(storage.join(root, "c.bin"))
  storage.rmtree(storage.join(root, "moved"))
  assert not storage.exists(storage.join(root, "moved")) and not storage.exists(storage.join(root, "c.bin"))


def test_open_file_text_and_binary(root):
  storage.makedirs(root)
  with storage.open_file(storage.join(root, "t.txt"), "w") as f:
    f.write("é\n")
  with storage.open_file(storage.join(root, "t.txt")) as f:
    assert f.read() == "é\n"
  with storage.open_file(storage.join(root, "t.txt"), "rb") as f:
    assert f.read() == "é\n".encode()


def test_appending_to_an_object_is_refused_not_overwritten(gcs_server):
  path = f"gs://runs/test_storage/{uuid.uuid4().hex}/m.jsonl"
  storage.write_atomic(path, "line 1\n")
  with pytest.raises(StorageError, match="cannot append"):
    storage.open_file(path, "a")
  assert storage.read_text(path) == "line 1\n"  # gcsfs alone would have replaced it


def test_a_second_client_sees_what_the_first_wrote(gcs_server):
  """Two hosts: each has its own gcsfs listing cache; storage must not answer from a stale one."""
  import gcsfs
  other = gcsfs.GCSFileSystem(skip_instance_cache=True)
  root = f"gs://runs/test_storage/{uuid.uuid4().hex}"
  storage.makedirs(root)
  storage.write_atomic(storage.join(root, "first"), b"1")
  assert storage.listdir(root) == ["first"]  # fills this process's listing cache
  other.pipe(f"{root}/second", b"2")
  assert storage.listdir(root) == ["first", "second"]
  assert storage.exists(storage.join(root, "second"))


def test_paths_keep_their_form():
  assert storage.join("gs://b/run", "pm_xs", "config.json") == "gs://b/run/pm_xs/config.json"
  assert storage.basename("gs://b/run/pm_xs/") == "pm_xs" and storage.dirname("gs://b/run/pm_xs") == "gs://b/run"
  assert storage.absolute("gs://b/run/") == "gs://b/run"
  assert storage.is_remote("s3://b/k") and not storage.is_remote("/tmp/x") and not storage.is_remote("rel/gs://")


def test_missing_bucket_is_one_line_naming_it(gcs_server):
  with pytest.raises(StorageError, match="gs://no-such-bucket/run") as e:
    storage.check_writable("gs://no-such-bucket/run")
  assert isinstance(e.value, UserError) and "\n" not in str(e.value)


def test_refused_credentials_are_one_line_naming_the_url(monkeypatch):
  import fsspec
  with refusing_server() as url:
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", url)
    fsspec.filesystem("gcs", finalize_on_close=True).clear_instance_cache()  # a client for this server
    try:
      with pytest.raises(StorageError, match="gs://runs/refused") as e:
        storage.check_writable("gs://runs/refused")
      assert "does not have storage.objects.create access" in str(e.value)
    finally:
      fsspec.filesystem("gcs", finalize_on_close=True).clear_instance_cache()


def test_objects_survive_a_server_restart(gcs_server):
  path = f"gs://runs/test_storage/{uuid.uuid4().hex}/kept"
  storage.write_atomic(path, b"kept")
  gcs_server.restart()
  assert storage.read_bytes(path) == b"kept"


def test_transport_errors_are_told_from_missing_or_damaged_files():
  """What Checkpointer reports as the service failing (one line, nothing moved aside) against what
  it treats as a damaged step (moved aside)."""
  try:
    try:
      raise ConnectionRefusedError(111, "Connect call failed ('127.0.0.1', 4443)")
    except OSError as inner:
      raise ValueError("tensorstore: write failed") from inner
  except ValueError as chained:
    assert storage.transport_error(chained)
  assert storage.transport_error(ValueError("UNAVAILABLE: HTTP request failed"))
  assert storage.transport_error(TimeoutError())
  assert not storage.transport_error(FileNotFoundError("gs://runs/x/checkpoints/2/state/d/0"))
  assert not storage.transport_error(ValueError("DATA_LOSS: Error reading chunk: unexpected end of file"))
