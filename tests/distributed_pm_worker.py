"""One process of a multi-process preference-model run, for tests/test_distributed.py.

  XLA_FLAGS=--xla_force_host_platform_device_count=2 JAX_PLATFORMS=cpu \
      python tests/distributed_pm_worker.py --process_id=0 --num_processes=2 --port=12345 --out=out.json
  (and the same with --process_id=1: each process waits for the others at the coordinator)
  Process 0 writes out.json (losses, mesh) and out.json.params.npz (parameters before and after
  each step).

Every process builds the same global batches from a seed and places them with `shard_batch`;
the processes' devices form one mesh. `train` is also what the test runs in one process, on as
many fake devices, for the reference numbers.
"""
import argparse
import dataclasses
import json

import jax
import ml_collections
import numpy as np

from rlhf_jax.model.config import PRESETS
from rlhf_jax.model.transformer import Transformer, init_params
from rlhf_jax.trainers import pm_steps
from rlhf_jax.training import sharding as shd
from rlhf_jax.training.optimizer import make_optimizer
from rlhf_jax.training.train_state import create_train_state

# Smaller than "tiny": compile time dominates, and two processes share two CPU cores.
CFG = dataclasses.replace(PRESETS["tiny"], vocab_size=128, d_model=32, num_heads=2, num_kv_heads=2,
                          head_dim=16, mlp_dim=64, max_seq_len=32)
OPT = ml_collections.ConfigDict(dict(learning_rate=1e-2, warmup_steps=0, final_lr_fraction=1.0, b1=0.9,
                                     b2=0.95, eps=1e-8, weight_decay=0.1, grad_clip=1.0))
# FSDP over all four devices: each process holds two of the four batch shards and half of each
# split parameter, so the step all-gathers parameters and reduces gradients across processes.
MESH_SHAPE = (1, -1, 1)
BATCH, K, SEQ, STEPS = 8, 2, 16, 3


def comparisons(seed: int, step: int) -> dict[str, np.ndarray]:
  """A global PM batch: K right-padded responses per comparison, eoc token last."""
  rng = np.random.default_rng([seed, step])
  lengths = rng.integers(SEQ // 2, SEQ + 1, (BATCH, K))
  mask = np.arange(SEQ) < lengths[..., None]  # [batch, K, seq]
  tokens = np.where(mask, rng.integers(1, CFG.vocab_size, (BATCH, K, SEQ)), 0).astype(np.int32)
  return {"tokens": tokens, "attention_mask": mask, "loss_mask": mask,
          "eoc_index": (lengths - 1).astype(np.int32)}


def _check_local_rows(placed: dict, host: dict) -> None:
  for name, x in placed.items():
    for shard in x.addressable_shards:
      np.testing.assert_array_equal(np.asarray(shard.data), host[name][shard.index], err_msg=name)


def train(mesh, seed: int) -> dict:
  """STEPS PM train steps on `mesh` -> losses, and the parameters (host numpy) before and after
  each step: STEPS + 1 snapshots."""
  tx = make_optimizer(OPT, total_steps=10)
  state, shardings = create_train_state(lambda r: init_params(CFG, r), tx, mesh, jax.random.PRNGKey(0))
  # Replicated on every device, so that each process can read whole arrays (one compile for the
  # tree, where multihost_utils.process_allgather compiles one gather per leaf).
  replicate = jax.jit(lambda p: p, out_shardings=shd.replicated(mesh))
  snapshot = lambda params: jax.tree.map(np.asarray, replicate(params))
  snapshots = [snapshot(state.params)]
  step = pm_steps.jit_pm_train_step(Transformer(CFG), tx, mesh, shardings)
  losses = []
  for i in range(STEPS):
    host = comparisons(seed, i)
    batch = shd.shard_batch(host, mesh)
    _check_local_rows(batch, host)
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss"]))
    snapshots.append(snapshot(state.params))
  # A batch-sharded array read back on the host (as gold labels and best-of-N read samples and
  # scores): whole on every process, the other host's rows gathered (np.asarray alone refuses it).
  host = comparisons(seed, STEPS)
  np.testing.assert_array_equal(shd.to_host(shd.shard_batch(host, mesh)["tokens"]), host["tokens"])
  return {"losses": losses, "params": snapshots}


def save_snapshots(path: str, snapshots: list) -> None:
  np.savez(path, **{f"{i}/{j}": leaf for i, tree in enumerate(snapshots)
                    for j, leaf in enumerate(jax.tree.leaves(tree))})


def load_snapshots(path: str, like) -> list:
  """The snapshots save_snapshots wrote, as trees shaped like `like`."""
  treedef = jax.tree.structure(like)
  with np.load(path) as f:
    count = 1 + max(int(k.split("/")[0]) for k in f.files)
    return [jax.tree.unflatten(treedef, [f[f"{i}/{j}"] for j in range(treedef.num_leaves)])
            for i in range(count)]


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--process_id", type=int, required=True)
  parser.add_argument("--num_processes", type=int, default=2)
  parser.add_argument("--port", type=int, required=True)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--out", required=True)
  args = parser.parse_args()
  # A peer that never arrives fails the run in a minute rather than the default five.
  jax.distributed.initialize(coordinator_address=f"localhost:{args.port}",
                             num_processes=args.num_processes, process_id=args.process_id,
                             initialization_timeout=60)
  mesh = shd.make_mesh(MESH_SHAPE)
  result = {"process_count": jax.process_count(), "device_count": jax.device_count(),
            "local_device_count": jax.local_device_count(), "mesh": dict(mesh.shape)}
  run = train(mesh, args.seed)
  result["losses"] = run["losses"]
  if jax.process_index() == 0:
    save_snapshots(args.out + ".params.npz", run["params"])
    with open(args.out, "w") as f:  # last: its presence means the parameters are there too
      json.dump(result, f)


if __name__ == "__main__":
  main()
