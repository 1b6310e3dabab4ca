"""What every trainer shares: mesh/model/optimizer/checkpoint set-up, fresh-or-resumed state, and
the step loop with logging, evaluation, checkpointing and SIGTERM handling.

Trainers (train_lm, train_pm) only say how to make a batch, how to take a step and how to
evaluate. A run resumes bitwise because everything a step depends on (params, optimizer state,
step, RNG, data position) is in the checkpointed TrainState.
"""
from __future__ import annotations

import signal
from typing import Any, Callable, NamedTuple, Optional

import jax
import numpy as np
from absl import flags, logging
from jax.sharding import Mesh
from ml_collections import config_flags

from rlhf_jax import hosts, storage
from rlhf_jax.errors import NonFiniteError
from rlhf_jax.model.config import ModelConfig
from rlhf_jax.model.transformer import Transformer, init_params
from rlhf_jax.training import cli
from rlhf_jax.training import sharding as shd
from rlhf_jax.training.checkpointing import Checkpointer
from rlhf_jax.training.metrics import MetricsWriter, StepClock, UnwrittenMetrics, progress
from rlhf_jax.training.optimizer import make_optimizer
from rlhf_jax.training.train_state import TrainState, create_train_state, is_finite, state_shardings


class Preemption:
  """Turns SIGTERM into a flag the loop polls at step boundaries (never mid-step)."""

  def __init__(self):
    self.requested = False
    self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    logging.warning("SIGTERM received: checkpointing and exiting at the end of this step")
    self.requested = True

  def restore(self):
    signal.signal(signal.SIGTERM, self._previous)


class Setup(NamedTuple):
  mesh: Mesh
  model: Transformer
  tx: Any
  abstract: TrainState  # ShapeDtypeStructs with shardings: restore target
  shardings: TrainState
  ckpt: Optional[Checkpointer]  # None when set up for evaluation only


def setup(config, workdir: Optional[str] = None) -> Setup:
  mesh = shd.make_mesh(config.mesh.shape)
  model_cfg = ModelConfig.from_dict(config.model)
  return params_setup(config, workdir, mesh, Transformer(model_cfg), lambda r: init_params(model_cfg, r),
                      config.train.steps)


def params_setup(config, workdir: Optional[str], mesh: Mesh, model: Transformer, init_fn: Callable,
                 total_updates: int, extra: Optional[dict] = None) -> Setup:
  """A Setup whose params are init_fn(rng)'s pytree (one model's params, or a policy with a value
  model beside it) and whose optimizer schedule spans total_updates."""
  tx = make_optimizer(config.optimizer, total_updates)
  abstract, shardings = state_shardings(init_fn, tx, mesh, extra)
  ckpt = workdir and Checkpointer(storage.join(workdir, "checkpoints"),
                                 max_to_keep=config.train.keep_checkpoints,
                                 async_save=config.train.async_checkpointing)
  return Setup(mesh, model, tx, abstract, shardings, ckpt)


def initial_state(config, s: Setup) -> TrainState:
  """A fresh run's state: a seeded init, with the params of the final checkpoint of the run in
  config.init_from if given (e.g. the LM a PM or an SFT run starts from)."""
  state, _ = create_train_state(lambda r: init_params(s.model.cfg, r), s.tx, s.mesh,
                                jax.random.PRNGKey(config.train.seed))
  if config.init_from:
    state = state.replace(params=restore_params(config.init_from, s.abstract))
  return state


def restore_params(run_dir: str, abstract: TrainState):
  """Final params of an earlier run (any optimizer config of the same structure), onto
  abstract's shardings."""
  with Checkpointer(storage.join(run_dir, "checkpoints")) as ckpt:
    return ckpt.restore_params(abstract.params)


def resume_or(s: Setup, fresh: Callable[[], TrainState]) -> TrainState:
  """The newest checkpoint that restores cleanly (damaged newer ones are moved aside), else
  fresh()."""
  if s.ckpt.latest_step() is None:
    return fresh()
  state, _ = s.ckpt.restore_newest_good(s.abstract)
  print(f"resumed from step {int(state.step)} in {s.ckpt.directory}")
  return state


class NonFiniteGuard:
  """The host's half of the non-finite guard (the jitted steps skip a non-finite update and flag
  it, see train_state.keep_if_finite). Flags are read lazily, before each log line and each
  checkpoint, so the loop gains no host sync; past `max_skips` skipped batches the run stops."""

  def __init__(self, max_skips: int, skipped: int = 0):
    self.max_skips, self.skipped, self._pending = max_skips, skipped, []

  def add(self, step: int, metrics: dict) -> None:
    self._pending.append((step, {k: metrics[k] for k in ("nonfinite", "loss", "grad_norm") if k in metrics}))

  def check(self, last_checkpoint: Optional[int], directory: str) -> None:
    pending, self._pending = self._pending, []
    for step, m in pending:
      if float(m["nonfinite"]) == 0:
        continue
      self.skipped += 1
      values = {k: float(v) for k, v in m.items() if k != "nonfinite"}
      # Every metric finite: a PPO iteration whose averages hide one bad minibatch update.
      bad = [f"{k}={v}" for k, v in values.items() if not np.isfinite(v)] or ["minibatch loss or gradient"]
      if self.skipped > self.max_skips:
        raise NonFiniteError(
            f"step {step}: non-finite {', '.join(bad)}; stopped without checkpointing it (last "
            f"checkpoint: {'none' if last_checkpoint is None else f'step {last_checkpoint}'} in "
            f"{directory}). Lower optimizer.learning_rate, clip gradients (optimizer.grad_clip), or "
            f"skip bad batches with train.max_nonfinite_skips=N ({self.skipped - 1} skipped so far)")
      logging.warning("step %d: non-finite %s; update skipped (%d of train.max_nonfinite_skips=%d)",
                      step, ", ".join(bad), self.skipped, self.max_skips)


def _save_finite(ckpt: Checkpointer, step: int, state: TrainState, meta: dict, last_saved: Optional[int],
                 force: bool) -> None:
  """Saves unless the state holds a non-finite value: the in-step guard looks at the loss and
  gradient norm only, this looks at everything that would be written."""
  if not bool(is_finite(state)):
    raise NonFiniteError(f"step {step}: the state holds non-finite values although every loss and "
                         f"gradient norm was finite (an overflowing update?); not checkpointed "
                         f"(last checkpoint: step {last_saved} in {ckpt.directory})")
  ckpt.save(step, state, meta, force=force)


def run_steps(config, workdir: str, s: Setup, state: TrainState, *,
              step: Callable[[TrainState, int], tuple[TrainState, dict]],
              evaluate: Callable[[Any], dict], desc: str,
              run_info: Optional[dict] = None) -> dict[str, float]:
  """Steps to config.train.steps; `step(state, data_position)` makes its batch and updates.
  Returns the last logged metrics."""
  t = config.train
  writer = MetricsWriter(workdir) if hosts.is_lead() else UnwrittenMetrics()
  # The directory the run really used, whatever config.workdir says (a sweep stage, --workdir).
  writer.write_config(dict(config.to_dict(), **(run_info or {}), workdir=storage.absolute(workdir)))
  preemption = Preemption()
  start, last = int(state.step), {}
  guard = NonFiniteGuard(t.get("max_nonfinite_skips", 0),
                         s.ckpt.meta(start).get("nonfinite_skips", 0) if start else 0)
  saved_step = s.ckpt.latest_step()
  bar = progress(t.steps, desc=desc, disable=None if config.progress_bar else True)
  bar.update(start)
  try:
    if start == 0 and t.get("eval_at_start", False):  # the starting point of a curve, e.g. KL = 0
      writer.write(0, evaluate(state.params))
    clock = StepClock(start)
    for i in range(start + 1, t.steps + 1):
      state, metrics = step(state, int(state.data_position))
      clock.stepped(metrics)
      guard.add(i, metrics)
      bar.update(1)
      saved = i % t.checkpoint_every == 0 or i == t.steps
      if i % t.log_every == 0 or i == t.steps:
        guard.check(saved_step, s.ckpt.directory)  # raises before anything bad is logged as good
        last = {k: float(v) for k, v in metrics.items()}  # the only host sync in the loop
        last.update(clock.rates(i), nonfinite_skips=guard.skipped)
        if i % t.eval_every == 0 or i == t.steps:
          with clock.paused():
            last.update(evaluate(state.params))
        writer.write(i, last)
        bar.set_postfix(loss=f"{last['loss']:.3f}")
      stopping = preemption.requested  # polled once a step, after the (possibly long) evaluation
      if saved or stopping:  # orbax refuses a second save of the same step, hence force
        guard.check(saved_step, s.ckpt.directory)
        writer.flush()  # a bucket's metrics object is rewritten lazily: complete up to each checkpoint
        _save_finite(s.ckpt, i, state, {"nonfinite_skips": guard.skipped}, saved_step, force=not saved)
        saved_step = i
      if stopping:
        break
  finally:
    bar.close()
    preemption.restore()
    s.ckpt.close()
    writer.close()
  return last


def config_main(train: Callable[[Any, str], dict], example: str) -> Callable:
  """The absl main of an entry point `python -m rlhf_jax JOB --config=FILE:PRESET [--workdir=DIR]`.

  Flags are defined here, when the module runs as a program, not when it is imported: several
  trainers are imported into one process by tests and notebooks.
  """
  config_flag = config_flags.DEFINE_config_file("config", None, f"Config file, e.g. {example}.",
                                                lock_config=True)
  workdir_flag = flags.DEFINE_string("workdir", None, "Run directory (default: config.workdir).")
  join_processes = cli.define_distributed_flags()

  def main(argv):
    del argv
    if not flags.FLAGS["verbosity"].present:
      logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    join_processes()
    config = config_flag.value
    if config is None:
      cli.fail(f"--config is required, e.g. --config={example}")
    workdir = workdir_flag.value or config.workdir
    last = train(config, workdir)
    with Checkpointer(storage.join(workdir, "checkpoints")) as ckpt:
      saved = ckpt.latest_step()
    if saved != config.train.steps:  # stopped by SIGTERM after checkpointing: not done
      print(f"interrupted at step {saved} of {config.train.steps}; run the same command again to resume")
      raise SystemExit(75)  # EX_TEMPFAIL, as the sweep: schedulers requeue, the rerun resumes
    print(f"done: {workdir} (metrics: {storage.join(workdir, 'metrics.jsonl')}); last: {last}")

  return main
