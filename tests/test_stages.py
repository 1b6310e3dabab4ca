"""The shared stage runner on trivial stages: run once, skip, refuse changed settings, exit 75, rerun
what is downstream of a stage that ran again."""
import json
import os

import pytest

from rlhf_jax.experiments import stages
from rlhf_jax.model.config import ModelConfig


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
  same = {"d_model": 8, "mlp_activation": "silu", "scale_embeddings": False, "norm_offset": 0.0,
          "qkv_bias": False, "qk_norm": False, "rope_scaling": "none", "rope_factor": 1.0, "rope_low_freq_factor": 1.0,
          "rope_high_freq_factor": 4.0, "rope_original_max_len": 8192}
  assert {f"model.{k}": v for k, v in same.items() if k != "d_model"} == {
      k: v for k, v in stages.ADDED_WITH_NEUTRAL_DEFAULT.items() if k.startswith("model.")}
  assert all(getattr(ModelConfig(), k) == v for k, v in same.items() if k != "d_model")  # the defaults
  stages.run_stages([_stage("pm", {"model": same}, calls)], w)
  assert calls == ["pm"]
  with pytest.raises(ValueError, match=r"model.norm_offset None -> 1.0"):
    stages.run_stages([_stage("pm", {"model": dict(same, norm_offset=1.0)}, calls)], w)
  with pytest.raises(ValueError, match=r"model.qk_norm None -> True, model.rope_scaling None -> llama3"):
    stages.run_stages([_stage("pm", {"model": dict(same, qk_norm=True, rope_scaling="llama3")}, calls)], w)


def test_sampling_settings_moved_out_of_ppo_keep_finished_stages(tmp_path):
  # PPO's and DPO's sampling settings moved from ppo.* to one `sampling` section: a stage finished
  # before the move is read with them in their new place, and a real change is still refused.
  w, calls = str(tmp_path), []
  old_ppo = {"ppo": {"epochs": 2, "prompt_len": 32, "max_new_tokens": 16, "temperature": 1.0, "top_k": 0, "top_p": 1.0}}
  old_dpo = {"ppo": {"prompt_len": 32, "max_new_tokens": 16, "temperature": 1.0, "top_k": 0, "top_p": 1.0}}
  stages.run_stages([_stage("ppo", old_ppo, calls), _stage("dpo", old_dpo, calls)], w)
  sampling = {"prompt_len": 32, "max_new_tokens": 16, "temperature": 1.0, "top_k": 0, "top_p": 1.0}
  stages.run_stages([_stage("ppo", {"ppo": {"epochs": 2}, "sampling": sampling}, calls),
                     _stage("dpo", {"sampling": sampling}, calls)], w)
  assert calls == ["ppo", "dpo"]
  with pytest.raises(ValueError, match=r"sampling.max_new_tokens 16 -> 8"):
    stages.run_stages([_stage("ppo", {"ppo": {"epochs": 2}, "sampling": dict(sampling, max_new_tokens=8)}, calls)], w)


def _reading(name, inputs, calls, w, version):
  """A stage whose output is its name, version[name] and its inputs' outputs: c(b(a1)) for a chain."""
  def run(d):
    calls.append(name)
    read = ",".join(_out(w, i) for i in inputs)
    with open(os.path.join(d, "out.txt"), "w") as f:
      f.write(f"{name}{version.get(name, '')}({read})")
    return {}
  return stages.Stage(name, {}, run, tuple(inputs))


def _out(w, name):
  with open(os.path.join(w, name, "out.txt")) as f:
    return f.read()


def _graph(calls, w, version, graph):
  return [_reading(name, inputs, calls, w, version) for name, inputs in graph]


def _invalidated(out):
  return [line for line in out.splitlines() if line.startswith("invalidated")]


CHAIN = (("a", ()), ("b", ("a",)), ("c", ("b",)))


def test_a_stage_that_runs_again_reruns_everything_downstream(tmp_path, capsys):
  w, calls, version = str(tmp_path), [], {"a": 1}
  stages.run_stages(_graph(calls, w, version, CHAIN), w)
  assert calls == ["a", "b", "c"] and _out(w, "c") == "c(b(a1()))"
  before = {n: (tmp_path / n / stages.STAGE_DONE).read_bytes() for n in "abc"}
  capsys.readouterr()
  stages.run_stages(_graph(calls, w, version, CHAIN), w)  # nothing changed: all skipped, records untouched
  out = capsys.readouterr().out
  assert calls == ["a", "b", "c"] and out.count("skipped") == 3 and not _invalidated(out)
  assert before == {n: (tmp_path / n / stages.STAGE_DONE).read_bytes() for n in "abc"}
  os.remove(tmp_path / "a" / stages.STAGE_DONE)  # a manual rerun of a, with another output
  version["a"] = 2
  stages.run_stages(_graph(calls, w, version, CHAIN), w)
  out = capsys.readouterr().out
  assert calls[3:] == ["a", "b", "c"] and _out(w, "c") == "c(b(a2()))"
  assert _invalidated(out) == ["invalidated (inputs changed): b, c"]
  aside = sorted(os.listdir(tmp_path / stages.STALE_DIR))  # moved aside whole, not deleted
  assert [n.split("-")[0] for n in aside] == ["b", "c"]
  assert (tmp_path / stages.STALE_DIR / aside[1] / "out.txt").read_text() == "c(b(a1()))"
  stages.run_stages(_graph(calls, w, version, CHAIN), w)
  assert len(calls) == 6 and capsys.readouterr().out.count("skipped") == 3


def test_an_input_finished_again_since_is_caught_by_its_fingerprint(tmp_path, capsys):
  # a reruns in a run whose plan lacks b and c (or stops before them): the next full run reruns them.
  w, calls, version = str(tmp_path), [], {"a": 1}
  stages.run_stages(_graph(calls, w, version, CHAIN), w)
  with open(tmp_path / "b" / stages.STAGE_DONE) as f:
    assert json.load(f)["inputs"] == {"a": stages.fingerprint(str(tmp_path / "a"))}
  os.remove(tmp_path / "a" / stages.STAGE_DONE)
  version["a"] = 2
  stages.run_stages(_graph(calls, w, version, CHAIN[:1]), w)
  assert calls[3:] == ["a"] and not _invalidated(capsys.readouterr().out)
  stages.run_stages(_graph(calls, w, version, CHAIN), w)
  assert calls[4:] == ["b", "c"] and _out(w, "c") == "c(b(a2()))"
  assert _invalidated(capsys.readouterr().out) == ["invalidated (inputs changed): b, c"]
  os.remove(tmp_path / "a" / stages.STAGE_DONE)  # stop_after: the stale stages go aside at once
  stages.run_stages(_graph(calls, w, version, CHAIN), w, stop_after="a")
  assert calls[6:] == ["a"] and not os.path.exists(tmp_path / "b") and not os.path.exists(tmp_path / "c")
  assert _invalidated(capsys.readouterr().out) == ["invalidated (inputs changed): b, c"]


def test_records_without_fingerprints_are_not_stale_by_themselves(tmp_path, capsys):
  w, calls, version = str(tmp_path), [], {"a": 1}
  stages.run_stages(_graph(calls, w, version, CHAIN), w)

  def rewrite(name, edit):
    path = tmp_path / name / stages.STAGE_DONE
    done = json.loads(path.read_text())
    edit(done)
    path.write_text(json.dumps(done, indent=2))
  for name in "bc":  # as written before there were fingerprints
    rewrite(name, lambda done: [done.pop("inputs"), done.pop("run_id")])
  rewrite("a", lambda done: done.update(run_id="finished again elsewhere"))
  capsys.readouterr()
  stages.run_stages(_graph(calls, w, version, CHAIN), w)
  out = capsys.readouterr().out
  assert calls == ["a", "b", "c"] and out.count("skipped") == 3 and not _invalidated(out)
  os.remove(tmp_path / "a" / stages.STAGE_DONE)  # but an input that runs now still makes them stale
  stages.run_stages(_graph(calls, w, version, CHAIN), w)
  assert calls[3:] == ["a", "b", "c"]
  assert _invalidated(capsys.readouterr().out) == ["invalidated (inputs changed): b, c"]


def test_a_diamond_reruns_its_join_once(tmp_path, capsys):
  w, calls, version = str(tmp_path), [], {"a": 1}
  diamond = (("a", ()), ("b", ("a",)), ("c", ("a",)), ("d", ("b", "c")), ("e", ()))
  stages.run_stages(_graph(calls, w, version, diamond), w)
  os.remove(tmp_path / "a" / stages.STAGE_DONE)
  version["a"] = 2
  capsys.readouterr()
  stages.run_stages(_graph(calls, w, version, diamond), w)
  assert calls[5:] == ["a", "b", "c", "d"] and _out(w, "d") == "d(b(a2()),c(a2()))"
  assert _invalidated(capsys.readouterr().out) == ["invalidated (inputs changed): b, c, d"]
  assert sorted(n.split("-")[0] for n in os.listdir(tmp_path / stages.STALE_DIR)) == ["b", "c", "d"]


def _resumable(name, inputs, fail, calls):
  """A stage that fails once after saving progress and resumes from it, as a trainer does."""
  def run(d):
    calls.append(name)
    resumed = os.path.exists(os.path.join(d, "progress"))
    open(os.path.join(d, "progress"), "w").close()
    if fail:
      fail.pop()
      raise stages.StageInterrupted(f"stage {name} stopped")
    return {"resumed": resumed}
  return stages.Stage(name, {}, run, tuple(inputs))


@pytest.mark.parametrize("input_reruns", [False, True])
def test_a_partly_run_stage_resumes_unless_an_input_runs_again(tmp_path, capsys, input_reruns):
  w, calls, fail = str(tmp_path), [], [1]
  plan = lambda: [_reading("a", (), calls, w, {}), _resumable("b", ("a",), fail, calls)]
  with pytest.raises(stages.StageInterrupted):
    stages.run_stages(plan(), w)
  if input_reruns:
    os.remove(tmp_path / "a" / stages.STAGE_DONE)
  capsys.readouterr()
  stages.run_stages(plan(), w)
  with open(tmp_path / "b" / stages.STAGE_DONE) as f:
    assert json.load(f)["summary"] == {"resumed": not input_reruns}
  assert _invalidated(capsys.readouterr().out) == (["invalidated (inputs changed): b"] if input_reruns else [])


def test_inputs_must_be_earlier_stages(tmp_path):
  calls = []
  with pytest.raises(ValueError, match=r"stage b reads \['c'\], which are not earlier stages"):
    stages.run_stages(_graph(calls, str(tmp_path), {}, (("a", ()), ("b", ("c",)), ("c", ()))), str(tmp_path))
  assert calls == []


def test_the_sweep_and_online_stages_declare_what_they_read(tmp_path):
  from conftest import micro_online_config, micro_sweep_config

  from rlhf_jax.experiments import online, sweep
  w = str(tmp_path)
  plan = {s.name: set(s.inputs) for s in sweep.plan(micro_sweep_config(), w)}
  assert plan["tokenizer"] == set() and plan["lm_xs"] == {"tokenizer"} and plan["sft_xs"] == {"tokenizer", "lm_xs"}
  assert plan["labels_xs"] == {"sft_xs", "pm_gold"} and plan["pm_xs"] == {"lm_xs", "labels_xs"}
  assert plan["ppo_xs"] == plan["rloo_xs"] == plan["bon_xs"] == {"sft_xs", "pm_xs", "pm_gold"}
  assert plan["dpo_xs_beta0.1"] == {"sft_xs", "pm_xs", "pm_gold", "labels_xs"}
  assert plan["evals_xs"] == {"sft_xs", "pm_xs", "pm_gold", "ppo_xs"}
  rounds = {s.name: set(s.inputs) for s in online.plan(micro_online_config(online={"policy_init": "previous"}), w)}
  r0, r1 = "shared_xs_s0_r0", "online_xs_s0_r1"
  assert rounds[f"labels_{r1}"] == {"pm_gold", f"ppo_{r0}", f"labels_{r0}"}  # samples from round 0's policy only
  assert rounds[f"pm_{r1}"] == {"lm_xs", f"labels_{r1}"}
  assert rounds[f"ppo_{r1}"] == {"sft_xs", "pm_gold", f"pm_{r1}", f"ppo_{r0}"}
  assert rounds[f"eval_{r1}"] == {"sft_xs", "pm_gold", f"labels_{r1}", f"pm_{r1}", f"ppo_{r1}"}
  assert {f"ppo_{r0}", f"ppo_{r1}", "pm_gold"} <= rounds["elo_xs_s0"]


_CACHE_SCRIPT = r"""
import json, os, sys
import jax, jax.numpy as jnp, numpy as np
from rlhf_jax.experiments.stages import use_compilation_cache
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
