"""Presets against their nominal sizes, and the cost formulas against XLA's own counts."""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.model import transformer as M
from rlhf_jax.model.config import NOMINAL_PARAMS, PRESETS, ModelConfig, flops_per_token, get_preset, param_counts


def _abstract_params(cfg):
  return jax.eval_shape(lambda r: nn.meta.unbox(M.init_params(cfg, r)), jax.random.PRNGKey(0))


def _count(tree, skip=()):
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return sum(int(np.prod(x.shape)) for path, x in flat
             if not any(getattr(k, "key", None) in skip for k in path))


@pytest.mark.parametrize("name", sorted(NOMINAL_PARAMS))
def test_preset_matches_nominal_size_without_allocating(name):
  cfg = PRESETS[name]
  params = _abstract_params(cfg)  # shapes only: the 52B preset never touches memory
  non_embedding = _count(params, skip=("embedding", "lm_head"))
  assert abs(non_embedding / NOMINAL_PARAMS[name] - 1) < 0.15, (name, non_embedding)
  # The analytic formula (used for FLOPs and reports) agrees with the real module exactly.
  counts = param_counts(cfg)
  assert counts["non_embedding"] == non_embedding
  assert counts["total"] == _count(params)


def test_tiny_is_under_a_million_parameters():
  assert _count(_abstract_params(PRESETS["tiny"])) < 1_000_000


def test_presets_grow_with_size():
  sizes = [param_counts(PRESETS[n])["non_embedding"] for n in sorted(NOMINAL_PARAMS, key=NOMINAL_PARAMS.get)]
  assert sizes == sorted(sizes)


@pytest.mark.parametrize("training", [False, True])
def test_flops_per_token_matches_xla_cost_analysis(training):
  cfg = dataclasses.replace(PRESETS["13m"], vocab_size=4096)
  seq, batch = 256, 2
  params = _abstract_params(cfg)

  def forward(p, t):
    return M.Transformer(cfg).apply({"params": p}, t).logits

  fn = jax.grad(lambda p, t: forward(p, t).mean()) if training else forward
  tokens = jax.ShapeDtypeStruct((batch, seq), jnp.int32)
  cost = jax.jit(fn).lower(params, tokens).compile().cost_analysis()
  measured = cost["flops"] / (batch * seq)
  # XLA also counts norms, softmax and other elementwise work, which the formula leaves out.
  assert measured == pytest.approx(flops_per_token(cfg, seq, training=training), rel=0.06)


def test_config_validation_names_the_problem():
  with pytest.raises(ValueError, match="num_kv_heads"):
    ModelConfig(num_heads=6, num_kv_heads=4)
  with pytest.raises(ValueError, match="unknown ModelConfig fields.*'d_modle'"):
    ModelConfig.from_dict({"d_modle": 3})
  with pytest.raises(ValueError, match="unknown model preset"):
    get_preset("7b")
  assert ModelConfig.from_dict(PRESETS["13m"].to_dict()) == PRESETS["13m"]
