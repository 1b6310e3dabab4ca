"""Checkpoints with orbax's CheckpointManager: a train state plus a small JSON of metadata.

Saves are asynchronous (the step loop goes on while arrays are written) and keep the last N.
Restoring takes an abstract target (`jax.ShapeDtypeStruct`s carrying shardings), so a state
saved on one mesh restores onto any other mesh shape, or onto a single device.
"""
from __future__ import annotations

import os
from typing import Any, Optional

import orbax.checkpoint as ocp


class Checkpointer:

  def __init__(self, directory: str, *, max_to_keep: int = 3, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                           enable_async_checkpointing=async_save)
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          item_names=("state", "meta"))

  def save(self, step: int, state: Any, meta: Optional[dict] = None, *, force: bool = False) -> bool:
    """Starts saving `state` at `step`; returns whether a save was started."""
    args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                              meta=ocp.args.JsonSave(dict(meta or {}, step=int(step))))
    return self._manager.save(int(step), args=args, force=force)

  def restore(self, abstract_state: Any, step: Optional[int] = None) -> tuple[Any, dict]:
    """Restores (state, meta) at `step` (default: latest) onto the shardings of abstract_state."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
    return restored.state, restored.meta

  def restore_params(self, abstract_params: Any, step: Optional[int] = None) -> Any:
    """Only the params of a saved state, onto abstract_params' shardings: how one run starts from
    another's weights (an LM for a PM, a PM for a value model) whatever its optimizer state."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    item = {"params": abstract_params}
    args = ocp.args.PyTreeRestore(item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
                                  partial_restore=True)
    return self._manager.restore(step, args=ocp.args.Composite(state=args)).state["params"]

  def latest_step(self) -> Optional[int]:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def wait(self) -> None:
    """Blocks until pending async saves are on disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
