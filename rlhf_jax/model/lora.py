"""LoRA (Hu et al. 2021): a low-rank update W + (alpha / rank) A B on chosen weights of a frozen base.

The adapters are ordinary parameters of the same modules, named `<weight>_lora_a` / `_lora_b`,
created only when the Transformer is given a LoraSpec and initialised. A call whose params hold
them applies them; a call with the base's params alone is the base exactly. So one model object
serves the policy and PPO's reference, and one frozen base tree can sit under several adapter sets
(policy, value, PM) without a copy: `join(base, adapters)` is a dict union, not new arrays.

A has the weight's input axes plus a rank axis, B the rank axis plus its output axes, so the
einsum weights (wq [embed, heads, head_dim], wo [heads, head_dim, embed]) need no reshaping:
delta(x) = (x . A) . B contracted over those axes. A starts as PEFT's (uniform in +-1/sqrt(fan_in)),
B at zero, so a fresh adapter leaves the model unchanged. The trainable set is the adapters and
the scalar head (a PM's or value model's head is new, and tiny).
"""
from __future__ import annotations

from typing import Any, NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

from rlhf_jax.errors import ConfigError

# Every weight a LoRA may target, with (input axes, output axes) of its einsum.
TARGETS = {"wq": 1, "wk": 1, "wv": 1, "wo": 2, "w_gate": 1, "w_up": 1, "w_down": 1}  # input ndim
SUFFIX_A, SUFFIX_B = "_lora_a", "_lora_b"
HEADS = ("scalar_head", "scalar_bias")  # trained with the adapters


class LoraSpec(NamedTuple):
  rank: int
  alpha: float
  dropout: float = 0.0
  targets: tuple[str, ...] = tuple(TARGETS)

  @property
  def scale(self) -> float:
    return self.alpha / self.rank


def spec_from_config(c, model_cfg=None) -> Optional[LoraSpec]:
  """The LoraSpec of a `lora` config section, None when it is absent or not enabled; bad values
  (an unknown target, a rank of 0 or wider than a targeted weight) are ConfigErrors."""
  if c is None or not c.get("enabled", False):
    return None
  targets = tuple(c.targets.split(",")) if isinstance(c.targets, str) else tuple(c.targets)
  targets = tuple(t.strip() for t in targets if t.strip())
  unknown = [t for t in targets if t not in TARGETS]
  if unknown or not targets:
    raise ConfigError(f"lora.targets={list(targets)}: {unknown or 'empty'} names no module; "
                      f"expected some of {list(TARGETS)}")
  if not isinstance(c.rank, int) or c.rank < 1:
    raise ConfigError(f"lora.rank={c.rank!r}: must be a positive integer")
  if not 0.0 <= c.dropout < 1.0:
    raise ConfigError(f"lora.dropout={c.dropout}: must be in [0, 1)")
  spec = LoraSpec(int(c.rank), float(c.alpha), float(c.dropout), targets)
  if model_cfg is not None:
    widths = weight_widths(model_cfg)
    narrow = {t: widths[t] for t in targets if spec.rank > widths[t]}
    if narrow:
      raise ConfigError(f"lora.rank={spec.rank} is above the width of {narrow} (min(fan_in, fan_out))")
  return spec


def weight_widths(cfg) -> dict[str, int]:
  """min(fan_in, fan_out) of each targetable weight: the largest rank a LoRA of it can have."""
  q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
  d, m = cfg.d_model, cfg.mlp_dim
  return {"wq": min(d, q), "wk": min(d, kv), "wv": min(d, kv), "wo": min(q, d),
          "w_gate": min(d, m), "w_up": min(d, m), "w_down": min(m, d)}


def _a_init(in_ndim: int):
  def init(key, shape, dtype):
    fan_in = 1
    for n in shape[:in_ndim]:
      fan_in *= n
    bound = fan_in ** -0.5
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init


def delta(module: nn.Module, spec: Optional[LoraSpec], name: str, x, w_shape, axes, dtype):
  """The LoRA term of weight `name` (shape w_shape, logical axes `axes`) on input x, or None when
  the module has no adapter for it in this call."""
  if spec is None or name not in spec.targets:
    return None
  if not (module.is_initializing() or module.has_variable("params", name + SUFFIX_A)):
    return None  # the base alone: adapters switched off
  n_in = TARGETS[name]
  in_shape, out_shape = tuple(w_shape[:n_in]), tuple(w_shape[n_in:])
  a = module.param(name + SUFFIX_A, nn.with_logical_partitioning(_a_init(n_in), (*axes[:n_in], "lora")),
                   (*in_shape, spec.rank), jnp.float32)
  b = module.param(name + SUFFIX_B, nn.with_logical_partitioning(nn.initializers.zeros, ("lora", *axes[n_in:])),
                   (spec.rank, *out_shape), jnp.float32)
  if spec.dropout > 0 and module.has_rng("dropout"):  # dropout only where the caller passes a key
    keep = jax.random.bernoulli(module.make_rng("dropout"), 1.0 - spec.dropout, x.shape)
    x = jnp.where(keep, x / (1.0 - spec.dropout), 0).astype(x.dtype)
  xa = jnp.tensordot(x, a.astype(dtype), axes=n_in)
  return jnp.tensordot(xa, (spec.scale * b).astype(dtype), axes=1)


def _is_trainable(path: tuple) -> bool:
  return _is_adapter(path) or path[-1] in HEADS


def _is_adapter(path: tuple) -> bool:
  return path[-1].endswith((SUFFIX_A, SUFFIX_B))


def split(params) -> tuple[dict, dict]:
  """(base, trainable) of a params tree that holds adapters: everything but the adapters (a whole
  base model, heads included), and the adapters with the heads (which join puts over the base's)."""
  flat = traverse_util.flatten_dict(params)
  base = {k: v for k, v in flat.items() if not _is_adapter(k)}
  trainable = {k: v for k, v in flat.items() if _is_trainable(k)}
  return traverse_util.unflatten_dict(base), traverse_util.unflatten_dict(trainable)


def trainable(params) -> dict:
  return split(params)[1]


def heads(params) -> dict:
  """The scalar head of a whole model's params: what a LoRA run starting from a dense run trains
  from that run's values (its adapters start fresh)."""
  flat = traverse_util.flatten_dict(params)
  return traverse_util.unflatten_dict({k: v for k, v in flat.items() if k[-1] in HEADS})


def join(base, trainable_params) -> Any:
  """The params a LoRA model is called with: base's arrays, with the adapters added and the heads
  replaced by the trainable ones. base None: trainable_params is already a whole model's params."""
  if base is None:
    return trainable_params
  flat = traverse_util.flatten_dict(base)
  flat.update(traverse_util.flatten_dict(trainable_params))
  return traverse_util.unflatten_dict(flat)


def has_adapters(params) -> bool:
  return any(_is_adapter(k) for k in traverse_util.flatten_dict(params))


def merge(params, spec: LoraSpec) -> dict:
  """A dense model's params: each adapted weight replaced by W + scale A B (in float32, then the
  weight's dtype), the adapters dropped. For export, and a dense model equal to the LoRA one."""
  flat = traverse_util.flatten_dict(params)
  out = {}
  for key, value in flat.items():
    if _is_adapter(key):
      continue
    a_key = key[:-1] + (key[-1] + SUFFIX_A,)
    if a_key in flat:
      a, b = flat[a_key], flat[key[:-1] + (key[-1] + SUFFIX_B,)]
      n_in = TARGETS[key[-1]]
      stacked = a.ndim > n_in + 1  # scanned layers: a leading layer axis on every leaf
      eq_a = "l" + "ijk"[:n_in] + "r" if stacked else "ijk"[:n_in] + "r"
      out_axes = "mno"[:b.ndim - (2 if stacked else 1)]
      eq_b = ("lr" if stacked else "r") + out_axes
      eq_out = ("l" if stacked else "") + "ijk"[:n_in] + out_axes
      update = jnp.einsum(f"{eq_a},{eq_b}->{eq_out}", a, b, precision=jax.lax.Precision.HIGHEST)
      value = (value.astype(jnp.float32) + spec.scale * update).astype(value.dtype)
    out[key] = value
  return traverse_util.unflatten_dict(out)
