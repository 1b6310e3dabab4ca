"""Two processes (jax.distributed on localhost, 2 CPU devices each) train a PM on one 4-device
mesh; the same steps in this process on 4 of its 8 fake devices must give the same numbers.

This is the multi-host path of `shard_batch`: each process places only its own batch shards.
The processes talk through the coordinator and gloo (jax's default CPU collectives)."""
import json
import os
import socket
import subprocess
import sys
import time

import jax
import numpy as np

from rlhf_jax import sharding as shd

TESTS = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, TESTS)
import distributed_pm_worker as worker  # noqa: E402

NUM_PROCESSES = 2
# Each worker sees 2 CPU devices (this test session itself has 8 fake devices).
ENV = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
TIMEOUT_S = 240  # for both workers: a hung coordinator or collective fails the test instead of hanging it


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _launch(tmp_path) -> list[subprocess.Popen]:
  port, procs = _free_port(), []
  for i in range(NUM_PROCESSES):
    with open(tmp_path / f"worker_{i}.log", "w") as log:
      procs.append(subprocess.Popen(
          [sys.executable, os.path.join(TESTS, "distributed_pm_worker.py"), f"--process_id={i}",
           f"--num_processes={NUM_PROCESSES}", f"--port={port}",
           f"--out={tmp_path / 'result.json'}"],
          env=ENV, stdout=log, stderr=subprocess.STDOUT))
  return procs


def _log(tmp_path, i: int) -> str:
  return (tmp_path / f"worker_{i}.log").read_text()[-3000:]


def _assert_close(got: dict, want: dict, rtol: float = 1e-5):
  assert got.keys() == want.keys()
  for name, value in want.items():
    np.testing.assert_allclose(got[name], value, rtol=rtol, err_msg=name)


def test_two_processes_train_like_one(tmp_path):
  procs = _launch(tmp_path)
  try:
    # The reference runs while the workers do: compiling dominates, and it overlaps.
    reference = worker.train(shd.make_mesh(worker.MESH_SHAPE, jax.devices()[:4]), seed=0)
    deadline = time.monotonic() + TIMEOUT_S
    for i, proc in enumerate(procs):
      try:
        rc = proc.wait(timeout=max(deadline - time.monotonic(), 1))
      except subprocess.TimeoutExpired:
        raise AssertionError(f"worker {i} still running after {TIMEOUT_S}s:\n{_log(tmp_path, i)}") from None
      assert rc == 0, f"worker {i} exited with {rc}:\n{_log(tmp_path, i)}"
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
        proc.wait()
  result = json.loads((tmp_path / "result.json").read_text())

  assert (result["process_count"], result["device_count"], result["local_device_count"]) == (2, 4, 2)
  assert result["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1}
  _assert_close(result["initial_checksums"], reference["initial_checksums"])
  moved = [abs(result["checksums"][k] / v - 1) for k, v in result["initial_checksums"].items() if v]
  assert max(moved) > 1e-3  # a real update, not two copies of the initialisation
  assert len(result["losses"]) == worker.STEPS
  np.testing.assert_allclose(result["losses"], reference["losses"], rtol=1e-5)
  _assert_close(result["checksums"], reference["checksums"])
