"""The shared stage runner on trivial stages: run once, skip, refuse changed settings, exit 75."""
import json
import os

import pytest

from rlhf_jax import stages


def _stage(name, settings, calls):
  def run(d):
    calls.append(name)
    with open(os.path.join(d, "out.txt"), "w") as f:
      f.write(name)
    return {"dir": d}
  return stages.Stage(name, settings, run)


def test_stages_run_once_record_portable_settings_and_refuse_changes(tmp_path, capsys):
  w, calls = str(tmp_path), []
  plan = [_stage("a", {"path": os.path.join(w, "x"), "n": 1}, calls), _stage("b", {"n": 2}, calls)]
  stages.run_stages(plan, w)
  assert calls == ["a", "b"]
  with open(tmp_path / "a" / stages.STAGE_DONE) as f:
    done = json.load(f)
  assert done["settings"] == {"n": 1, "path": "<workdir>/x"} and done["summary"] == {"dir": "<workdir>/a"}
  stages.run_stages(plan, w)
  assert calls == ["a", "b"] and capsys.readouterr().out.count("skipped") == 2
  with pytest.raises(ValueError, match=r"stage b finished with other settings: n 2 -> 3"):
    stages.run_stages([plan[0], _stage("b", {"n": 3}, calls)], w)
  calls.clear()
  assert list(stages.run_stages([_stage("c", {}, calls), _stage("d", {}, calls)], w, stop_after="c")) == ["c"]
  assert calls == ["c"]
  with pytest.raises(ValueError, match="stop_after='e' is not a stage"):
    stages.run_stages(plan, w, stop_after="e")


def test_an_interrupted_stage_is_one_line_and_exit_75(capsys):
  def preempted():
    raise stages.StageInterrupted("stage ppo_xs stopped at step 3 of 4")
  with pytest.raises(SystemExit) as e:
    stages.exit_75_if_interrupted(preempted)
  assert e.value.code == 75 and capsys.readouterr().out == "interrupted: stage ppo_xs stopped at step 3 of 4\n"
  assert stages.exit_75_if_interrupted(lambda x: x + 1, 1) == 2


def test_a_setting_added_later_at_its_neutral_default_keeps_finished_stages(tmp_path):
  w, calls = str(tmp_path), []
  stages.run_stages([_stage("lm", {"train": {"steps": 5}}, calls)], w)
  stages.run_stages([_stage("lm", {"train": {"steps": 5, "grad_accum": 1}}, calls)], w)  # same behaviour
  assert calls == ["lm"]
  with pytest.raises(ValueError, match=r"train.grad_accum None -> 2"):
    stages.run_stages([_stage("lm", {"train": {"steps": 5, "grad_accum": 2}}, calls)], w)


def test_model_variants_added_for_imports_keep_finished_stages(tmp_path):
  # A trainer stage's settings hold the model section; the fields added for imported checkpoints
  # (rlhf_jax.hf) at Llama's values are the old behaviour, so finished stages stay done.
  w, calls = str(tmp_path), []
  stages.run_stages([_stage("pm", {"model": {"d_model": 8}}, calls)], w)
  same = {"d_model": 8, "mlp_activation": "silu", "scale_embeddings": False, "norm_offset": 0.0}
  stages.run_stages([_stage("pm", {"model": same}, calls)], w)
  assert calls == ["pm"]
  with pytest.raises(ValueError, match=r"model.norm_offset None -> 1.0"):
    stages.run_stages([_stage("pm", {"model": dict(same, norm_offset=1.0)}, calls)], w)


_CACHE_SCRIPT = r"""
import json, os, sys
import jax, jax.numpy as jnp, numpy as np
from rlhf_jax.stages import use_compilation_cache
use_compilation_cache(sys.argv[1])
hits = []
jax.monitoring.register_event_listener(lambda event, **kw: hits.append(event) if event.endswith("cache_hits") else None)
def make():  # a new function object each time, as each stage builds its own steps
  def f(x):
    for _ in range(3):
      x = jnp.tanh(x @ x.T) + jnp.sin(x)
    return x
  return jax.jit(f)
x = jnp.linspace(-1.0, 1.0, 256, dtype=jnp.float32).reshape(16, 16)
first, second = (np.asarray(make()(x)) for _ in range(2))
print(json.dumps({"hits": len(hits), "same": bool((first == second).all()), "dir": jax.config.jax_compilation_cache_dir}))
"""


@pytest.mark.parametrize("enabled", [True, False])
def test_compilation_cache_serves_the_same_program_to_a_second_wrapper(tmp_path, enabled):
  import json
  import subprocess
  import sys
  cache = str(tmp_path / "cache") if enabled else ""
  env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
  out = subprocess.run([sys.executable, "-c", _CACHE_SCRIPT, cache], capture_output=True, text=True, env=env,
                       check=True, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  got = json.loads(out.stdout.strip().splitlines()[-1])
  assert got["same"]  # a loaded executable computes what a fresh compile does, bitwise
  if enabled:
    assert got["dir"] == cache and got["hits"] >= 1 and os.listdir(cache)
  else:
    assert got["dir"] is None and got["hits"] == 0
