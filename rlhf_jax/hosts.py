"""Which process of a multi-process job (jax.distributed: a TPU pod, SLURM, several processes on
one machine) writes what. Every process runs the same program on its share of the devices; the
files a run leaves (markers, configs, metrics, reports, tokenizers, figures) are written by the
lead process alone, and a process that reads what the lead wrote waits for it at a barrier first.
Checkpoints are the exception: orbax writes each process's shards from that process.

In a single process both are trivial: the process leads, and a barrier returns at once.
"""
from __future__ import annotations

import jax


def is_lead() -> bool:
  """True on the one process that writes a run's files (process 0)."""
  return jax.process_index() == 0


def barrier(name: str) -> None:
  """Waits until every process has reached the barrier of this name (a no-op in one process)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)
