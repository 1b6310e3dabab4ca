"""Model shapes: one `ModelConfig`, size presets shaped like the paper's family, and cost formulas.

Nominal sizes follow Kaplan et al. / Askell et al. 2021 and count *non-embedding* parameters
(the token embedding and an untied LM head are excluded), which is what the paper's model
sizes (13M ... 52B) refer to. `param_counts` reports both.
"""
from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  vocab_size: int = 32000
  d_model: int = 512
  num_layers: int = 4
  num_heads: int = 8
  num_kv_heads: int = 4  # grouped-query attention: num_heads % num_kv_heads == 0
  head_dim: int = 64
  mlp_dim: int = 1536  # hidden width of the SwiGLU MLP
  max_seq_len: int = 2048
  rope_theta: float = 10000.0
  norm_eps: float = 1e-6
  tie_embeddings: bool = False
  # Variants of the same architecture, for imported checkpoints (rlhf_jax.hf); defaults are Llama's.
  mlp_activation: str = "silu"  # gate of the gated MLP: "silu" (SwiGLU) | "gelu_tanh" (GeGLU, Gemma)
  scale_embeddings: bool = False  # embeddings times sqrt(d_model) (Gemma)
  norm_offset: float = 0.0  # RMSNorm multiplies by norm_offset + scale (Gemma stores scale - 1: 1.0)
  qkv_bias: bool = False  # biases on the q, k and v projections (Qwen2)
  qk_norm: bool = False  # RMSNorm over head_dim of each query and key head, before rotary (Qwen3)
  # Rotary frequency scaling for long contexts (HF rope_scaling): "none", "linear" (every frequency
  # / factor), "llama3" (Llama 3.1: long wavelengths / factor, short ones kept, a smooth ramp between
  # wavelengths original_max_len / high_freq_factor and original_max_len / low_freq_factor).
  rope_scaling: str = "none"
  rope_factor: float = 1.0
  rope_low_freq_factor: float = 1.0
  rope_high_freq_factor: float = 4.0
  rope_original_max_len: int = 8192
  dtype: str = "float32"  # compute dtype: "bfloat16" for speed on accelerators
  param_dtype: str = "float32"
  scan_layers: bool = False  # nn.scan over layers: constant compile time in depth
  remat: str = "none"  # "none" | "full" | "dots": activation checkpointing per layer
  attention_impl: str = "xla"  # jax.nn.dot_product_attention implementation: "xla" | "cudnn"

  def __post_init__(self):
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}")
    if self.head_dim % 2:
      raise ValueError(f"head_dim={self.head_dim} must be even for rotary embeddings")
    if self.remat not in ("none", "full", "dots"):
      raise ValueError(f"remat={self.remat!r}: expected 'none', 'full' or 'dots'")
    if self.mlp_activation not in ("silu", "gelu_tanh"):
      raise ValueError(f"mlp_activation={self.mlp_activation!r}: expected 'silu' or 'gelu_tanh'")
    if self.attention_impl not in ("xla", "cudnn"):
      raise ValueError(f"attention_impl={self.attention_impl!r}: expected 'xla' or 'cudnn'")
    if self.rope_scaling not in ("none", "linear", "llama3"):
      raise ValueError(f"rope_scaling={self.rope_scaling!r}: expected 'none', 'linear' or 'llama3'")
    if self.rope_scaling != "none" and not self.rope_factor > 0:
      raise ValueError(f"rope_factor={self.rope_factor} must be positive")
    if self.rope_scaling == "llama3" and not 0 < self.rope_low_freq_factor < self.rope_high_freq_factor:
      raise ValueError(f"rope_low_freq_factor={self.rope_low_freq_factor} and rope_high_freq_factor="
                       f"{self.rope_high_freq_factor}: expected 0 < low < high")
    if self.rope_scaling == "llama3" and self.rope_original_max_len <= 0:
      raise ValueError(f"rope_original_max_len={self.rope_original_max_len} must be positive")

  @classmethod
  def from_dict(cls, d: Any) -> "ModelConfig":
    """Builds from a dict or ConfigDict; unknown keys are an error, not ignored."""
    d = dict(d)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
      raise ValueError(f"unknown ModelConfig fields {unknown}; known: {sorted(known)}")
    return cls(**d)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


# Nominal non-embedding parameter counts, and shapes within a few percent of them.
NOMINAL_PARAMS = {
    "13m": 13e6, "42m": 42e6, "197m": 197e6, "810m": 810e6,
    "2.7b": 2.7e9, "13b": 13e9, "52b": 52e9,
}

PRESETS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(vocab_size=1024, d_model=64, num_layers=2, num_heads=4, num_kv_heads=2,
                        head_dim=16, mlp_dim=192, max_seq_len=512, tie_embeddings=True),
    "13m": ModelConfig(d_model=512, num_layers=4, num_heads=8, num_kv_heads=4, head_dim=64, mlp_dim=1536),
    "42m": ModelConfig(d_model=768, num_layers=7, num_heads=12, num_kv_heads=4, head_dim=64, mlp_dim=2048),
    "197m": ModelConfig(d_model=1280, num_layers=11, num_heads=20, num_kv_heads=4, head_dim=64,
                        mlp_dim=3584),
    "810m": ModelConfig(d_model=2048, num_layers=18, num_heads=16, num_kv_heads=4, head_dim=128,
                        mlp_dim=5632),
    "2.7b": ModelConfig(d_model=2560, num_layers=32, num_heads=20, num_kv_heads=4, head_dim=128,
                        mlp_dim=8704, scan_layers=True),
    "13b": ModelConfig(d_model=5120, num_layers=48, num_heads=40, num_kv_heads=8, head_dim=128,
                       mlp_dim=13824, scan_layers=True, remat="dots"),
    # remat "full": the PM step of 64 x 2 x 1024 tokens then fits an H100 or a TPU v4 on 64 chips
    # (about 22 GiB a chip with 4 micro-batches; benchmarks/scale_plan.py, RESULTS.md).
    "52b": ModelConfig(d_model=8192, num_layers=64, num_heads=64, num_kv_heads=8, head_dim=128,
                       mlp_dim=26624, scan_layers=True, remat="full"),
}


def get_preset(name: str) -> ModelConfig:
  try:
    return PRESETS[name]
  except KeyError:
    raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}") from None


def param_counts(cfg: ModelConfig) -> dict[str, int]:
  """Analytic parameter counts: {'total', 'non_embedding', 'embedding'}."""
  d, h = cfg.d_model, cfg.head_dim
  attn = d * cfg.num_heads * h * 2 + d * cfg.num_kv_heads * h * 2  # q, o + k, v
  mlp = 3 * d * cfg.mlp_dim  # gate, up, down
  attn += (cfg.num_heads + 2 * cfg.num_kv_heads) * h if cfg.qkv_bias else 0
  attn += 2 * h if cfg.qk_norm else 0  # one gain over head_dim for q, one for k
  per_layer = attn + mlp + 2 * d  # two RMSNorm scales
  non_embedding = cfg.num_layers * per_layer + d + d + 1  # final norm + scalar head (w, b)
  embedding = cfg.vocab_size * d * (1 if cfg.tie_embeddings else 2)
  return {"total": non_embedding + embedding, "non_embedding": non_embedding, "embedding": embedding}


def flops_per_token(cfg: ModelConfig, seq_len: int, training: bool = True) -> float:
  """Model FLOPs per token (PaLM, Chowdhery et al. 2022, appendix B).

  Matmul parameters count 2 FLOPs per token forward, 6 with the backward pass; attention
  scores and the weighted sum add 2 * 2 * L * heads * head_dim * T forward (counted for the full
  T x T square, as PaLM does, so MFU figures are comparable with theirs). The LM head is a
  matmul; the embedding lookup is not.
  """
  counts = param_counts(cfg)
  matmul_params = counts["non_embedding"] + cfg.vocab_size * cfg.d_model
  attention = 4 * cfg.num_layers * cfg.num_heads * cfg.head_dim * seq_len
  forward = 2 * matmul_params + attention
  return 3 * forward if training else forward
