"""Checkpointing tests: bitwise save/restore of the whole train state, async saves, keep-last-N,
restoring onto other mesh shapes (and a single device), and bitwise resumption of training.

Runs on the 8 fake CPU devices that tests/conftest.py asks XLA for.
"""
from __future__ import annotations

import jax
import ml_collections
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from rlhf_jax.model.config import PRESETS
from rlhf_jax.model.transformer import Transformer, init_params
from rlhf_jax.trainers import lm_steps
from rlhf_jax.training import sharding as shd
from rlhf_jax.training.checkpointing import Checkpointer
from rlhf_jax.training.optimizer import make_optimizer
from rlhf_jax.training.train_state import TrainState, create_train_state, state_shardings

BATCH, SEQ = 8, 16
SAVE_MESH = (2, 2, 2)


def _optimizer_config():
  return ml_collections.ConfigDict(dict(
      learning_rate=1e-2, warmup_steps=2, final_lr_fraction=0.1, b1=0.9, b2=0.95, eps=1e-8,
      weight_decay=0.1, grad_clip=1.0))


def _host_batch(i: int) -> dict[str, np.ndarray]:
  rs = np.random.RandomState(1234 + i)
  attention_mask = np.ones((BATCH, SEQ), bool)
  attention_mask[:2, :3] = False  # a couple of left-padded rows
  loss_mask = (rs.rand(BATCH, SEQ) < 0.7).astype(np.float32) * attention_mask
  tokens = rs.randint(0, PRESETS["tiny"].vocab_size, size=(BATCH, SEQ)).astype(np.int32)
  return {"tokens": tokens, "loss_mask": loss_mask, "attention_mask": attention_mask}


def _to_host(tree):
  """Deep host copy (np.array copies, so later donation of the device buffers cannot touch it)."""
  return jax.tree.map(lambda x: np.array(x, copy=True), tree)


def _assert_bitwise_equal(actual, expected):
  a_leaves, a_def = jax.tree_util.tree_flatten_with_path(actual)
  e_leaves, e_def = jax.tree_util.tree_flatten_with_path(expected)
  assert a_def == e_def, f"tree structures differ:\n{a_def}\n{e_def}"
  assert len(a_leaves) > 0
  for (path, a), (_, e) in zip(a_leaves, e_leaves):
    name = jax.tree_util.keystr(path)
    a, e = np.asarray(a), np.asarray(e)
    assert a.dtype == e.dtype, f"{name}: dtype {a.dtype} != {e.dtype}"
    assert a.shape == e.shape, f"{name}: shape {a.shape} != {e.shape}"
    assert a.tobytes() == e.tobytes(), f"{name}: values differ"


class Setup:
  """One model/optimizer/mesh and one compiled train step, shared by the whole module."""

  def __init__(self):
    self.cfg = PRESETS["tiny"]
    self.model = Transformer(self.cfg)
    self.tx = make_optimizer(_optimizer_config(), total_steps=10)
    self.init_fn = lambda r: init_params(self.cfg, r)
    self.mesh = shd.make_mesh(SAVE_MESH)
    self.abstract, self.shardings = state_shardings(self.init_fn, self.tx, self.mesh)
    self.train_step = lm_steps.jit_lm_train_step(self.model, self.tx, self.mesh, self.shardings)
    self.host_batches = [_host_batch(i) for i in range(4)]
    state, shardings = create_train_state(self.init_fn, self.tx, self.mesh, jax.random.PRNGKey(0))
    assert jax.tree.structure(shardings) == jax.tree.structure(self.shardings)
    # create_train_state jits a fresh closure (and so recompiles) on every call: initialise once
    # and hand out device copies of a host snapshot instead.
    self._initial = _to_host(state)

  def fresh_state(self) -> TrainState:
    """A new on-mesh copy of the initial state (the train step donates what it is given)."""
    return jax.device_put(self._initial, self.shardings)

  def train(self, state: TrainState, batch_indices) -> TrainState:
    """Steps `state` (whose buffers are donated) through the given batches."""
    for i in batch_indices:
      state, _ = self.train_step(state, shd.shard_batch(self.host_batches[i], self.mesh))
    return state


@pytest.fixture(scope="module")
def setup() -> Setup:
  return Setup()


@pytest.fixture(scope="module")
def trained(setup):
  """(device state after 2 steps, host copy of it). Tests must not donate the device state."""
  state = setup.train(setup.fresh_state(), [0, 1])
  return state, _to_host(state)


def test_trained_state_is_non_trivial(trained):
  _, host = trained
  assert int(host.step) == 2 and int(host.data_position) == 2 * BATCH
  assert host.rng.dtype == np.uint32 and host.rng.shape == (2,)
  # Adam moments after two steps are non-zero, and the schedule's counters have advanced.
  adam_state = host.opt_state[1][0]
  assert any(np.any(m != 0) for m in jax.tree.leaves(adam_state.mu))
  assert any(np.any(v != 0) for v in jax.tree.leaves(adam_state.nu))
  assert int(adam_state.count) == 2


def test_save_restore_bitwise(setup, trained, tmp_path):
  state, host = trained
  meta = {"model": "tiny", "loss": 1.25, "tags": ["a", "b"], "nested": {"x": 1}}
  with Checkpointer(tmp_path / "ckpt", async_save=False) as ckpt:
    assert ckpt.save(2, state, meta)
    ckpt.wait()
    assert ckpt.all_steps() == [2] and ckpt.latest_step() == 2
    restored, restored_meta = ckpt.restore(setup.abstract)
  assert isinstance(restored, TrainState)
  _assert_bitwise_equal(restored, host)
  assert restored_meta == dict(meta, step=2)
  # Restored onto the same shardings it was saved with.
  for r, s in zip(jax.tree.leaves(restored), jax.tree.leaves(setup.shardings)):
    assert r.sharding == s
  # The source state was not consumed by the save.
  _assert_bitwise_equal(state, host)


def test_async_save_restore_bitwise(setup, trained, tmp_path):
  state, host = trained
  with Checkpointer(tmp_path / "ckpt", async_save=True) as ckpt:
    assert ckpt.save(2, state, {"note": "async"})
    ckpt.wait()
    restored, meta = ckpt.restore(setup.abstract)
  _assert_bitwise_equal(restored, host)
  assert meta == {"note": "async", "step": 2}


def test_async_save_then_donating_step(setup, tmp_path):
  """The training loop's pattern: async save, then the next (donating) step runs at once.
  The checkpoint must hold the state as it was at save time."""
  state = setup.train(setup.fresh_state(), [0])
  host = _to_host(state)
  with Checkpointer(tmp_path / "ckpt", async_save=True) as ckpt:
    ckpt.save(1, state)
    state = setup.train(state, [1, 2])  # donates the buffers being saved
    jax.block_until_ready(state)
    ckpt.wait()
    restored, _ = ckpt.restore(setup.abstract, step=1)
  _assert_bitwise_equal(restored, host)
  assert int(state.step) == 3


def test_keep_last_n(setup, tmp_path):
  state = setup.fresh_state()
  hosts = {}
  with Checkpointer(tmp_path / "ckpt", max_to_keep=2) as ckpt:
    for step in (1, 2, 3):
      state = setup.train(state, [step - 1])
      hosts[step] = _to_host(state)
      assert ckpt.save(step, state)
    ckpt.wait()
    assert ckpt.all_steps() == [2, 3]
    assert ckpt.latest_step() == 3
    restored2, meta2 = ckpt.restore(setup.abstract, step=2)
    restored_latest, meta_latest = ckpt.restore(setup.abstract)
  assert int(hosts[2].step) == 2 and int(hosts[3].step) == 3
  _assert_bitwise_equal(restored2, hosts[2])
  _assert_bitwise_equal(restored_latest, hosts[3])
  assert meta2 == {"step": 2} and meta_latest == {"step": 3}
  # A fresh Checkpointer on the same directory sees the same steps.
  with Checkpointer(tmp_path / "ckpt", max_to_keep=2) as ckpt:
    assert ckpt.all_steps() == [2, 3] and ckpt.latest_step() == 3


@pytest.mark.parametrize("mesh_shape,num_devices", [((1, 8, 1), 8), ((1, 1, 1), 1)])
def test_restore_onto_other_mesh(setup, trained, tmp_path, mesh_shape, num_devices):
  state, host = trained
  with Checkpointer(tmp_path / "ckpt") as ckpt:
    ckpt.save(2, state)
    ckpt.wait()
  assert tuple(state.params["layer_0"]["mlp"]["w_gate"].sharding.mesh.shape.values()) == SAVE_MESH

  devices = jax.devices()[:num_devices]
  target_mesh = shd.make_mesh(mesh_shape, devices=devices)
  abstract, shardings = state_shardings(setup.init_fn, setup.tx, target_mesh)
  with Checkpointer(tmp_path / "ckpt") as ckpt:
    restored, _ = ckpt.restore(abstract)

  _assert_bitwise_equal(restored, host)
  for r, s in zip(jax.tree.leaves(restored), jax.tree.leaves(shardings)):
    assert r.sharding == s
    assert set(r.sharding.device_set) == set(devices)

  w = restored.params["layer_0"]["mlp"]["w_gate"]  # logical (embed, mlp) -> (fsdp, tensor)
  d_model, mlp_dim = setup.cfg.d_model, setup.cfg.mlp_dim
  assert w.shape == (d_model, mlp_dim)
  assert isinstance(w.sharding, NamedSharding)
  assert dict(w.sharding.mesh.shape) == dict(zip(shd.MESH_AXES, mesh_shape))
  assert w.sharding.spec == P("fsdp", "tensor")
  fsdp, tensor = mesh_shape[1], mesh_shape[2]
  assert len(w.addressable_shards) == num_devices
  expected_shard = (d_model // fsdp, mlp_dim // tensor)
  assert all(s.data.shape == expected_shard for s in w.addressable_shards)
  if num_devices == 8:
    assert expected_shard == (d_model // 8, mlp_dim)  # actually split over the 8 devices
    assert {s.device for s in w.addressable_shards} == set(devices)
  # Adam moments follow the parameters' shardings.
  mu = restored.opt_state[1][0].mu["layer_0"]["mlp"]["w_gate"]
  assert mu.sharding == w.sharding


def test_restore_empty_directory_raises(setup, tmp_path):
  empty = tmp_path / "empty"
  empty.mkdir()
  with Checkpointer(empty) as ckpt:
    assert ckpt.latest_step() is None and ckpt.all_steps() == []
    with pytest.raises(FileNotFoundError):
      ckpt.restore(setup.abstract)


def test_resume_matches_uninterrupted_run(setup, tmp_path):
  uninterrupted = _to_host(setup.train(setup.fresh_state(), [0, 1, 2, 3]))

  first_half = setup.train(setup.fresh_state(), [0, 1])
  with Checkpointer(tmp_path / "ckpt") as ckpt:
    ckpt.save(int(first_half.step), first_half)
  del first_half
  with Checkpointer(tmp_path / "ckpt") as ckpt:  # a new process would see only the directory
    resumed, meta = ckpt.restore(setup.abstract)
  assert meta == {"step": 2} and int(resumed.step) == 2
  resumed = _to_host(setup.train(resumed, [2, 3]))

  assert int(resumed.step) == 4 and int(resumed.data_position) == 4 * BATCH
  _assert_bitwise_equal(resumed, uninterrupted)
  # Training did move the parameters: the equality above is not vacuous.
  two_steps = _to_host(setup.train(setup.fresh_state(), [0, 1]))
  assert not np.array_equal(two_steps.params["layer_0"]["mlp"]["w_gate"],
                            resumed.params["layer_0"]["mlp"]["w_gate"])
