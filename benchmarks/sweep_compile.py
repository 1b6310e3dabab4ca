"""Compile against compute per stage of a finished sweep, from its stage_done.json records.

  python benchmarks/sweep_compile.py runs/tiny_sweep          # Markdown table on stdout

Each stage's record holds its wall seconds and, since the sweep measures it
(rlhf_jax/training/compile_clock.py), the seconds JAX spent tracing, lowering, compiling and
loading cached executables, and how many programs XLA compiled. Stages skipped as done earlier
keep the figures of the run that did them; a record from before the measurement shows '-'."""
from __future__ import annotations

import json
import os
import sys

from rlhf_jax import storage
from rlhf_jax.experiments.stages import STAGE_DONE


def stage_records(workdir: str) -> list[tuple[str, dict]]:
  """(stage, record) for every finished stage, in the order they finished."""
  out = []
  for name in storage.listdir(workdir):
    path = storage.join(workdir, name, STAGE_DONE)
    if storage.exists(path):
      out.append((name, json.loads(storage.read_text(path))))
  if storage.is_remote(workdir):
    return out
  return sorted(out, key=lambda item: os.path.getmtime(os.path.join(workdir, item[0], STAGE_DONE)))


def table(records: list[tuple[str, dict]]) -> str:
  head = ("| stage | wall s | compile s | of wall | trace s | lower s | XLA s | of which cache loads s "
          "| programs | functions | most recompiled |")
  lines = [head, "|---" * 11 + "|"]
  total_wall = total_compile = total_programs = 0.0
  for name, rec in records:
    wall, c = rec.get("seconds", 0.0), rec.get("compile")
    total_wall += wall
    if c is None:
      lines.append(f"| {name} | {wall:.1f} |" + " - |" * 9)
      continue
    total_compile += c["compile_seconds"]
    total_programs += c["programs"]
    worst = max(c["recompiled"].items(), key=lambda kv: kv[1], default=None)
    lines.append(f"| {name} | {wall:.1f} | {c['compile_seconds']:.1f} | {c['compile_seconds'] / max(wall, 1e-9):.0%} "
                 f"| {c['trace_seconds']:.1f} | {c['lower_seconds']:.1f} | {c['backend_seconds']:.1f} "
                 f"| {c['cache_load_seconds']:.1f} | {c['programs']} | {c['distinct_functions']} "
                 f"| {f'{worst[0]} x{worst[1]}' if worst else '-'} |")
  lines.append(f"| **all** | {total_wall:.1f} | {total_compile:.1f} | {total_compile / max(total_wall, 1e-9):.0%} "
               f"| | | | | {int(total_programs)} | | |")
  return "\n".join(lines) + "\n"


if __name__ == "__main__":
  if len(sys.argv) != 2:
    sys.exit("usage: python benchmarks/sweep_compile.py WORKDIR")
  print(table(stage_records(sys.argv[1])), end="")
