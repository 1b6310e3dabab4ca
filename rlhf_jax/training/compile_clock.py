"""How much of a block of work went to JAX's compilation: tracing, lowering, XLA's backend compile,
and persistent-cache loads, from the duration events jax.monitoring reports, with the number of
programs compiled and how many distinct functions they came from.

The sweep wraps each stage in one (`stage_done.json` gets its `compile` record), so a sweep's
compile time and program count per stage can be read off any run directory
(benchmarks/sweep_compile.py tabulates them)."""
import collections
import contextlib
import threading
from typing import Iterator

import jax

# Event names as jax/_src/dispatch.py and compiler.py emit them. The backend phase spans XLA's
# compile or, on a persistent-cache hit, the load that replaces it (cache_load_seconds, a part of it).
_PHASES = {
    "/jax/core/compile/jaxpr_trace_duration": "trace_seconds",
    "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower_seconds",
    "/jax/core/compile/backend_compile_duration": "backend_seconds",
}
_BACKEND = "/jax/core/compile/backend_compile_duration"
_CACHE_LOAD = "/jax/compilation_cache/cache_retrieval_time_sec"
_CACHE_HIT = "/jax/compilation_cache/cache_hits"


class CompileClock:
  """Sums compile durations reported while `measuring()` is open (any thread of this process)."""

  def __init__(self):
    self._lock = threading.Lock()
    self.seconds: dict[str, float] = collections.defaultdict(float)
    self.programs: collections.Counter = collections.Counter()  # backend compiles per function name
    self.cache_load_seconds, self.cache_hits = 0.0, 0

  def _listen(self, event: str, duration: float, **kwargs) -> None:
    with self._lock:
      if event in _PHASES:
        self.seconds[_PHASES[event]] += duration
      if event == _BACKEND:
        self.programs[str(kwargs.get("fun_name", "?"))] += 1
      elif event == _CACHE_LOAD:
        self.cache_load_seconds += duration

  def _count(self, event: str, **kwargs) -> None:
    if event == _CACHE_HIT:
      with self._lock:
        self.cache_hits += 1

  @contextlib.contextmanager
  def measuring(self) -> Iterator["CompileClock"]:
    jax.monitoring.register_event_duration_secs_listener(self._listen)
    jax.monitoring.register_event_listener(self._count)
    try:
      yield self
    finally:
      jax.monitoring.unregister_event_duration_listener(self._listen)
      jax.monitoring.unregister_event_listener(self._count)

  def record(self) -> dict:
    """What a stage record keeps: seconds per phase, their total, and the program counts (a
    program loaded from the persistent cache counts as compiled, and among cache_hits)."""
    with self._lock:
      out = {phase: round(self.seconds.get(phase, 0.0), 3) for phase in _PHASES.values()}
      out["compile_seconds"] = round(sum(self.seconds.values()), 3)
      out["cache_load_seconds"] = round(self.cache_load_seconds, 3)
      out["cache_hits"] = self.cache_hits
      out["programs"] = sum(self.programs.values())
      out["distinct_functions"] = len(self.programs)
      out["recompiled"] = {name: n for name, n in sorted(self.programs.items()) if n > 1}
    return out
