"""Checkpoint save and restore of a train state, local disk against a bucket, in one run.

  python benchmarks/bench_bucket_checkpoint.py --preset=13m [--repeats=3]

The bucket is fake-gcs-server on loopback (tests/fake_gcs.py, filesystem backend): the same GCS JSON
API and client code paths as Cloud Storage (tensorstore's GCS driver for the arrays, gcsfs for the
directories and orbax's commit marker), without the network. The ratio is therefore the cost of
going through the object-storage protocol, not of a real bucket's latency and bandwidth.

`save_call_s` is how long the step loop is held by a save (orbax copies the arrays to host, then
writes in a background thread); `save_s` runs to the commit; `restore_s` is a restore onto the same
shardings. Medians over --repeats saves (the first, which compiles nothing but warms the clients,
included in none: one warm-up save runs first).
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid

import jax
import ml_collections
import numpy as np
from report import report  # benchmarks/report.py (scripts run from this folder's path)

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
from fake_gcs import FakeGCS  # noqa: E402

from rlhf_jax.model.config import get_preset, param_counts  # noqa: E402
from rlhf_jax.model.transformer import init_params  # noqa: E402
from rlhf_jax.training import sharding as shd  # noqa: E402
from rlhf_jax.training.checkpointing import Checkpointer  # noqa: E402
from rlhf_jax.training.optimizer import make_optimizer  # noqa: E402
from rlhf_jax.training.train_state import create_train_state  # noqa: E402


def _state(preset: str):
  cfg = get_preset(preset)
  opt = ml_collections.ConfigDict(dict(learning_rate=1e-4, warmup_steps=0, final_lr_fraction=1.0,
                                       b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.0, grad_clip=1.0))
  state, _ = create_train_state(lambda r: init_params(cfg, r), make_optimizer(opt, total_steps=10),
                                shd.make_mesh((1, -1, 1)), jax.random.PRNGKey(0))
  return cfg, state


def _time(directory: str, state, repeats: int) -> dict:
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
  calls, saves, restores = [], [], []
  with Checkpointer(directory, max_to_keep=2) as ckpt:
    ckpt.save(0, state)
    ckpt.wait()
    for step in range(1, repeats + 1):
      t0 = time.perf_counter()
      ckpt.save(step, state)
      t1 = time.perf_counter()
      ckpt.wait()
      t2 = time.perf_counter()
      restored, _ = ckpt.restore(abstract, step)
      jax.block_until_ready(restored)
      t3 = time.perf_counter()
      calls.append(t1 - t0)
      saves.append(t2 - t0)
      restores.append(t3 - t2)
  same = all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored)))
  if not same:
    raise SystemExit(f"{directory}: the restored state differs from the saved one")
  return {"save_call_s": statistics.median(calls), "save_s": statistics.median(saves),
          "restore_s": statistics.median(restores)}


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--preset", default="13m")
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--json", default=None, help="append the result as one JSON line to this file")
  args = p.parse_args()
  cfg, state = _state(args.preset)
  nbytes = sum(x.nbytes for x in jax.tree.leaves(state))
  server = FakeGCS(buckets=("bench",))
  os.environ.update(server.env)
  local = tempfile.mkdtemp(prefix="bench_ckpt-")
  try:
    disk = _time(os.path.join(local, "checkpoints"), state, args.repeats)
    bucket = _time(f"gs://bench/{uuid.uuid4().hex}/checkpoints", state, args.repeats)
  finally:
    server.kill()
    shutil.rmtree(local, ignore_errors=True)
  result = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "preset": args.preset,
            "params_total": param_counts(cfg)["total"], "state_mb": nbytes / 2**20}
  result |= {f"local_{k}": v for k, v in disk.items()} | {f"bucket_{k}": v for k, v in bucket.items()}
  result |= {f"bucket_over_local_{k}": bucket[k] / disk[k] for k in ("save_s", "restore_s")}
  report(result, args.json)


if __name__ == "__main__":
  main()
