"""Test-session setup: 8 fake CPU devices, so sharded-vs-unsharded tests run on any machine.

XLA reads the flag once, when jax first initialises its backend, so it is set here, before any
test module imports jax.
"""
import os

_FLAG = "--xla_force_host_platform_device_count=8"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()

