"""The compile clock counts the programs XLA compiles while it measures, and only those; the sweep
records them per stage, and benchmarks/sweep_compile.py tabulates the records."""
import json
import os
import sys

import jax
import jax.numpy as jnp

from rlhf_jax.experiments import stages
from rlhf_jax.training.compile_clock import CompileClock

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import sweep_compile  # noqa: E402


def _fresh(offset: float):
  def clocked_fn(x):  # a new function each call: nothing is cached in memory
    return jnp.tanh(x) * offset
  return jax.jit(clocked_fn)


def test_counts_each_compile_while_measuring_and_none_outside():
  three, four = jnp.ones(3), jnp.ones(4)  # made outside: creating an array compiles a program too
  _fresh(3.0)(three)  # before: not counted
  clock = CompileClock()
  with clock.measuring():
    f = _fresh(1.0)
    f(three), f(three), f(four)  # the repeat is jit's in-memory cache: 2 compiles
    jax.block_until_ready(_fresh(2.0)(three))
  _fresh(4.0)(four)  # after: not counted
  got = clock.record()
  assert got["programs"] == 3 and got["distinct_functions"] == 1 and got["recompiled"] == {"jit(clocked_fn)": 3}
  phases = ("trace_seconds", "lower_seconds", "backend_seconds")
  assert got["backend_seconds"] > 0 and got["trace_seconds"] > 0
  assert abs(got["compile_seconds"] - sum(got[p] for p in phases)) <= 0.002  # each phase rounded to 1 ms
  assert got["cache_hits"] == 0 and got["cache_load_seconds"] == 0  # nothing here is in a persistent cache


def test_a_program_loaded_from_the_persistent_cache_counts_as_a_hit(tmp_path):
  import subprocess
  script = (
      "import json, sys, jax, jax.numpy as jnp\n"
      "from rlhf_jax.training.compile_clock import CompileClock\n"
      "x = jnp.ones((64, 64))\n"
      "clock = CompileClock()\n"
      "with clock.measuring():\n"
      "  jax.jit(lambda a: jnp.tanh(a @ a.T).sum())(x).block_until_ready()\n"
      "print(json.dumps(clock.record()))\n")
  env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(tmp_path / "cache"), XLA_FLAGS="",
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  runs = [json.loads(subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                                    check=True).stdout.splitlines()[-1]) for _ in range(2)]
  assert [r["cache_hits"] for r in runs] == [0, 1] and [r["programs"] for r in runs] == [1, 1]
  assert 0 < runs[1]["cache_load_seconds"] <= runs[1]["backend_seconds"] + 0.001


def test_a_stage_record_holds_its_compiles_and_the_table_sums_them(tmp_path, capsys):
  seven = jnp.ones(7)

  def run(stage_dir):
    _fresh(5.0)(seven), _fresh(6.0)(seven)
    return {}
  plan = [stages.Stage("first", {}, run, ()), stages.Stage("second", {}, lambda d: {}, ("first",))]
  stages.run_stages(plan, str(tmp_path))
  assert "first: " in capsys.readouterr().out
  records = dict(sweep_compile.stage_records(str(tmp_path)))
  assert records["first"]["compile"]["programs"] == 2 and records["second"]["compile"]["programs"] == 0
  table = sweep_compile.table(list(records.items())).splitlines()
  assert table[2].startswith("| first |") and "| 2 | 1 | jit(clocked_fn) x2 |" in table[2]
  all_row = table[-1].split("|")
  want = sum(r["seconds"] for r in records.values())
  assert abs(float(all_row[2]) - want) <= 0.05 + 1e-9 and all_row[-4].strip() == "2"
  with open(tmp_path / "first" / stages.STAGE_DONE) as f:
    assert json.load(f)["compile"] == records["first"]["compile"]
