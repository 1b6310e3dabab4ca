"""The machinery every trainer shares. May import: errors, model, data, objectives.

  sharding.py           the (data, fsdp, tensor) mesh, logical-axis rules, batch/state placement
  train_state.py        TrainState and its sharded initialisation; the non-finite guard
  optimizer.py          AdamW, warmup / cosine schedule, clipping, from config
  grad_accumulation.py  exact token-weighted micro-batches
  checkpointing.py      orbax CheckpointManager: async saves, restore onto any mesh, damaged steps aside
  metrics.py            JSONL + TensorBoard metrics, progress bars
  loop.py               set-up, fresh-or-resumed state, the step loop, SIGTERM, a job's absl main
  saved_runs.py         finished runs read back: config, frozen model, policy at a step, tokenizer
  cli.py                how a job meets its user: a mistake is one line and exit status 2
"""
