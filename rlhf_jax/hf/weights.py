"""HuggingFace tensor names and layouts <-> our params, loaded straight onto a mesh.

HF stores a Linear as weight [out, in]; our Dense-style params are [in, out] with attention heads
as their own axis ([d_model, heads, head_dim] for q/k/v, [heads, head_dim, d_model] for the
output, [heads, head_dim] for Qwen2's q/k/v biases). Each `Slot` says how an HF tensor is viewed
(reshape) and transposed into ours. Q and K need no permutation: HF's Llama already stores them
in the rotate-half layout our rotary embedding uses (the interleaved layout of Meta's original
checkpoints is converted by HF's own conversion script).

Loading builds every parameter with `jax.make_array_from_callback`: each device's shard is read
from the memory-mapped file on its own, so no host ever holds more than one tensor's slices, and
on several hosts each reads only its devices' shards.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import flax.linen as nn
import jax
import numpy as np
from flax import traverse_util
from jax.sharding import Mesh

from rlhf_jax.errors import ConfigError
from rlhf_jax.hf import tensor_files
from rlhf_jax.model.config import ModelConfig
from rlhf_jax.model.transformer import init_params
from rlhf_jax.training import sharding as shd

# Buffers some older checkpoints carry; derived from config.json (rope_theta), not weights.
IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)
FRESH = (("scalar_head",), ("scalar_bias",))  # ours only: initialised as a fresh model's (zeros)
Fetch = Callable[[str], np.ndarray]  # HF tensor name -> the tensor (a memory map, or an array)


class Slot(NamedTuple):
  hf: str  # tensor name; "{i}" stands for the layer index
  path: tuple[str, ...]  # our param path (inside a layer for per-layer slots)
  hf_shape: tuple[int, ...]
  view: tuple[int, ...]  # the HF tensor reshaped to this ...
  perm: tuple[int, ...]  # ... and transposed by this is our layout


def slots(cfg: ModelConfig) -> tuple[list[Slot], list[Slot]]:
  """(top-level slots, per-layer slots) of a model of this config."""
  d, nh, nkv, hd, f, v = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.mlp_dim, cfg.vocab_size
  proj = lambda name, heads: Slot(f"model.layers.{{i}}.self_attn.{name}.weight", ("attn", "w" + name[0]),
                                  (heads * hd, d), (heads, hd, d), (2, 0, 1))
  linear = lambda name, ours, shape: Slot(f"model.layers.{{i}}.mlp.{name}.weight", ("mlp", ours), shape, shape, (1, 0))
  norm = lambda name, ours: Slot(f"model.layers.{{i}}.{name}.weight", (ours, "scale"), (d,), (d,), (0,))
  bias = lambda name, heads: Slot(f"model.layers.{{i}}.self_attn.{name}.bias", ("attn", "b" + name[0]),
                                  (heads * hd,), (heads, hd), (0, 1))
  head_norm = lambda name: Slot(f"model.layers.{{i}}.self_attn.{name}.weight", ("attn", name, "scale"),
                                (hd,), (hd,), (0,))
  layer = []
  for name, heads in (("q_proj", nh), ("k_proj", nkv), ("v_proj", nkv)):
    layer += [proj(name, heads)] + ([bias(name, heads)] if cfg.qkv_bias else [])
  layer += [Slot("model.layers.{i}.self_attn.o_proj.weight", ("attn", "wo"), (d, nh * hd), (d, nh, hd), (1, 2, 0))]
  layer += [head_norm("q_norm"), head_norm("k_norm")] if cfg.qk_norm else []
  layer += [linear("gate_proj", "w_gate", (f, d)), linear("up_proj", "w_up", (f, d)),
            linear("down_proj", "w_down", (d, f)),
            norm("input_layernorm", "attn_norm"), norm("post_attention_layernorm", "mlp_norm")]
  top = [Slot("model.embed_tokens.weight", ("embedding",), (v, d), (v, d), (0, 1)),
         Slot("model.norm.weight", ("final_norm", "scale"), (d,), (d,), (0,))]
  if not cfg.tie_embeddings:
    top.append(Slot("lm_head.weight", ("lm_head",), (v, d), (v, d), (1, 0)))
  return top, layer


def to_ours(a: np.ndarray, slot: Slot) -> np.ndarray:
  return a.reshape(slot.view).transpose(slot.perm)  # a view: nothing read yet for a memmap


def to_hf(b: np.ndarray, slot: Slot) -> np.ndarray:
  return b.transpose(np.argsort(slot.perm)).reshape(slot.hf_shape)


def hf_names(cfg: ModelConfig) -> dict[str, tuple[Slot, Optional[int]]]:
  """{HF tensor name: (slot, layer index or None)} in the order HF's models list them."""
  top, layer = slots(cfg)
  names = {top[0].hf: (top[0], None)}
  for i in range(cfg.num_layers):
    names |= {s.hf.format(i=i): (s, i) for s in layer}
  return names | {s.hf: (s, None) for s in top[1:]}


def check_tensors(infos: dict[str, tensor_files.TensorInfo], cfg: ModelConfig, hf_dir: str) -> None:
  """Every tensor the config implies is there with its shape, and nothing else is."""
  expected = hf_names(cfg)
  for name, (slot, _) in expected.items():
    if name not in infos:
      raise ConfigError(f"{hf_dir}: missing tensor {name} (implied by config.json)")
    if infos[name].shape != slot.hf_shape:
      raise ConfigError(f"{infos[name].path}: tensor {name} has shape {list(infos[name].shape)} but "
                        f"config.json implies {list(slot.hf_shape)}")
  tied_head = cfg.tie_embeddings and "lm_head.weight" in infos  # HF ties it to the embedding too
  for name, info in infos.items():
    if name not in expected and not name.endswith(IGNORED_SUFFIXES) and not (tied_head and name == "lm_head.weight"):
      raise ConfigError(f"{info.path}: unexpected tensor {name} (not a weight of the model config.json "
                        f"describes: another architecture's weights, or biases of a model_type without them)")


def _reader(fetch: Fetch, slot: Slot, layers: Optional[range] = None) -> Callable[[tuple], np.ndarray]:
  def one(i: Optional[int], index: tuple) -> np.ndarray:
    name = slot.hf if i is None else slot.hf.format(i=i)
    return np.asarray(to_ours(fetch(name), slot)[index])

  if layers is None:
    return lambda index: one(None, index)
  # Stacked over layers (scan_layers): the first axis picks layers, the rest slices each.
  return lambda index: np.stack([one(i, index[1:]) for i in layers[index[0]]])


def load_params(hf_dir: str, cfg: ModelConfig, mesh: Mesh) -> Any:
  """The params of the HF checkpoint in hf_dir, laid out on mesh as our trainers shard them."""
  infos = tensor_files.index_directory(hf_dir)
  check_tensors(infos, cfg, hf_dir)
  return params_from(lambda name: tensor_files.tensor(infos[name]), cfg, mesh)


def params_from(fetch: Fetch, cfg: ModelConfig, mesh: Mesh) -> Any:
  """The params whose HF tensors fetch(name) gives (HF layout, every name of hf_names(cfg), already
  checked), laid out on mesh; fetch is called when a device's shard is built, and may be called
  again for each shard of the same tensor."""
  boxed = jax.eval_shape(lambda r: init_params(cfg, r), jax.random.PRNGKey(0))
  shardings = traverse_util.flatten_dict(shd.logical_to_shardings(boxed, mesh))
  top, layer = slots(cfg)
  readers = {s.path: _reader(fetch, s) for s in top}
  for s in layer:
    if cfg.scan_layers:
      readers[("layers",) + s.path] = _reader(fetch, s, range(cfg.num_layers))
    else:
      readers |= {(f"layer_{i}",) + s.path: _reader(fetch, s._replace(hf=s.hf.format(i=i)))
                  for i in range(cfg.num_layers)}
  out = {}
  for path, leaf in traverse_util.flatten_dict(nn.meta.unbox(boxed)).items():
    if path in FRESH:
      read = lambda index, leaf=leaf: np.zeros(leaf.shape, leaf.dtype)[index]
    else:
      read = lambda index, r=readers[path], leaf=leaf: r(index).astype(leaf.dtype)
    out[path] = jax.make_array_from_callback(leaf.shape, shardings[path], read)
  return traverse_util.unflatten_dict(out)


def _host(x: jax.Array) -> np.ndarray:
  if x.is_fully_addressable:
    return np.asarray(jax.device_get(x))
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def hf_tensor(params: Any, cfg: ModelConfig, name: str) -> np.ndarray:
  """One HF tensor of our params (gathered to the host), in the params' dtype."""
  slot, i = hf_names(cfg)[name]
  if i is None:
    leaf = params
    for key in slot.path:
      leaf = leaf[key]
  else:
    leaf = params["layers"] if cfg.scan_layers else params[f"layer_{i}"]
    for key in slot.path:
      leaf = leaf[key]
    if cfg.scan_layers:
      leaf = leaf[i]
  return to_hf(_host(leaf), slot)
