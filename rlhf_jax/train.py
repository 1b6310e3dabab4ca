"""Language-model training entry point.

  python -m rlhf_jax.train --config=configs/lm.py:tiny --config.model.num_layers=3 [--workdir=DIR]

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
from rlhf_jax.metrics import MetricsWriter, progress
from rlhf_jax.model import Transformer, init_params
from rlhf_jax.model_config import ModelConfig
from rlhf_jax.optimizer import make_optimizer
from rlhf_jax.synthetic_data import arithmetic_batch
from rlhf_jax.train_state import create_train_state, state_shardings

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/lm.py:tiny.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (default: config.workdir).")
_DISTRIBUTED = flags.DEFINE_bool("jax_distributed", False,
                                 "Call jax.distributed.initialize() first (multi-host TPU/GPU).")


class _Preemption:
  """Turns SIGTERM into a flag the loop polls at step boundaries (never mid-step)."""

  def __init__(self):
    self.requested = False
    self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    logging.warning("SIGTERM received: checkpointing and exiting at the end of this step")
    self.requested = True

  def restore(self):
    signal.signal(signal.SIGTERM, self._previous)


def _batch(config, position: int, seed: int) -> dict[str, np.ndarray]:
  if config.data.source != "synthetic":
    raise ValueError(f"unknown data.source {config.data.source!r}; available: 'synthetic'")
  t = config.train
  return arithmetic_batch(seed, position, t.batch_size, t.seq_len, config.model.vocab_size)


def _evaluate(eval_step, params, config, mesh) -> dict[str, float]:
  nll, count = 0.0, 0.0
  eval_seed = config.train.seed + 1_000_003  # a disjoint stream: held-out examples
  for i in range(config.train.eval_batches):
    out = eval_step(params, shd.shard_batch(_batch(config, i * config.train.batch_size, eval_seed), mesh))
    nll, count = nll + float(out["nll_sum"]), count + float(out["num_tokens"])
  loss = nll / max(count, 1.0)
  return {"eval_loss": loss, "eval_perplexity": float(np.exp(loss))}


def train(config, workdir: str) -> dict[str, Any]:
  """Trains to config.train.steps (resuming if a checkpoint exists); returns the last metrics."""
  mesh = shd.make_mesh(config.mesh.shape)
  model_cfg = ModelConfig.from_dict(config.model)
  model = Transformer(model_cfg)
  tx = make_optimizer(config.optimizer, config.train.steps)
  init_fn = lambda rng: init_params(model_cfg, rng)
  abstract, shardings = state_shardings(init_fn, tx, mesh)

  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=config.train.keep_checkpoints,
                      async_save=config.train.async_checkpointing)
  if ckpt.latest_step() is not None:
    state, _ = ckpt.restore(abstract)
    print(f"resumed from step {int(state.step)} in {ckpt.directory}")
  else:
    state, _ = create_train_state(init_fn, tx, mesh, jax.random.PRNGKey(config.train.seed))

  train_step = lm.jit_lm_train_step(model, tx, mesh, shardings)
  eval_step = lm.jit_lm_eval_step(model, mesh, shardings.params)
  writer = MetricsWriter(workdir)
  writer.write_config(config.to_dict())
  preemption = _Preemption()
  start_step, last = int(state.step), {}
  bar = progress(config.train.steps, desc="train", disable=None if config.progress_bar else True)
  bar.update(start_step)
  t0 = time.perf_counter()
  try:
    for step in range(start_step + 1, config.train.steps + 1):
      batch = _batch(config, int(state.data_position), config.train.seed)
      state, metrics = train_step(state, shd.shard_batch(batch, mesh))
      bar.update(1)
      if step % config.train.log_every == 0 or step == config.train.steps:
        last = {k: float(v) for k, v in metrics.items()}  # the only host sync in the loop
        elapsed = time.perf_counter() - t0
        last["tokens_per_second"] = (step - start_step) * batch["tokens"].size / elapsed
        if step % config.train.eval_every == 0 or step == config.train.steps:
          last.update(_evaluate(eval_step, state.params, config, mesh))
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
