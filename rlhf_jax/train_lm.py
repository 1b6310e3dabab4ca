"""Language-model training: pretraining, SFT and context distillation on hh-rlhf dialogues.

  python -m rlhf_jax.train_lm --config=configs/lm.py:tiny [--config.objective=sft] [--workdir=DIR]

Resumable: rerunning the same command continues from the latest checkpoint in the workdir,
bitwise as if it had not stopped. SIGTERM (preemption) saves a checkpoint and exits cleanly.
"""
from __future__ import annotations

import os
import signal
import time
from typing import Any

import jax
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from rlhf_jax import lm
from rlhf_jax import sharding as shd
from rlhf_jax.checkpointing import Checkpointer
from rlhf_jax.lm_data import LMData, build_lm_data
from rlhf_jax.metrics import MetricsWriter, progress
from rlhf_jax.model import Transformer, init_params
from rlhf_jax.model_config import ModelConfig
from rlhf_jax.optimizer import make_optimizer
from rlhf_jax.train_state import create_train_state, state_shardings

OBJECTIVES = ("pretrain", "sft", "distill")


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


def _initial_state(config, init_fn, tx, mesh, abstract):
  """The state a fresh run starts from: a seeded init, with the params of the final checkpoint
  of the run in config.init_from if given (the SFT/distillation starting point and teacher)."""
  state, _ = create_train_state(init_fn, tx, mesh, jax.random.PRNGKey(config.train.seed))
  if config.init_from:
    with Checkpointer(os.path.join(config.init_from, "checkpoints")) as ckpt:
      restored, _ = ckpt.restore(abstract)
    state = state.replace(params=restored.params)
  return state


def _distill_batch(batch: dict[str, np.ndarray], prefix: np.ndarray) -> dict[str, np.ndarray]:
  rows = batch["tokens"].shape[0]
  tiled = np.broadcast_to(prefix, (rows, len(prefix)))
  return dict(batch, teacher_tokens=np.concatenate([tiled, batch["tokens"]], axis=1).astype(np.int32),
              teacher_attention_mask=np.concatenate(
                  [np.ones_like(tiled, bool), batch["attention_mask"]], axis=1))


def evaluate(eval_step, params, data: LMData, mesh) -> dict[str, float]:
  """Loss and perplexity over the whole eval set (exact token-weighted mean)."""
  nll, count = 0.0, 0.0
  for batch in data.eval.in_order():
    out = eval_step(params, shd.shard_batch(batch, mesh))
    nll, count = nll + float(out["nll_sum"]), count + float(out["num_tokens"])
  loss = nll / max(count, 1.0)
  return {"eval_loss": loss, "eval_perplexity": float(np.exp(loss))}


def train(config, workdir: str) -> dict[str, Any]:
  """Trains to config.train.steps (resuming if a checkpoint exists); returns the last metrics."""
  if config.objective not in OBJECTIVES:
    raise ValueError(f"objective={config.objective!r}: expected one of {OBJECTIVES}")
  os.makedirs(workdir, exist_ok=True)
  data = build_lm_data(config, workdir)
  mesh = shd.make_mesh(config.mesh.shape)
  model_cfg = ModelConfig.from_dict(config.model)
  model = Transformer(model_cfg)
  tx = make_optimizer(config.optimizer, config.train.steps)
  init_fn = lambda rng: init_params(model_cfg, rng)
  abstract, shardings = state_shardings(init_fn, tx, mesh)

  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=config.train.keep_checkpoints,
                      async_save=config.train.async_checkpointing)
  resuming = ckpt.latest_step() is not None
  state = None if resuming else _initial_state(config, init_fn, tx, mesh, abstract)
  teacher = None
  if config.objective == "distill":  # the frozen initial model, rebuilt identically on resume
    teacher = (state or _initial_state(config, init_fn, tx, mesh, abstract)).params
    teacher = jax.tree.map(lambda x: x.copy(), teacher)  # the step donates the state's buffers
  if resuming:
    state, _ = ckpt.restore(abstract)
    print(f"resumed from step {int(state.step)} in {ckpt.directory}")

  train_step = lm.jit_lm_train_step(model, tx, mesh, shardings, distill=teacher is not None)
  eval_step = lm.jit_lm_eval_step(model, mesh, shardings.params)
  prefix = np.asarray(data.tokenizer.encode(config.distill.prompt), np.int32)
  writer = MetricsWriter(workdir)
  writer.write_config(dict(config.to_dict(), num_train_examples=len(data.train),
                           num_eval_examples=len(data.eval), malformed_skipped=data.skipped))
  preemption = Preemption()
  start_step, last = int(state.step), {}
  bar = progress(config.train.steps, desc=f"train_lm {config.objective}",
                 disable=None if config.progress_bar else True)
  bar.update(start_step)
  t0 = time.perf_counter()
  try:
    for step in range(start_step + 1, config.train.steps + 1):
      batch = data.train.batch_at(int(state.data_position))
      if teacher is not None:
        state, metrics = train_step(state, shd.shard_batch(_distill_batch(batch, prefix), mesh), teacher)
      else:
        state, metrics = train_step(state, shd.shard_batch(batch, mesh))
      bar.update(1)
      if step % config.train.log_every == 0 or step == config.train.steps:
        last = {k: float(v) for k, v in metrics.items()}  # the only host sync in the loop
        last["tokens_per_second"] = (step - start_step) * batch["tokens"].size / (time.perf_counter() - t0)
        if step % config.train.eval_every == 0 or step == config.train.steps:
          last.update(evaluate(eval_step, state.params, data, mesh))
        writer.write(step, last)
        bar.set_postfix(loss=f"{last['loss']:.3f}")
      saved = step % config.train.checkpoint_every == 0 or step == config.train.steps
      if saved:
        ckpt.save(step, state)
      if preemption.requested:
        if not saved:  # orbax refuses a second save of the same step
          ckpt.save(step, state, force=True)
        break
  finally:
    bar.close()
    preemption.restore()
    ckpt.close()
    writer.close()
  return last


_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/lm.py:tiny.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (default: config.workdir).")
_DISTRIBUTED = flags.DEFINE_bool("jax_distributed", False,
                                 "Call jax.distributed.initialize() first (multi-host TPU/GPU).")


def main(argv):
  del argv
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
  if _DISTRIBUTED.value:
    jax.distributed.initialize()
  config = _CONFIG.value
  if config is None:
    raise app.UsageError("--config is required, e.g. --config=configs/lm.py:tiny")
  workdir = _WORKDIR.value or config.workdir
  last = train(config, workdir)
  print(f"done: {workdir} (metrics: {os.path.join(workdir, 'metrics.jsonl')}); last: {last}")


if __name__ == "__main__":
  app.run(main)
