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

from rlhf_jax.model.transformer import Transformer
from rlhf_jax.objectives import pm
from rlhf_jax.training import sharding as shd

TESTS = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, TESTS)
import distributed_pm_worker as worker  # noqa: E402
import numerics  # noqa: E402

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
  params = worker.load_snapshots(tmp_path / "result.json.params.npz", like=reference["params"][0])

  assert (result["process_count"], result["device_count"], result["local_device_count"]) == (2, 4, 2)
  assert result["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1}
  assert len(result["losses"]) == len(params) - 1 == worker.STEPS
  ref_params = reference["params"]
  # Initialisation draws random bits and scales them, no reductions: bitwise on any device layout.
  jax.tree.map(np.testing.assert_array_equal, params[0], ref_params[0])
  moved = np.concatenate([np.abs(a - b).ravel() for a, b in
                          zip(jax.tree.leaves(ref_params[0]), jax.tree.leaves(ref_params[-1]))])
  assert moved.max() > 1e-3 and np.median(moved) > 1e-3  # a real update, not copies of the initialisation
  # Step 1 runs on identical params: only the collectives' summation order (gloo across the
  # processes, XLA's within one) separates the two losses, a few ulps.
  np.testing.assert_allclose(result["losses"][0], reference["losses"][0], rtol=1e-5)
  # After that, Adam may move a weight whose gradient is at that rounding noise by up to a step
  # either way (tests/numerics.py); a broken cross-process reduction changes every gradient, so
  # from step 2 on (Adam's step 1 is ~lr * sign(g)) it moves most weights apart.
  opt = worker.OPT
  largest = max(float(np.abs(x).max()) for p in ref_params for x in jax.tree.leaves(p))
  for t in range(1, worker.STEPS + 1):
    numerics.assert_adam_runs_close(ref_params[t], params[t], [opt.learning_rate] * t, opt.b1, opt.b2,
                                    weight_decay=opt.weight_decay, max_abs_param=largest)
  # ... and the later losses by what that parameter difference explains to first order.
  model = Transformer(worker.CFG)
  for t in range(1, worker.STEPS):
    batch = worker.comparisons(0, t)
    loss, tol = numerics.first_order_tolerance(lambda p: pm.pm_loss(p, model, batch)[0][None],
                                               ref_params[t], params[t])
    np.testing.assert_allclose(loss[0], reference["losses"][t], rtol=1e-5)  # the step's own loss
    assert abs(result["losses"][t] - reference["losses"][t]) <= tol[0], (t, result["losses"][t],
                                                                         reference["losses"][t], tol[0])
