"""Entry points as a user meets them: a mistake is one line on stderr and exit status 2; a bug
keeps its traceback."""
import gzip
import json
import os
import subprocess
import sys

import pytest
from test_faults import ENV

from rlhf_jax.errors import ConfigError
from rlhf_jax.training import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args):
  return subprocess.run([sys.executable, "-m", "rlhf_jax", *args], cwd=ROOT, env=ENV, capture_output=True, text=True,
                        timeout=300)


def _one_error_line(out) -> str:
  assert out.returncode == cli.USAGE_ERROR, (out.returncode, out.stderr[-3000:])
  assert "Traceback" not in out.stderr, out.stderr[-3000:]
  errors = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
  assert len(errors) == 1, out.stderr[-3000:]
  return errors[0]


def test_user_error_exits_2_with_one_line_and_a_bug_keeps_its_traceback(capsys):
  def mistake(argv):
    raise ConfigError("train.steps=-3: must be positive")

  with pytest.raises(SystemExit) as exit_info:
    cli.reporting_user_errors(mistake)([])
  assert exit_info.value.code == 2
  assert capsys.readouterr().err == "error: train.steps=-3: must be positive\n"

  def bug(argv):
    raise KeyError("internal")

  with pytest.raises(KeyError):  # not swallowed into a one-liner
    cli.reporting_user_errors(bug)([])


@pytest.mark.parametrize("job, config, typo", [
    ("train_lm", "configs/lm.py:tiny", "train.stepz"),
    ("sweep", "experiments/tiny_sweep.py", "labels.num_pairz")])
def test_unknown_config_key(job, config, typo, tmp_path):
  line = _one_error_line(_run(job, f"--config={config}", f"--workdir={tmp_path}", f"--config.{typo}=3"))
  assert typo.split(".")[-1] in line
  assert not (tmp_path / "checkpoints").exists()


@pytest.mark.parametrize("argv, said", [
    (["--jax_coordinator=127.0.0.1:1234"], "--jax_coordinator needs --jax_num_processes and --jax_process_id"),
    (["--jax_num_processes=2", "--jax_process_id=0"], "need --jax_coordinator"),
    (["--jax_coordinator=h:1", "--jax_num_processes=2", "--jax_process_id=2"], "--jax_process_id=2 is not in [0, "),
])
def test_distributed_flags_join_named_peers_or_say_what_is_missing(argv, said, monkeypatch, capsys):
  from absl import flags
  calls = []
  monkeypatch.setattr("jax.distributed.initialize", lambda *a, **k: calls.append((a, k)))

  def joined(args: list[str]) -> list:
    values = flags.FlagValues()
    initialize = cli.define_distributed_flags(values)
    values(["prog", *args])
    initialize()
    return calls

  with pytest.raises(SystemExit) as exit_info:
    joined(argv)
  assert exit_info.value.code == cli.USAGE_ERROR and not calls
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and said in err, err
  assert joined([]) == []  # one process: jax.distributed is left alone
  assert joined(["--jax_distributed"]) == [((), {})]  # a cluster jax discovers itself
  calls.clear()
  assert joined(["--jax_coordinator=h:1", "--jax_num_processes=3", "--jax_process_id=2"]) == [
      ((), {"coordinator_address": "h:1", "num_processes": 3, "process_id": 2})]


def test_missing_config_flag(tmp_path):
  line = _one_error_line(_run("train_pm", f"--workdir={tmp_path}"))
  assert "--config is required" in line


def test_sweep_override_naming_no_setting(tmp_path):
  line = _one_error_line(_run("sweep", "--config=experiments/tiny_sweep.py", f"--workdir={tmp_path}",
                              "--config.setup=halfs"))
  assert "setup='halfs'" in line


def test_malformed_data_file_names_file_and_line(tmp_path):
  path = tmp_path / "comparisons.jsonl.gz"
  good = {"chosen": "\n\nHuman: hi\n\nAssistant: hello", "rejected": "\n\nHuman: hi\n\nAssistant: go away"}
  with gzip.open(path, "wt") as f:
    f.write(json.dumps(good) + "\n" + json.dumps({"chosen": good["chosen"]}) + "\n")
  line = _one_error_line(_run("train_pm", "--config=configs/pm.py:tiny", f"--workdir={tmp_path / 'run'}",
                              f"--config.data.path={path}", "--config.progress_bar=False"))
  assert str(path) in line and "line 2" in line and "rejected" in line


def test_every_job_is_one_command(capsys):
  """`python -m rlhf_jax JOB`: each job's module declares its flags in main_factory (so that one
  process can import them all), an unknown job is one line and exit 2, no job lists them."""
  import importlib

  from rlhf_jax import jobs
  for name, (module, _) in jobs.JOBS.items():
    assert callable(getattr(importlib.import_module(module), "main_factory", None)), name
  with pytest.raises(SystemExit) as e:
    jobs.main(["rlhf_jax", "train_pn"])
  assert e.value.code == 2
  assert capsys.readouterr().err.splitlines() == [f"error: no job 'train_pn'; jobs: {', '.join(jobs.JOBS)}"]
  with pytest.raises(SystemExit) as e:
    jobs.main(["rlhf_jax"])
  listing = capsys.readouterr().out
  assert e.value.code == 2 and all(f"  {name} " in listing for name in jobs.JOBS)
