"""The whole sharding story: a (data, fsdp, tensor) mesh, one logical-axis rules table, and helpers.

Models name their parameter axes logically (`embed`, `mlp`, `heads`, ...); only this module knows
how those names map onto physical mesh axes. Batches are split over (data, fsdp); parameters and
optimizer state are split over fsdp (ZeRO-3 style) and tensor (Megatron style).
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis name -> mesh axis (or None: replicated). One table for every model and step.
LOGICAL_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("norm", None),
    ("layers", None),
    # A LoRA adapter's rank axis: split over fsdp where the other axis is not (B of wq, wk, wv,
    # w_gate, w_up; A of wo, w_down), so no adapter is whole on every device of an FSDP mesh.
    ("lora", "fsdp"),
    ("activation_batch", ("data", "fsdp")),
    ("activation_length", None),
    ("activation_embed", None),
)


def make_mesh(shape: Sequence[int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Mesh of axes (data, fsdp, tensor); one entry of `shape` may be -1 to take the remaining devices."""
  devices = list(jax.devices() if devices is None else devices)
  shape = list(shape)
  if len(shape) != len(MESH_AXES):
    raise ValueError(f"mesh shape {shape} must have {len(MESH_AXES)} entries for axes {MESH_AXES}")
  if shape.count(-1) > 1:
    raise ValueError(f"mesh shape {shape}: at most one axis may be -1")
  if -1 in shape:
    known = int(np.prod([s for s in shape if s != -1]))
    if len(devices) % known:
      raise ValueError(f"mesh shape {shape} does not divide {len(devices)} devices")
    shape[shape.index(-1)] = len(devices) // known
  if int(np.prod(shape)) != len(devices):
    raise ValueError(f"mesh shape {tuple(shape)} needs {int(np.prod(shape))} devices, "
                     f"{len(devices)} given (set one axis to -1 to fill)")
  # Auto axes: shardings propagate through jit as with classic pjit (jax >= 0.10 defaults to Explicit).
  return jax.make_mesh(tuple(shape), MESH_AXES, devices=devices,
                       axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def under_mesh(fn, mesh: Mesh, rules=LOGICAL_RULES):
  """Calls fn (typically a jitted step) with `mesh` and the rules table in context, so that
  activation constraints inside the model (`nn.with_logical_constraint`) resolve when it traces."""

  def wrapped(*args, **kwargs):
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      return fn(*args, **kwargs)

  return wrapped


def logical_to_shardings(boxed_tree: Any, mesh: Mesh, rules=LOGICAL_RULES) -> Any:
  """NamedShardings for a tree whose leaves are logically partitioned boxes (or plain arrays:
  replicated). Works on abstract trees from `jax.eval_shape`."""
  specs = nn.get_partition_spec(boxed_tree)
  shardings = nn.logical_to_mesh_sharding(specs, mesh, rules)
  return jax.tree.map(lambda x, s: _divisible(x, s, mesh), nn.meta.unbox(boxed_tree), shardings)


def _divisible(leaf: Any, sharding: NamedSharding, mesh: Mesh) -> NamedSharding:
  """`sharding` with any axis that its mesh axes do not divide left whole (e.g. a LoRA rank of 8 on
  32 fsdp devices): jit refuses uneven argument shardings."""
  shape = getattr(leaf, "shape", None)
  if shape is None or not isinstance(sharding, NamedSharding):
    return sharding
  spec = list(sharding.spec) + [None] * (len(shape) - len(sharding.spec))
  size = lambda axes: int(np.prod([mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes)]))
  fitted = [axes if axes is None or dim % size(axes) == 0 else None for dim, axes in zip(shape, spec)]
  return sharding if fitted == spec else NamedSharding(mesh, P(*fitted))


def batch_sharding(mesh: Mesh, rules=LOGICAL_RULES) -> NamedSharding:
  """Leading (batch) axis split over the batch mesh axes; everything else replicated."""
  return NamedSharding(mesh, nn.logical_to_mesh_axes(("batch",), rules))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def shard_batch(batch: Any, mesh: Mesh) -> Any:
  """Places a host batch (pytree of numpy arrays with a leading batch axis) onto the mesh.

  Multi-host: every process must pass the same *global* batch (our data loaders are
  deterministic in the position, so they do); each process then transfers only the rows of its
  own devices' shards. Nothing checks that the batches agree: processes that loaded different
  ones train on a mix of them.
  """
  sharding = batch_sharding(mesh)
  num_shards = int(np.prod([mesh.shape[a] for a in ("data", "fsdp")]))
  multi_process = jax.process_count() > 1

  def put(x):
    if x.shape[0] % num_shards:
      raise ValueError(f"batch dimension {x.shape[0]} is not divisible by the {num_shards} "
                       f"data-parallel shards of mesh {dict(mesh.shape)}")
    if not multi_process:
      return jax.device_put(x, sharding)
    # Not device_put: onto other hosts' devices it first asserts the value is equal everywhere,
    # an all-gather of the whole batch every step. The callback only slices this host's rows.
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

  return jax.tree.map(put, batch)


def to_host(x: jax.Array) -> np.ndarray:
  """x as a numpy array on every process: on several hosts an array whose rows live on other
  hosts' devices is all-gathered first (np.asarray alone refuses it)."""
  if jax.process_count() > 1 and isinstance(x, jax.Array) and not x.is_fully_addressable:
    from jax.experimental import multihost_utils
    x = multihost_utils.process_allgather(x, tiled=True)
  return np.asarray(x)


def cache_sharding(mesh: Mesh, stacked: bool, rules=LOGICAL_RULES) -> NamedSharding:
  """KV cache [(layers,) batch, slots, kv_heads, head_dim]: batch over data axes, heads over tensor."""
  axes = ("batch", "length", "kv_heads", "head_dim")
  if stacked:
    axes = ("layers",) + axes
  return NamedSharding(mesh, nn.logical_to_mesh_axes(axes, rules))
