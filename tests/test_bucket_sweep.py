"""The micro sweep as a multi-host job with its run directory in a bucket: two jax.distributed
processes of two CPU devices each run `python -m rlhf_jax sweep --workdir=gs://...` against a real
GCS JSON-API server (tests/fake_gcs.py). One process is SIGKILLed in the middle of PPO (its peer
then fails too), both are launched again, and the job finishes with the results of the session's
one-process micro sweep and the whole run in the bucket. A missing bucket or refused credentials
are one line and exit 2 before any work.

The reference is the session's micro sweep (one process, 8 devices), already paid for, rather than
a one-process run on 4 devices: the data-parallel batch is split over 4 devices in two processes
against 8 in one, so the check covers the process boundary and the device count at once."""
import json
import os
import signal
import subprocess
import sys
import time
import uuid

import numpy as np
import pytest

from rlhf_jax import storage

from fake_gcs import free_port, refusing_server

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MICRO = os.path.join(ROOT, "tests", "fixtures", "micro_sweep.py")
KILL_AFTER = "ppo_xs/checkpoints/2/commit_success.txt"  # orbax's commit marker on GCS: step 2 of 4 is saved
PROCESSES, DEVICES_EACH = 2, 2
TIMEOUT_S = 900  # a launch of the whole sweep, both processes


def _env(gcs_server, devices: int = 8) -> dict:
  return dict(os.environ, **gcs_server.env, JAX_PLATFORMS="cpu",
              XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")


def _sweep(workdir: str) -> list[str]:
  return [sys.executable, "-m", "rlhf_jax", "sweep", f"--config={MICRO}", f"--workdir={workdir}"]


def _launch(workdir: str, gcs_server, logs: list[str]) -> list[subprocess.Popen]:
  """Both processes of the job on this machine, each with its own 2 devices; the same local
  cache directory, as two processes on one host of a pod would share."""
  port, procs = free_port(), []
  for i, log in enumerate(logs):
    with open(log, "w") as out:
      procs.append(subprocess.Popen(
          _sweep(workdir) + [f"--jax_coordinator=127.0.0.1:{port}", f"--jax_num_processes={PROCESSES}",
                             f"--jax_process_id={i}"],
          cwd=ROOT, env=_env(gcs_server, DEVICES_EACH), stdout=out, stderr=subprocess.STDOUT,
          start_new_session=True))
  return procs


def _wait(procs: list[subprocess.Popen], logs: list[str], deadline: float) -> list[int]:
  try:
    return [proc.wait(timeout=max(deadline - time.time(), 1)) for proc in procs]
  except subprocess.TimeoutExpired:
    tails = "\n".join(open(log).read()[-2000:] for log in logs)
    raise AssertionError(f"the job is still running after {TIMEOUT_S} s:\n{tails}") from None
  finally:
    for proc in procs:
      if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@pytest.fixture(scope="module")
def bucket_sweep(gcs_server, tmp_path_factory):
  """(workdir, output of the relaunched lead process): the micro sweep in gs://runs/ on two
  processes, process 1 SIGKILLed once ppo_xs has committed step 2, then both launched again."""
  workdir = f"gs://runs/bucket_sweep/{uuid.uuid4().hex}"
  prefix = workdir.removeprefix("gs://runs/") + "/"
  logs_dir = tmp_path_factory.mktemp("bucket_sweep_logs")
  first = [str(logs_dir / f"first_{i}.log") for i in range(PROCESSES)]
  procs = _launch(workdir, gcs_server, first)
  deadline = time.time() + TIMEOUT_S
  while all(p.poll() is None for p in procs) and time.time() < deadline:
    if prefix + KILL_AFTER in gcs_server.objects("runs", prefix + "ppo_xs/"):
      os.killpg(procs[1].pid, signal.SIGKILL)
      break
    time.sleep(0.5)
  # The survivor loses its peer at the next collective or heartbeat and exits with an error.
  codes = _wait(procs, first, time.time() + 300)
  assert codes[1] == -signal.SIGKILL and codes[0] != 0, (
      f"process 1 was not killed mid-PPO, or process 0 finished without it (exit codes {codes}):\n"
      + open(first[0]).read()[-3000:])
  again = [str(logs_dir / f"again_{i}.log") for i in range(PROCESSES)]
  codes = _wait(_launch(workdir, gcs_server, again), again, time.time() + TIMEOUT_S)
  assert codes == [0] * PROCESSES, f"exit codes {codes}:\n" + "\n".join(open(log).read()[-3000:] for log in again)
  return workdir, open(again[0]).read()


def _results(run_dir: str) -> list[dict]:
  return [json.loads(line) for line in storage.read_text(storage.join(run_dir, "results.jsonl")).splitlines()]


def test_killed_bucket_sweep_resumes_to_the_local_results(bucket_sweep, micro_sweep_dir):
  workdir, out = bucket_sweep
  assert "ppo_xs: done earlier" not in out and "resumed from step 2" in out, out[-3000:]
  assert "lm_xs: done earlier" in out  # finished stages are read back from the bucket, not rerun
  got, want = _results(workdir), _results(micro_sweep_dir)
  assert [(r["size"], r["method"], r["step"]) for r in got] == [(r["size"], r["method"], r["step"]) for r in want]
  # Same machine, same data, other reductions: gradients summed over 4 devices across two
  # processes (gloo) instead of over 8 in one, so every float32 sum rounds in another order. The
  # sampled tokens stay the same, so the results differ by that rounding carried through training:
  # rewards (|r| < 1, one PM forward each) by a few float32 ulps of relative error, and each KL, a
  # mean over prompts of sums of <= 8 response tokens' log-ratios of log-probs of magnitude <=
  # log(512) + a few nats (say 8), by up to 8 tokens x 2 log-probs x 4 ulps of 8 (2^-20 each).
  kl_atol = 8 * 2 * 4 * 8 * 2.0 ** -23
  for g, w in zip(got, want):
    where = f"{g['method']} step {g['step']}"
    np.testing.assert_allclose(g["kl"], w["kl"], rtol=0, atol=kl_atol, err_msg=f"{where} kl")
    for key in ("proxy_reward", "gold_reward"):
      np.testing.assert_allclose(g[key], w[key], rtol=1e-5, atol=1e-6, err_msg=f"{where} {key}")
  assert max(abs(r["kl"]) for r in got) > 1000 * kl_atol  # the policies moved: the tolerance is not all of it


def test_the_bucket_holds_the_whole_run(bucket_sweep, micro_sweep_dir):
  workdir, _ = bucket_sweep
  local = set(os.listdir(micro_sweep_dir)) - {"tfds"}
  # The prepared data set is a local stand-in on each host (array_record writes local files only).
  assert set(storage.listdir(workdir)) == local, "stage directories differ from the local sweep's"
  for name in sorted(local):
    if os.path.isfile(os.path.join(micro_sweep_dir, name, "stage_done.json")):
      done = json.loads(storage.read_text(storage.join(workdir, name, "stage_done.json")))
      assert "<workdir>/" in json.dumps(done["settings"]) or not any(
          "micro_sweep" in str(v) for v in done["settings"].values()), name
  files = storage.walk_files(workdir)
  for want in ("results.jsonl", "analysis/scaling.md", "analysis/fits.json", "analysis/reward_vs_sqrt_kl.png",
               "analysis/methods_frontier.png", "analysis/alignment_tax.md", "pm_xs/metrics.jsonl",
               "pm_xs/config.json", "ppo_xs/metrics.jsonl", "evals_xs/evals.json", "bon_xs/best_of_n.jsonl",
               "labels_xs/labels.jsonl"):
    assert want in files, f"{want} missing from the bucket"
  assert any(f.startswith("ppo_xs/tb/") for f in files), "no TensorBoard events for ppo_xs"
  assert storage.read_bytes(storage.join(workdir, "analysis", "reward_vs_sqrt_kl.png"))[:4] == b"\x89PNG"
  steps = [json.loads(line)["step"] for line in storage.read_text(storage.join(workdir, "ppo_xs", "metrics.jsonl"))
           .splitlines()]
  assert steps[-1] == 4 and set(range(1, 5)) <= set(steps), steps  # nothing lost to the kill


def test_missing_bucket_and_refused_credentials_are_one_line_and_exit_2(gcs_server):
  missing = subprocess.run(_sweep("gs://no-such-bucket/run"), cwd=ROOT, env=_env(gcs_server),
                           capture_output=True, text=True, timeout=300)
  with refusing_server() as url:
    env = dict(_env(gcs_server), STORAGE_EMULATOR_HOST=url, TENSORSTORE_GCS_HTTP_URL=url)
    refused = subprocess.run(_sweep("gs://runs/refused"), cwd=ROOT, env=env, capture_output=True, text=True,
                             timeout=300)
  for result, url, says in ((missing, "gs://no-such-bucket/run", ""), (refused, "gs://runs/refused", "access")):
    assert result.returncode == 2, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and url in lines[0] and says in lines[0], result.stderr[-3000:]
    assert "Traceback" not in result.stderr
