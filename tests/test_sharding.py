"""Sharded (8 fake CPU devices, mesh 2x2x2) against unsharded (1 device) training steps."""
import dataclasses
import os

import jax
import ml_collections
import numpy as np
import pytest

from rlhf_jax.model.config import PRESETS
from rlhf_jax.model.transformer import Transformer, init_params
from rlhf_jax.objectives import lm
from rlhf_jax.trainers import lm_steps
from rlhf_jax.training import sharding as shd
from rlhf_jax.training.optimizer import make_optimizer
from rlhf_jax.training.train_state import create_train_state

import numerics

OPT = ml_collections.ConfigDict(dict(learning_rate=1e-3, warmup_steps=0, final_lr_fraction=1.0, b1=0.9,
                                     b2=0.95, eps=1e-8, weight_decay=0.1, grad_clip=1.0))


def _batch(seed, cfg, batch=8, seq=16):
  rng = np.random.default_rng(seed)
  mask = np.ones((batch, seq), bool)
  mask[1, :5] = False  # a left-padded row, so masking is exercised under sharding too
  return {"tokens": rng.integers(0, cfg.vocab_size, (batch, seq)).astype(np.int32),
          "loss_mask": rng.random((batch, seq)) < 0.7, "attention_mask": mask}


def _train(cfg, mesh, steps=2):
  """(initial params, final state, losses, params after each step as host arrays)."""
  tx = make_optimizer(OPT, total_steps=10)
  state, shardings = create_train_state(lambda r: init_params(cfg, r), tx, mesh, jax.random.PRNGKey(0))
  initial = jax.tree.map(np.asarray, state.params)
  step = lm_steps.jit_lm_train_step(Transformer(cfg), tx, mesh, shardings)
  losses, after = [], []
  for i in range(steps):
    state, metrics = step(state, shd.shard_batch(_batch(i, cfg), mesh))
    losses.append(float(metrics["loss"]))
    after.append(jax.tree.map(np.asarray, state.params))
  return initial, state, losses, after


def _grads(cfg, params, mesh, shardings):
  fn = jax.jit(jax.grad(lambda p, b: lm.lm_loss(p, Transformer(cfg), b)[0]),
               in_shardings=(shardings, shd.batch_sharding(mesh)))
  return jax.tree.map(np.asarray, shd.under_mesh(fn, mesh)(params, shd.shard_batch(_batch(0, cfg), mesh)))


@pytest.mark.parametrize("scan_layers", [False, True])
def test_sharded_train_step_equals_single_device(scan_layers):
  cfg = dataclasses.replace(PRESETS["tiny"], scan_layers=scan_layers)
  single = shd.make_mesh((1, 1, 1), jax.devices()[:1])
  sharded = shd.make_mesh((2, 2, 2), jax.devices()[:8])
  init_1, state_1, losses_1, after_1 = _train(cfg, single)
  init_8, state_8, losses_8, after_8 = _train(cfg, sharded)

  jax.tree.map(np.testing.assert_array_equal, init_1, init_8)  # same init on any mesh
  np.testing.assert_allclose(losses_8[0], losses_1[0], rtol=1e-5)  # identical params: reassociation only
  moved = max(float(np.abs(b - a).max()) for a, b in zip(jax.tree.leaves(init_1), jax.tree.leaves(after_1[-1])))
  assert moved > 1e-3  # the comparison below is about a real update, not two copies of init
  # After an Adam update the runs may part by what Adam allows for near-zero gradients (see
  # tests/numerics.py); a sharding bug (e.g. a missing gradient all-reduce) moves most weights by
  # a whole step. Gradients are compared tightly in the next test.
  largest = max(float(np.abs(x).max()) for x in jax.tree.leaves(init_1))
  for t in range(len(after_1)):
    numerics.assert_adam_runs_close(after_1[t], after_8[t], [OPT.learning_rate] * (t + 1), OPT.b1, OPT.b2,
                                    weight_decay=OPT.weight_decay, max_abs_param=largest + 1.0)
  model, batch = Transformer(cfg), _batch(1, cfg)
  values, tol = numerics.first_order_tolerance(lambda p: lm.lm_loss(p, model, batch)[0][None], after_1[0],
                                               after_8[0])
  np.testing.assert_allclose(values[0], losses_1[1], rtol=1e-5)
  assert abs(losses_8[1] - losses_1[1]) <= tol[0], (losses_8[1], losses_1[1], tol[0])

  # Parameters really are split: an MLP kernel is (embed -> fsdp, mlp -> tensor).
  w = state_8.params["layers" if scan_layers else "layer_0"]["mlp"]["w_gate"]
  spec = tuple(w.sharding.spec)
  assert spec[-2:] == ("fsdp", "tensor")
  assert w.addressable_shards[0].data.shape[-2:] == (w.shape[-2] // 2, w.shape[-1] // 2)
  mu = state_8.opt_state[1][0].mu["layers" if scan_layers else "layer_0"]["mlp"]["w_gate"]
  assert mu.sharding == w.sharding  # Adam moments follow their parameters (ZeRO-3)


def test_sharded_gradients_equal_single_device():
  cfg = PRESETS["tiny"]
  results = []
  for shape, devices in [((1, 1, 1), jax.devices()[:1]), ((2, 2, 2), jax.devices()[:8]),
                         ((1, 8, 1), jax.devices()[:8])]:
    mesh = shd.make_mesh(shape, devices)
    tx = make_optimizer(OPT, total_steps=10)
    state, shardings = create_train_state(lambda r: init_params(cfg, r), tx, mesh, jax.random.PRNGKey(0))
    results.append(_grads(cfg, state.params, mesh, shardings.params))
  for other in results[1:]:
    # Entries that nearly cancel (summed over tokens) keep an absolute error of float32 epsilon
    # times the summands' magnitude: a floor relative to the leaf's largest entry.
    jax.tree.map(lambda a, b: np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4 * np.abs(a).max()),
                 results[0], other)


def test_make_mesh_fills_and_validates():
  assert dict(shd.make_mesh((2, -1, 1), jax.devices()[:8]).shape) == {"data": 2, "fsdp": 4, "tensor": 1}
  with pytest.raises(ValueError, match="needs 4 devices, 8 given"):
    shd.make_mesh((2, 2, 1), jax.devices()[:8])
  with pytest.raises(ValueError, match="does not divide"):
    shd.make_mesh((3, -1, 1), jax.devices()[:8])
  with pytest.raises(ValueError, match="3 entries"):
    shd.make_mesh((8,), jax.devices()[:8])


def test_shard_batch_splits_over_data_axes_and_rejects_ragged_batches():
  mesh = shd.make_mesh((2, 2, 2), jax.devices()[:8])
  x = shd.shard_batch({"tokens": np.arange(8 * 3).reshape(8, 3)}, mesh)["tokens"]
  assert x.addressable_shards[0].data.shape == (2, 3)  # 8 rows over data x fsdp = 4 shards
  np.testing.assert_array_equal(np.asarray(x), np.arange(24).reshape(8, 3))
  with pytest.raises(ValueError, match="not divisible by the 4 data-parallel shards"):
    shd.shard_batch({"tokens": np.zeros((6, 3))}, mesh)


_COMPILE_PM_STEP = """
import os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
import jax, jax.numpy as jnp
import flax.linen as nn
sys.path.insert(0, ".")
from rlhf_jax.training import sharding as shd

mesh = shd.make_mesh((2, 2, 2))
if sys.argv[1] == "control":  # a bare lookup in a table split over vocab and embed
  table = jax.ShapeDtypeStruct((1024, 64), jnp.float32, sharding=jax.sharding.NamedSharding(mesh, jax.P("tensor", "fsdp")))
  ids = jax.ShapeDtypeStruct((32, 64), jnp.int32, sharding=shd.batch_sharding(mesh))
  out = jax.sharding.NamedSharding(mesh, jax.P(("data", "fsdp")))
  jax.jit(lambda t, i: jnp.take(t, i, axis=0), out_shardings=out).lower(table, ids).compile()
else:
  from configs import pm as pm_config
  from rlhf_jax.model.transformer import Transformer, init_params
  from rlhf_jax.model.config import get_preset
  from rlhf_jax.training.optimizer import make_optimizer
  from rlhf_jax.trainers.pm_steps import pm_train_step
  from rlhf_jax.training.train_state import state_shardings
  cfg = get_preset("tiny")
  tx = make_optimizer(pm_config.get_config("tiny").optimizer, 10)
  abstract, shardings = state_shardings(lambda r: init_params(cfg, r), tx, mesh)
  bs = shd.batch_sharding(mesh)
  batch = {"tokens": jax.ShapeDtypeStruct((16, 2, 64), jnp.int32, sharding=bs),
           "attention_mask": jax.ShapeDtypeStruct((16, 2, 64), bool, sharding=bs),
           "eoc_index": jax.ShapeDtypeStruct((16, 2), jnp.int32, sharding=bs)}
  step = jax.jit(lambda s, b: pm_train_step(s, b, model=Transformer(cfg), tx=tx),
                 in_shardings=(shardings, bs), out_shardings=(shardings, shd.replicated(mesh)))
  with jax.set_mesh(mesh), nn.logical_axis_rules(shd.LOGICAL_RULES):
    step.lower(abstract, batch).compile()
print("compiled")
"""


@pytest.mark.parametrize("what, warned", [("control", True), ("pm_step", False)])
def test_pm_step_on_a_2x2x2_mesh_compiles_without_replicating_the_embedding(what, warned):
  """XLA warns "Involuntary full rematerialization" when it must replicate a tensor to partition
  an op; the control (a gather from a table split over vocab and embed) shows the warning is seen."""
  import subprocess
  import sys
  root = os.path.join(os.path.dirname(__file__), os.pardir)
  proc = subprocess.run([sys.executable, "-c", _COMPILE_PM_STEP, what], cwd=root, capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 0 and "compiled" in proc.stdout, proc.stderr[-2000:]
  assert ("Involuntary full rematerialization" in proc.stderr) == warned, proc.stderr[-2000:]
