"""Train state: everything a run needs to resume bitwise (params, optimizer state, step, RNG, data position).

The state is a plain pytree (no functions inside), so it can be jitted, sharded and checkpointed
as is. `create_train_state` initialises it directly sharded on a mesh: parameters never exist
unsharded, which is what lets the big presets initialise on a pod.
"""
from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from rlhf_jax import sharding as shd


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar: number of optimizer updates applied
  params: Any
  opt_state: Any
  rng: jax.Array  # uint32[2] raw key: the stream for dropout/sampling in later steps
  data_position: jax.Array  # int32 scalar: examples consumed, for resumable input


def _boxed_state(init_params: Callable[[jax.Array], Any], tx: optax.GradientTransformation,
                 rng: jax.Array) -> TrainState:
  params_rng, state_rng = jax.random.split(rng)
  params = init_params(params_rng)  # logically partitioned boxes
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                    rng=state_rng, data_position=jnp.zeros((), jnp.int32))


def state_shardings(init_params: Callable[[jax.Array], Any], tx: optax.GradientTransformation,
                    mesh: Mesh) -> tuple[TrainState, TrainState]:
  """(abstract unboxed state, shardings) without allocating anything."""
  boxed = jax.eval_shape(lambda r: _boxed_state(init_params, tx, r), jax.random.PRNGKey(0))
  shardings = shd.logical_to_shardings(boxed, mesh)
  abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          nn.meta.unbox(boxed), shardings)
  return abstract, shardings


def create_train_state(init_params: Callable[[jax.Array], Any], tx: optax.GradientTransformation,
                       mesh: Mesh, rng: jax.Array) -> tuple[TrainState, TrainState]:
  """Initialises the state sharded on `mesh`; returns (state, shardings)."""
  _, shardings = state_shardings(init_params, tx, mesh)
  init = jax.jit(lambda r: nn.meta.unbox(_boxed_state(init_params, tx, r)), out_shardings=shardings)
  return init(rng), shardings
