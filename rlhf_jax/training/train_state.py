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

from rlhf_jax.training import sharding as shd


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar: number of optimizer updates applied
  params: Any
  opt_state: Any
  rng: jax.Array  # uint32[2] raw key: the stream for dropout/sampling in later steps
  data_position: jax.Array  # int32 scalar: examples consumed, for resumable input
  extra: Any = None  # trainer-specific arrays that must survive a resume (e.g. PPO's KL coefficient)


def _boxed_state(init_params: Callable[[jax.Array], Any], tx: optax.GradientTransformation,
                 rng: jax.Array, extra: Any = None) -> TrainState:
  params_rng, state_rng = jax.random.split(rng)
  params = init_params(params_rng)  # logically partitioned boxes
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                    rng=state_rng, data_position=jnp.zeros((), jnp.int32),
                    extra=jax.tree.map(jnp.asarray, extra))


def state_shardings(init_params: Callable[[jax.Array], Any], tx: optax.GradientTransformation,
                    mesh: Mesh, extra: Any = None) -> tuple[TrainState, TrainState]:
  """(abstract unboxed state, shardings) without allocating anything."""
  boxed = jax.eval_shape(lambda r: _boxed_state(init_params, tx, r, extra), jax.random.PRNGKey(0))
  shardings = shd.logical_to_shardings(boxed, mesh)
  abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          nn.meta.unbox(boxed), shardings)
  return abstract, shardings


def create_train_state(init_params: Callable[[jax.Array], Any], tx: optax.GradientTransformation,
                       mesh: Mesh, rng: jax.Array, extra: Any = None) -> tuple[TrainState, TrainState]:
  """Initialises the state sharded on `mesh`; returns (state, shardings). `extra` (a pytree of
  scalars/arrays, replicated) starts at the given values."""
  _, shardings = state_shardings(init_params, tx, mesh, extra)
  init = jax.jit(lambda r: nn.meta.unbox(_boxed_state(init_params, tx, r, extra)), out_shardings=shardings)
  return init(rng), shardings


def keep_if_finite(new: TrainState, old: TrainState, loss: jax.Array,
                   grad_norm: jax.Array) -> tuple[TrainState, jax.Array]:
  """`new`, unless the loss or the gradient norm is non-finite: then `old`'s params and optimizer
  state under `new`'s step and data position (the bad batch is skipped). Returns (state, 1.0 if
  skipped else 0.0).

  Inside the jitted step, and decided by two scalars known before the update, so XLA fuses the
  select into the update (no second copy of the state). A finite gradient norm bounds every
  squared gradient, hence Adam's moments and updates; what it cannot rule out (a parameter
  overflowing under an absurd learning rate) `is_finite` catches before any checkpoint.
  """
  ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  pick = lambda n, o: jnp.where(ok, n, o)
  state = new.replace(params=jax.tree.map(pick, new.params, old.params),
                      opt_state=jax.tree.map(pick, new.opt_state, old.opt_state))
  return state, 1.0 - ok.astype(jnp.float32)


def apply_update(state: TrainState, grads: Any, tx, loss: jax.Array, rows: int) -> tuple[TrainState, dict]:
  """One optimizer step that advances the step and the data position by `rows`, skipped as
  keep_if_finite decides; -> (state, {"grad_norm", "nonfinite"})."""
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  grad_norm = optax.tree.norm(grads)
  new_state = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                            opt_state=opt_state, data_position=state.data_position + rows)
  new_state, skipped = keep_if_finite(new_state, state, loss, grad_norm)
  return new_state, {"grad_norm": grad_norm, "nonfinite": skipped}


@jax.jit
def is_finite(tree: Any) -> jax.Array:
  """Whether every floating-point leaf is finite (a scalar bool, on device)."""
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)
