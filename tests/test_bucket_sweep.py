"""The micro sweep with its run directory in a bucket: `python -m rlhf_jax sweep --workdir=gs://...`
against a real GCS JSON-API server (tests/fake_gcs.py), SIGKILLed in the middle of PPO and run
again, gives the local-disk sweep's results and leaves the whole run in the bucket; a missing bucket
or refused credentials are one line and exit 2 before any work."""
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

from fake_gcs import refusing_server

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MICRO = os.path.join(ROOT, "tests", "fixtures", "micro_sweep.py")
KILL_AFTER = "ppo_xs/checkpoints/2/commit_success.txt"  # orbax's commit marker on GCS: step 2 of 4 is saved


def _env(gcs_server) -> dict:
  # The same 8 fake devices as the in-process micro sweep this one is compared with.
  return dict(os.environ, **gcs_server.env, JAX_PLATFORMS="cpu",
              XLA_FLAGS="--xla_force_host_platform_device_count=8")


def _sweep(workdir: str) -> list[str]:
  return [sys.executable, "-m", "rlhf_jax", "sweep", f"--config={MICRO}", f"--workdir={workdir}"]


@pytest.fixture(scope="module")
def bucket_sweep(gcs_server):
  """(workdir, output of the rerun): the micro sweep in gs://runs/, SIGKILLed once ppo_xs has
  committed step 2, then run again to the end."""
  workdir = f"gs://runs/bucket_sweep/{uuid.uuid4().hex}"
  prefix = workdir.removeprefix("gs://runs/") + "/"
  proc = subprocess.Popen(_sweep(workdir), cwd=ROOT, env=_env(gcs_server), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, start_new_session=True)
  deadline = time.time() + 900
  while proc.poll() is None and time.time() < deadline:
    if prefix + KILL_AFTER in gcs_server.objects("runs", prefix + "ppo_xs/"):
      os.killpg(proc.pid, signal.SIGKILL)
      break
    time.sleep(0.5)
  out = proc.communicate()[0]
  assert proc.returncode == -signal.SIGKILL, f"the sweep was not killed mid-PPO (rc {proc.returncode}):\n{out[-3000:]}"
  rerun = subprocess.run(_sweep(workdir), cwd=ROOT, env=_env(gcs_server), capture_output=True, text=True,
                         timeout=900)
  assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
  return workdir, rerun.stdout


def _results(run_dir: str) -> list[dict]:
  return [json.loads(line) for line in storage.read_text(storage.join(run_dir, "results.jsonl")).splitlines()]


def test_killed_bucket_sweep_resumes_to_the_local_results(bucket_sweep, micro_sweep_dir):
  workdir, out = bucket_sweep
  assert "ppo_xs: done earlier" not in out and "resumed from step 2" in out, out[-3000:]
  assert "lm_xs: done earlier" in out  # finished stages are read back from the bucket, not rerun
  got, want = _results(workdir), _results(micro_sweep_dir)
  assert [(r["size"], r["method"], r["step"]) for r in got] == [(r["size"], r["method"], r["step"]) for r in want]
  for g, w in zip(got, want):  # another process, same machine and devices: equal up to float32 rounding
    for key in ("kl", "proxy_reward", "gold_reward"):
      np.testing.assert_allclose(g[key], w[key], rtol=1e-5, atol=1e-6, err_msg=f"{g['method']} {g['step']} {key}")


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
