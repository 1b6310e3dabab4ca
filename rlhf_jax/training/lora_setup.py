"""A LoRA run's set-up: the frozen base it trains over, its state of adapters and heads, and where
they start. Trainers call `frozen_start` for each model they adapt and `initial_params` for a fresh
run; the state, optimizer and checkpoints then hold only the trainable params.
"""
from __future__ import annotations

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp

from rlhf_jax.errors import ConfigError
from rlhf_jax.model import lora
from rlhf_jax.model.config import ModelConfig
from rlhf_jax.model.transformer import Transformer
from rlhf_jax.training import adapters, loop
from rlhf_jax.training import sharding as shd
from rlhf_jax.training.saved_runs import FrozenModel, adapter_init
from rlhf_jax.training.train_state import TrainState, create_train_state


class FrozenStart(NamedTuple):
  base: Any  # the frozen params (in lora.base_dtype), shared with any other model on the same base
  shardings: Any  # their shardings
  start: Any  # trainable params the run starts from: the start run's adapters and heads, or its heads
  spec: lora.LoraSpec


def frozen_start(config, start_from: str, mesh, spec: lora.LoraSpec, bases: Optional[dict] = None,
                 field: str = "init_from") -> FrozenStart:
  """The base and starting trainables of a LoRA model starting from run `start_from`: a dense run
  is the base (fresh adapters, its heads); a LoRA run lends its base and its adapters, which must
  then have this run's LoRA settings."""
  if not start_from:
    raise ConfigError(f"lora.enabled needs {field}: the run whose weights are the frozen base")
  fm = FrozenModel(start_from, mesh, bases=bases)
  if fm.spec is not None and fm.spec != spec:
    raise ConfigError(f"{field}={start_from} is a LoRA run with {fm.spec}, but this run's lora section "
                      f"says {spec}: a run continuing another's adapters keeps their settings")
  dtype = config.lora.get("base_dtype", "")
  key = ("cast", id(fm.base), dtype)  # one cast per base, shared like the base
  if bases is None or key not in bases:
    base = adapters.cast_base(fm.base, dtype)
    if bases is not None:
      bases[key] = base
  base = bases[key] if bases is not None else base
  start = fm.adapters if fm.spec is not None else lora.heads(fm.params)
  return FrozenStart(base, lora.split(fm.shardings.params)[0], start, spec)


def initial_params(fresh: Any, start: Any) -> Any:
  """A fresh run's trainables: `fresh` (A random, B zero, as initialised) with the start run's
  adapters and heads put over them, copied (the state's buffers are donated to each step, and must
  not be the base's)."""
  return lora.join(fresh, jax.tree.map(jnp.copy, start))


def setup_or_dense(config, workdir: str) -> tuple[loop.Setup, TrainState, Optional[FrozenStart]]:
  """(set-up, fresh-or-resumed state, frozen base) of a run of one model that trains from
  config.init_from: dense (frozen None) unless config.lora.enabled, when the state holds the
  adapters and heads, and lora_base.json records the base."""
  cfg = ModelConfig.from_dict(config.model)
  spec = adapters.spec_of(config, cfg)
  if spec is None:
    s = loop.setup(config, workdir)
    return s, loop.resume_or(s, lambda: loop.initial_state(config, s)), None
  mesh = shd.make_mesh(config.mesh.shape)
  frozen = frozen_start(config, config.init_from, mesh, spec)
  adapters.record_base(workdir, config.init_from)
  init_fn = adapter_init(cfg, spec)
  s = loop.params_setup(config, workdir, mesh, Transformer(cfg, spec), init_fn, config.train.steps)

  def fresh():
    state, _ = create_train_state(init_fn, s.tx, mesh, jax.random.PRNGKey(config.train.seed))
    return state.replace(params=initial_params(state.params, frozen.start))
  return s, loop.resume_or(s, fresh), frozen
