"""launch/tpu_pod.sh and launch/slurm_gpu.sbatch against fake gcloud, gcsfuse, srun and scontrol.

No cloud here: each fake appends its argv as one JSON line to a log and emulates just enough. The
fake gcloud keeps the TPU VM's state in a file (create, delete and a preemption change it), copies
the tarball into a fake worker home on scp, and runs the ssh --command there with bash, so the
worker side (mount with --gcsfuse, unpack, install, start) really runs, down to a fake .venv/bin/python that logs
the job's argv and exits with $FAKE_JOB_STATUS. The fake srun runs `test` steps locally.
"""

import json
import os
import shutil
import subprocess
import sys
import tarfile

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable

FAKES = {
    # Every fake starts with the same logging line (LOG below).
    "gcloud": r"""
import pathlib, shutil, subprocess
state = pathlib.Path(os.environ["FAKE_TPU_STATE"])
home = pathlib.Path(os.environ["FAKE_WORKER_HOME"])
if args[:3] == ["compute", "tpus", "tpu-vm"]:
  verb = args[3]
  if verb == "describe":
    if not state.exists():
      print("ERROR: (gcloud.compute.tpus.tpu-vm.describe) NOT_FOUND: Resource 'nodes/x' was not found", file=sys.stderr)
      sys.exit(1)
    print(state.read_text())
  elif verb == "create":
    state.write_text("READY")
  elif verb == "delete":
    state.unlink()
  elif verb == "scp":
    home.mkdir(exist_ok=True)
    shutil.copy(args[4], home / args[5].split(":", 1)[1])
  elif verb == "ssh":
    if os.environ.get("FAKE_PREEMPT_DURING_SSH"):  # the slice goes away under the job
      state.write_text("PREEMPTED")
      sys.exit(255)
    command = args[args.index("--command") + 1]
    # ssh does not carry the caller's environment: the worker sees only what the command sets.
    env = {k: v for k, v in os.environ.items() if k != "RLHF_JAX_DATA_DIR"}
    sys.exit(subprocess.run(["bash", "-c", command], cwd=home, env=dict(env, HOME=str(home))).returncode)
""",
    "gcsfuse": "",
    "sudo": "",  # logged, not run: the fake worker cannot write /mnt
    "mountpoint": "sys.exit(1)",
    "curl": "sys.exit(1)",
    "uv": r"""
import pathlib, shutil
if args[0] == "venv":  # the job's python: logs its argv, exits with $FAKE_JOB_STATUS
  pathlib.Path(args[-1], "bin").mkdir(parents=True)
  shutil.copy(os.environ["FAKE_JOB"], pathlib.Path(args[-1], "bin", "python"))
""",
    "srun": r"""
command = [a for a in args if not a.startswith("--ntasks")]
if command[0] == "test":
  sys.exit(1 if os.environ.get("FAKE_NODE_LOCAL") else subprocess.run(command).returncode)
sys.exit(int(os.environ.get("FAKE_JOB_STATUS", "0")))
""",
    "scontrol": "",
    "nvidia-smi": 'print("GPU 0: fake\\nGPU 1: fake")',
    "job": 'sys.exit(int(os.environ.get("FAKE_JOB_STATUS", "0")))',  # not on PATH: uv copies it
}
LOG = """#!{py}
import json, os, subprocess, sys
args = sys.argv[1:]
with open(os.environ["FAKE_LOG"], "a") as f:
  f.write(json.dumps({{"tool": "{name}", "args": args, "cwd": os.getcwd(),
                      "JAX_LOCAL_DEVICE_IDS": os.environ.get("JAX_LOCAL_DEVICE_IDS"),
                      "RLHF_JAX_DATA_DIR": os.environ.get("RLHF_JAX_DATA_DIR")}}) + "\\n")
"""


@pytest.fixture
def sandbox(tmp_path):
  """A small copy of the checkout (launch/ and a few files) and an environment with the fakes."""
  repo = tmp_path / "repo"
  (repo / "launch").mkdir(parents=True)
  for name in ("tpu_pod.sh", "slurm_gpu.sbatch"):
    shutil.copy(os.path.join(REPO, "launch", name), repo / "launch" / name)
  (repo / "pyproject.toml").write_text("[project]\nname = 'rlhf_jax'\n")
  for junk in (".git/HEAD", "runs/lm/big.bin", ".venv/lib/x.py"):  # must not travel to the workers
    (repo / junk).parent.mkdir(parents=True, exist_ok=True)
    (repo / junk).write_text("x")
  (repo / ".venv/bin").mkdir()
  (repo / ".venv/bin/python").write_text("#!/bin/sh\nexit 99\n")  # the SLURM script only tests it exists
  (repo / ".venv/bin/python").chmod(0o755)
  bin_dir, job = tmp_path / "bin", tmp_path / "job"
  bin_dir.mkdir()
  for name, body in FAKES.items():
    path = job if name == "job" else bin_dir / name
    path.write_text(LOG.format(py=PY, name=name) + body)
    path.chmod(0o755)
  env = {k: v for k, v in os.environ.items() if k != "RLHF_JAX_DATA_DIR"}  # `make test` sets it; tests set their own
  env.update(PATH=f"{bin_dir}:{os.environ['PATH']}", FAKE_LOG=str(tmp_path / "calls.jsonl"),
             FAKE_TPU_STATE=str(tmp_path / "tpu_state"), FAKE_WORKER_HOME=str(tmp_path / "worker"), FAKE_JOB=str(job),
             SLURM_SUBMIT_DIR=str(repo), SLURM_JOB_ID="4242", SLURM_GPUS_ON_NODE="2")
  return tmp_path, repo, env


def run(sandbox, script, *args, **env):
  tmp_path, repo, base = sandbox
  p = subprocess.run(["bash", str(repo / "launch" / script), *args], cwd=tmp_path, capture_output=True,
                     text=True, env={**base, **env}, timeout=60)
  log = tmp_path / "calls.jsonl"
  calls = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
  log.unlink(missing_ok=True)
  return p, calls


def gcloud_verbs(calls):
  return [c["args"][3] for c in calls if c["tool"] == "gcloud"]


JOB = ["python", "-m", "rlhf_jax", "sweep", "--config=experiments/paper_sweep.py", "--config.mesh.shape=(1,-1,1)",
       "--config.name=two words"]
POD = ["my-tpu", "us-central2-b", "v4-32", "--workdir=gs://my-bucket/sweeps/paper"]
JOB_ARGV = JOB[1:] + ["--workdir=gs://my-bucket/sweeps/paper", "--jax_distributed"]  # the default: the bucket itself
FUSE_ARGV = JOB[1:] + ["--workdir=/mnt/gcs/my-bucket/sweeps/paper", "--jax_distributed"]  # --gcsfuse


def job_calls(calls):
  return [c for c in calls if c["tool"] == "job"]


def worker_tools(calls):
  return [c["tool"] for c in calls if c["tool"] != "gcloud"]


def test_tpu_fresh_slice_creates_copies_installs_and_runs_on_the_bucket(sandbox):
  (sandbox[0] / "bin" / "gcsfuse").unlink()  # a fresh TPU image has none, and needs none
  p, calls = run(sandbox, "tpu_pod.sh", *POD, "--", *JOB)
  assert p.returncode == 0, p.stderr
  assert gcloud_verbs(calls) == ["describe", "create", "scp", "ssh"]
  describe, create, scp, ssh = (c["args"] for c in calls if c["tool"] == "gcloud")
  assert "--format=value(state)" in describe
  assert create[4:] == ["my-tpu", "--zone", "us-central2-b", "--accelerator-type", "v4-32",
                        "--version", "tpu-ubuntu2204-base"]
  assert "--worker=all" in scp and "--worker=all" in ssh
  # The worker side ran in order: install, then the job with the gs:// workdir. No mount: no
  # gcsfuse, mountpoint, sudo or curl (which would fetch gcsfuse's apt key) on the worker.
  assert worker_tools(calls) == ["uv", "uv", "job"]
  install = [c["args"] for c in calls if c["tool"] == "uv"][1]
  assert install[:1] == ["pip"] and "-e" in install and "jax[tpu]" in install
  (job,) = job_calls(calls)
  assert job["args"] == JOB_ARGV  # every argument intact through ssh, quoting and all
  worker = sandbox[0] / "worker"
  assert job["cwd"] == str(worker / "rlhf_jax")
  with tarfile.open(worker / "rlhf_jax.tgz") as tar:
    names = {n.lstrip("./") for n in tar.getnames()}
  assert {"launch/tpu_pod.sh", "pyproject.toml"} <= names
  assert not [n for n in names if n.split("/")[0] in (".git", "runs", ".venv")]


def test_tpu_gcsfuse_mounts_the_bucket_and_runs_on_the_mount(sandbox):
  p, calls = run(sandbox, "tpu_pod.sh", "--gcsfuse", *POD, "--", *JOB)
  assert p.returncode == 0, p.stderr
  assert gcloud_verbs(calls) == ["describe", "create", "scp", "ssh"]
  # mountpoint (not mounted yet), the mount point made and given to the user, the mount, install.
  assert worker_tools(calls) == ["mountpoint", "sudo", "sudo", "gcsfuse", "uv", "uv", "job"]
  (gcsfuse,) = [c["args"] for c in calls if c["tool"] == "gcsfuse"]
  assert "--implicit-dirs" in gcsfuse and gcsfuse[-2:] == ["my-bucket", "/mnt/gcs/my-bucket"]
  assert ["mkdir", "-p", "/mnt/gcs/my-bucket"] in [c["args"] for c in calls if c["tool"] == "sudo"]
  (job,) = job_calls(calls)
  assert job["args"] == FUSE_ARGV


@pytest.mark.parametrize("workdir", ["gs://my-bucket//sweeps/paper/", "gs://my-bucket/sweeps/paper//"])
def test_tpu_normalises_the_workdir_url(sandbox, workdir):
  (sandbox[0] / "tpu_state").write_text("READY")
  p, calls = run(sandbox, "tpu_pod.sh", *POD[:3], f"--workdir={workdir}", "--", *JOB)
  assert p.returncode == 0, p.stderr
  assert job_calls(calls)[0]["args"] == JOB_ARGV
  p, calls = run(sandbox, "tpu_pod.sh", "--gcsfuse", *POD[:3], "--workdir", workdir, "--", *JOB)
  assert p.returncode == 0, p.stderr
  assert job_calls(calls)[0]["args"] == FUSE_ARGV


def test_tpu_ready_slice_is_reused(sandbox):
  (sandbox[0] / "tpu_state").write_text("READY")
  p, calls = run(sandbox, "tpu_pod.sh", "--spot", *POD, "--", *JOB)
  assert p.returncode == 0, p.stderr
  assert gcloud_verbs(calls) == ["describe", "scp", "ssh"]
  assert job_calls(calls)[0]["args"] == JOB_ARGV


def test_tpu_preempted_slice_is_recreated_and_the_same_job_resumes(sandbox):
  p, first = run(sandbox, "tpu_pod.sh", "--spot", *POD, "--", *JOB, FAKE_JOB_STATUS="75")
  assert p.returncode == 75  # the job was interrupted: the documented "run it again"
  assert "--spot" in [c for c in first if c["tool"] == "gcloud"][1]["args"]
  (sandbox[0] / "tpu_state").write_text("PREEMPTED")
  p, again = run(sandbox, "tpu_pod.sh", "--spot", *POD, "--", *JOB)
  assert p.returncode == 0, p.stderr
  assert gcloud_verbs(again) == ["describe", "delete", "create", "scp", "ssh"]
  assert "--quiet" in [c for c in again if c["tool"] == "gcloud"][1]["args"]
  assert "recreating" in p.stderr
  # Resume, not restart: the very same command and workdir (the trainers pick up stage_done.json
  # and checkpoints there), and nothing on the worker removes anything in the bucket.
  assert job_calls(again)[0]["args"] == job_calls(first)[0]["args"] == JOB_ARGV
  assert not {"gcsfuse", "mountpoint", "sudo"} & set(worker_tools(again))


def test_tpu_slice_lost_under_the_job_exits_75(sandbox):
  p, calls = run(sandbox, "tpu_pod.sh", *POD, "--", *JOB, FAKE_PREEMPT_DURING_SSH="1")
  assert p.returncode == 75
  assert gcloud_verbs(calls) == ["describe", "create", "scp", "ssh", "describe"]
  assert "run the same command again" in p.stderr.splitlines()[-1]


def test_tpu_job_status_is_propagated(sandbox):
  (sandbox[0] / "tpu_state").write_text("READY")
  p, calls = run(sandbox, "tpu_pod.sh", *POD, "--", *JOB, FAKE_JOB_STATUS="3")
  assert p.returncode == 3
  assert gcloud_verbs(calls) == ["describe", "scp", "ssh", "describe"]  # still READY: the job's own failure


@pytest.mark.parametrize("args, says", [
    (["my-tpu", "us-central2-b", "v4-32"], "--workdir=gs://BUCKET/PATH is required"),
    (["my-tpu", "us-central2-b", "v4-32", "--workdir=runs/sweep"], "not a gs://BUCKET/PATH URL"),
    (["my-tpu", "us-central2-b", "v4-32", "--workdir=/tmp/sweep"], "not a gs://BUCKET/PATH URL"),
    (["my-tpu", "us-central2-b", "v4-32", "--workdir=gs://my-bucket"], "not a gs://BUCKET/PATH URL"),
    (["my-tpu", "us-central2-b", "v4-32", "--workdir=gs://my-bucket/"], "not a gs://BUCKET/PATH URL"),
    (["my-tpu", "us-central2-b", "v4-32", "--workdir=gs://"], "not a gs://BUCKET/PATH URL"),
    (["my-tpu", "us-central2-b", "v4-32", "--workdir=gs:/x"], "not a gs://BUCKET/PATH URL"),
    (["my-tpu", "us-central2-b", "v4-32", "--gcsfuse", "--workdir=gs:/x"], "not a gs://BUCKET/PATH URL"),
    (["my-tpu", "us-central2-b", "v4-32", "--workdir=/mnt/gcs/my-bucket/x"], "not a gs://BUCKET/PATH URL"),
    (["my-tpu", "us-central2-b", "--workdir=gs://b/p"], "NAME ZONE ACCELERATOR expected"),
])
def test_tpu_refuses_a_workdir_workers_do_not_share(sandbox, args, says):
  p, calls = run(sandbox, "tpu_pod.sh", *args, "--", *JOB)
  assert p.returncode == 2
  assert len(p.stderr.splitlines()) == 1 and says in p.stderr
  if "gs://BUCKET/PATH" in says:
    assert "every worker must see the same run directory" in p.stderr
  assert calls == []  # not a single gcloud call


def test_tpu_refuses_workdir_inside_the_command(sandbox):
  p, calls = run(sandbox, "tpu_pod.sh", *POD, "--", *JOB, "--workdir=/tmp/x")
  assert p.returncode == 2 and len(p.stderr.splitlines()) == 1 and calls == []


def test_tpu_sets_the_data_setting_on_every_worker(sandbox):
  (sandbox[0] / "tpu_state").write_text("READY")
  p, calls = run(sandbox, "tpu_pod.sh", *POD, "--", *JOB)
  assert p.returncode == 0, p.stderr
  assert job_calls(calls)[0]["RLHF_JAX_DATA_DIR"] is None  # unset: the job uses the bundled samples
  # A copy on every worker, with the bucket written directly.
  p, calls = run(sandbox, "tpu_pod.sh", *POD, "--", *JOB, RLHF_JAX_DATA_DIR="/data/rlhf copy")
  assert p.returncode == 0, p.stderr
  (job,) = job_calls(calls)
  assert job["RLHF_JAX_DATA_DIR"] == "/data/rlhf copy" and job["args"] == JOB_ARGV
  # A folder of the mounted bucket, with --gcsfuse.
  p, calls = run(sandbox, "tpu_pod.sh", "--gcsfuse", *POD, "--", *JOB, RLHF_JAX_DATA_DIR="/mnt/gcs/my-bucket/data dir")
  assert p.returncode == 0, p.stderr
  (job,) = job_calls(calls)
  assert job["RLHF_JAX_DATA_DIR"] == "/mnt/gcs/my-bucket/data dir" and job["args"] == FUSE_ARGV


@pytest.mark.parametrize("gcsfuse, data_dir, says", [
    # The data loaders read local paths: a URL is refused, saying how to make it one.
    ([], "gs://my-bucket/data", ["local paths, not gs:// URLs", "--gcsfuse",
                                 "RLHF_JAX_DATA_DIR=/mnt/gcs/my-bucket/data", "copy the data onto every worker"]),
    (["--gcsfuse"], "gs://my-bucket/data", ["local paths, not gs:// URLs", "RLHF_JAX_DATA_DIR=/mnt/gcs/my-bucket/data"]),
    ([], "gs://other-bucket/data", ["local paths, not gs:// URLs", "gs://my-bucket", "--gcsfuse"]),
    # A mount path that no worker has: the bucket is mounted only with --gcsfuse, and only the workdir's.
    ([], "/mnt/gcs/my-bucket/data", ["only --gcsfuse mounts a bucket", "copy the data onto every worker"]),
    (["--gcsfuse"], "/mnt/gcs/other-bucket/data", ["only the workdir's, at /mnt/gcs/my-bucket"]),
])
def test_tpu_refuses_a_data_dir_the_workers_cannot_read(sandbox, gcsfuse, data_dir, says):
  p, calls = run(sandbox, "tpu_pod.sh", *gcsfuse, *POD, "--", *JOB, RLHF_JAX_DATA_DIR=data_dir)
  assert p.returncode == 2 and len(p.stderr.splitlines()) == 1 and calls == []
  assert f"RLHF_JAX_DATA_DIR={data_dir}:" in p.stderr
  for words in says:
    assert words in p.stderr


SHARED_JOB = ["python", "-m", "rlhf_jax", "sweep", "--config=experiments/paper_sweep.py"]


@pytest.mark.parametrize("workdir_args", [["--workdir=WD"], ["--workdir", "WD"]])
def test_slurm_runs_the_job_on_every_node_with_a_shared_workdir(sandbox, workdir_args):
  workdir = str(sandbox[0] / "shared" / "sweep")
  job = SHARED_JOB + [a.replace("WD", workdir) for a in workdir_args]
  p, calls = run(sandbox, "slurm_gpu.sbatch", "--", *job)
  assert p.returncode == 0, p.stderr
  check, step = [c["args"] for c in calls if c["tool"] == "srun"]
  assert check[-3:-1] == ["test", "-e"] and check[-1].startswith(workdir + "/")
  assert "--ntasks-per-node=1" in step
  assert step[step.index(".venv/bin/python"):] == [".venv/bin/python"] + job[1:] + ["--jax_distributed"]
  assert calls[-1]["JAX_LOCAL_DEVICE_IDS"] == "0,1"
  assert os.listdir(workdir) == []  # the visibility marker is gone
  assert not [c for c in calls if c["tool"] == "scontrol"]


@pytest.mark.parametrize("workdir_args", [["--workdir=gs://bucket/run"], ["--workdir", "gs://bucket/run"]])
def test_slurm_runs_the_job_on_every_node_with_a_bucket_workdir(sandbox, workdir_args):
  job = SHARED_JOB + workdir_args
  p, calls = run(sandbox, "slurm_gpu.sbatch", "--", *job)
  assert p.returncode == 0, p.stderr
  # No visibility check (a bucket is the same from every node): the one srun is the job, on every
  # node, with the URL unchanged.
  (step,) = [c["args"] for c in calls if c["tool"] == "srun"]
  assert "--ntasks-per-node=1" in step
  assert step[step.index(".venv/bin/python"):] == [".venv/bin/python"] + job[1:] + ["--jax_distributed"]
  assert calls[-1]["JAX_LOCAL_DEVICE_IDS"] == "0,1"
  # Nothing local was made of the URL (mkdir -p gs://bucket/run would make ./gs:/bucket/run).
  tmp_path, repo, _ = sandbox
  assert not (repo / "gs:").exists() and not (tmp_path / "gs:").exists()


def test_slurm_job_inherits_the_data_setting(sandbox):
  p, calls = run(sandbox, "slurm_gpu.sbatch", "--", *SHARED_JOB, f"--workdir={sandbox[0] / 'shared'}",
                 RLHF_JAX_DATA_DIR="/nfs/data")
  assert p.returncode == 0, p.stderr
  assert calls[-1]["tool"] == "srun" and calls[-1]["RLHF_JAX_DATA_DIR"] == "/nfs/data"


def test_slurm_counts_gpus_with_nvidia_smi(sandbox):
  env = dict(sandbox[2])
  del env["SLURM_GPUS_ON_NODE"]
  p, calls = run((sandbox[0], sandbox[1], env), "slurm_gpu.sbatch", "--", *SHARED_JOB,
                 f"--workdir={sandbox[0] / 'shared'}")
  assert p.returncode == 0, p.stderr
  assert calls[-1]["tool"] == "srun" and calls[-1]["JAX_LOCAL_DEVICE_IDS"] == "0,1"


@pytest.mark.parametrize("workdir, env, says", [
    ([], {}, "--workdir=DIR is required"),
    (["--workdir=gs://"], {}, "not a gs://BUCKET/PATH URL"),
    (["--workdir=gs://my-bucket"], {}, "not a gs://BUCKET/PATH URL"),
    (["--workdir=gs://my-bucket/"], {}, "not a gs://BUCKET/PATH URL"),
    (["--workdir=gs:/x"], {}, "not a gs://BUCKET/PATH URL"),
    (["--workdir=s3://my-bucket/sweep"], {}, "not a gs://BUCKET/PATH URL"),
    (["--workdir=gs://my-bucket/sweep", "--workdir", "gs:/x"], {}, "not a gs://BUCKET/PATH URL"),  # the last one counts
    (["--workdir=LOCAL"], {"FAKE_NODE_LOCAL": "1"}, "not visible from every node"),
])
def test_slurm_refuses_a_workdir_nodes_do_not_share(sandbox, workdir, env, says):
  workdir = [w.replace("LOCAL", str(sandbox[0] / "local")) for w in workdir]
  p, calls = run(sandbox, "slurm_gpu.sbatch", "--", *SHARED_JOB, *workdir, **env)
  assert p.returncode == 2
  assert len(p.stderr.splitlines()) == 1 and says in p.stderr
  assert [c["args"][-3:-1] for c in calls] == ([["test", "-e"]] if env else [])  # the job never started
  if env:
    assert os.listdir(sandbox[0] / "local") == []
  tmp_path, repo, _ = sandbox
  assert not (repo / "gs:").exists() and not (repo / "s3:").exists()  # no local directory named after a URL


def test_slurm_requeues_a_preempted_job(sandbox):
  p, calls = run(sandbox, "slurm_gpu.sbatch", "--", *SHARED_JOB, f"--workdir={sandbox[0] / 'shared'}",
                 FAKE_JOB_STATUS="75")
  assert p.returncode == 75
  assert calls[-1]["tool"] == "scontrol" and calls[-1]["args"] == ["requeue", "4242"]
  p, calls = run(sandbox, "slurm_gpu.sbatch", "--", *SHARED_JOB, f"--workdir={sandbox[0] / 'shared'}",
                 FAKE_JOB_STATUS="1")
  assert p.returncode == 1 and not [c for c in calls if c["tool"] == "scontrol"]


def test_slurm_directives_come_before_the_first_command():
  # sbatch stops reading #SBATCH lines at the first command: --requeue below it would be ignored.
  with open(os.path.join(REPO, "launch", "slurm_gpu.sbatch"), encoding="utf-8") as f:
    lines = f.read().splitlines()
  first_command = next(i for i, line in enumerate(lines) if line.strip() and not line.startswith("#"))
  directives = [line.split()[1] for line in lines[:first_command] if line.startswith("#SBATCH")]
  assert "--requeue" in directives and "--ntasks-per-node=1" in directives


@pytest.mark.parametrize("script", ["tpu_pod.sh", "slurm_gpu.sbatch"])
def test_scripts_parse(script):
  subprocess.run(["bash", "-n", os.path.join(REPO, "launch", script)], check=True)
