"""Test-session setup: 8 fake CPU devices, so sharded-vs-unsharded tests run on any machine.

XLA reads the flag once, when jax first initialises its backend, so it is set here, before any
test module imports jax.
"""
import os
import tempfile

_FLAG = "--xla_force_host_platform_device_count=8"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()

# Programs compiled once are reused by later tests and by the subprocesses that entry-point
# tests start (they inherit the environment): the same train step is compiled in several runs.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), "rlhf_jax_test_compilation_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
