"""Checkpoints with orbax's CheckpointManager: a train state plus a small JSON of metadata.

Saves are asynchronous (the step loop goes on while arrays are written) and keep the last N.
Restoring takes an abstract target (`jax.ShapeDtypeStruct`s carrying shardings), so a state
saved on one mesh restores onto any other mesh shape, or onto a single device.

A step that fails to restore (a truncated array file, a half-copied directory) is moved aside to
`<run>/checkpoints_corrupt/`, never deleted, and the next newest step is tried.

The directory may be local or on object storage (`gs://BUCKET/PATH`, rlhf_jax.storage): orbax
writes there itself (tensorstore for the arrays).
"""
from __future__ import annotations

import contextlib
import gc
import logging as pylogging
import sys
import threading
import time
from typing import Any, Optional

import orbax.checkpoint as ocp

from rlhf_jax import hosts, storage
from rlhf_jax.errors import CheckpointError, StorageError

CORRUPT_DIR = "checkpoints_corrupt"


def _is_orphaned_read_noise(exc: BaseException, obj: Any = None) -> bool:
  # When one array of a checkpoint fails to read, orbax abandons the other reads; their
  # tensorstore callbacks then fire into a closed event loop, dozens of tracebacks of no use.
  return ((isinstance(exc, RuntimeError) and "Event loop is closed" in str(exc))
          or "_read_array_index_and_device_put" in repr(obj))


@contextlib.contextmanager
def _quiet_orphaned_reads():
  """Silences only that noise (everything else still reaches the original hooks) while a restore
  is tried and its abandoned reads are cleaned up."""
  hooks = sys.excepthook, sys.unraisablehook, threading.excepthook
  sys.excepthook = lambda t, e, tb: None if _is_orphaned_read_noise(e) else hooks[0](t, e, tb)
  sys.unraisablehook = lambda u: None if _is_orphaned_read_noise(u.exc_value, u.object) else hooks[1](u)
  threading.excepthook = lambda a: None if _is_orphaned_read_noise(a.exc_value) else hooks[2](a)
  asyncio_logger = pylogging.getLogger("asyncio")  # "Task exception was never retrieved"
  asyncio_logger.addFilter(_drop_abandoned_task_reports)
  try:
    yield
  finally:
    sys.excepthook, sys.unraisablehook, threading.excepthook = hooks
    asyncio_logger.removeFilter(_drop_abandoned_task_reports)


def _drop_abandoned_task_reports(record: pylogging.LogRecord) -> bool:
  return "exception was never retrieved" not in record.getMessage()


def _reason(e: Exception) -> str:
  first = str(e).split("See full TensorStore details")[0].strip().splitlines()
  return f"{type(e).__name__}: {first[0] if first else ''}"[:300]


def _settle() -> None:
  time.sleep(0.2)  # let the abandoned reads finish, then collect them while still silenced
  gc.collect()


class Checkpointer:

  def __init__(self, directory: str, *, max_to_keep: int = 3, async_save: bool = True):
    self.directory = storage.absolute(directory)  # a gs:// URL as it is
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                           enable_async_checkpointing=async_save)
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          item_names=("state", "meta"))

  @contextlib.contextmanager
  def _service(self, what: str):
    """A bucket that stops answering (after the clients' bounded retries) as one line naming the
    directory; the last committed step is untouched (orbax commits a step with a marker written
    last), so a rerun once the service is back resumes from it."""
    try:
      yield
    except Exception as e:  # gcsfs/aiohttp/tensorstore each raise their own types
      if storage.is_remote(self.directory) and storage.transport_error(e):
        raise StorageError(f"{self.directory}: {what} failed, the storage service did not answer "
                           f"({storage.describe(e)}); run again to resume from the last committed step") from e
      raise

  def save(self, step: int, state: Any, meta: Optional[dict] = None, *, force: bool = False) -> bool:
    """Starts saving `state` at `step`; returns whether a save was started."""
    args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                              meta=ocp.args.JsonSave(dict(meta or {}, step=int(step))))
    with self._service(f"saving step {step}"):
      return self._manager.save(int(step), args=args, force=force)

  def restore(self, abstract_state: Any, step: Optional[int] = None) -> tuple[Any, dict]:
    """Restores (state, meta) at `step` (default: latest) onto the shardings of abstract_state."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    with self._service(f"restoring step {step}"):
      restored = self._manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
    return restored.state, restored.meta

  def restore_newest_good(self, abstract_state: Any) -> tuple[Any, dict]:
    """(state, meta) of the newest step that restores cleanly; the steps above it that fail are
    reported and moved aside. Raises CheckpointError when no step restores."""
    failures = []
    for step in sorted(self.all_steps(), reverse=True):
      with _quiet_orphaned_reads():
        try:
          return self.restore(abstract_state, step)
        except StorageError:  # the service, not the step: nothing is moved aside
          raise
        except Exception as e:  # orbax/tensorstore raise many types for damaged files
          reason = _reason(e)
        _settle()
      moved = self._move_aside(step)
      print(f"checkpoint step {step} does not restore ({reason}); moved to {moved}", flush=True)
      failures.append(f"step {step}: {reason}")
    raise CheckpointError(f"{self.directory}: no checkpoint restores cleanly ("
                          f"{'; '.join(failures) or 'none saved'}); damaged steps are in "
                          f"{storage.join(storage.dirname(self.directory), CORRUPT_DIR)}")

  def _move_aside(self, step: int) -> str:
    target_root = storage.join(storage.dirname(self.directory), CORRUPT_DIR)
    storage.makedirs(target_root)
    target = storage.join(target_root, f"{step}-{time.strftime('%Y%m%dT%H%M%S')}")
    while storage.exists(target):
      target += "_"
    if hosts.is_lead():  # every host saw the same failure; one moves the directory
      # Locally one rename; in a bucket a copy of each object, then the deletion of the originals:
      # not atomic, but a move cut short leaves (part of) the step in place, found damaged and
      # moved aside again by the next restore.
      storage.move(storage.join(self.directory, str(step)), target)
    hosts.barrier(f"checkpoint {step} moved aside")
    self._manager.reload()  # forget the moved step
    return target

  def restore_params(self, abstract_params: Any, step: Optional[int] = None) -> Any:
    """Only the params of a saved state, onto abstract_params' shardings: how one run starts from
    another's weights (an LM for a PM, a PM for a value model) whatever its optimizer state."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    item = {"params": abstract_params}
    args = ocp.args.PyTreeRestore(item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
                                  partial_restore=True)
    with _quiet_orphaned_reads():
      try:
        return self._manager.restore(step, args=ocp.args.Composite(state=args)).state["params"]
      except Exception as e:  # another run's final weights: no silent fallback to older ones
        reason = _reason(e)
      _settle()
    raise CheckpointError(f"{storage.join(self.directory, str(step))}: the params do not restore "
                          f"({reason})")

  def meta(self, step: int) -> dict:
    """The JSON metadata saved with `step` ({} for a checkpoint without it)."""
    try:
      return dict(self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta)
    except (KeyError, FileNotFoundError, ValueError):
      return {}

  def latest_step(self) -> Optional[int]:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def wait(self) -> None:
    """Blocks until pending async saves are on disk."""
    with self._service("a save"):
      self._manager.wait_until_finished()

  def close(self) -> None:
    with self._service("a save"):
      self._manager.wait_until_finished()
    self._manager.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
