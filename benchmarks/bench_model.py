"""Train-step throughput, model FLOPs utilisation and decode speed for a preset on this device.

  python benchmarks/bench_model.py --preset=tiny
  python benchmarks/bench_model.py --preset=197m --dtype=bfloat16 --batch=16 --seq=1024

MFU = flops_per_token(cfg, seq) * tokens/s / peak, with the peak measured in the same run by a
large matmul in the compute dtype (so CPU and GPU figures are each against their own ceiling).
Times are medians over timed steps after compilation; every timed call ends in
`block_until_ready`, so asynchronous dispatch is not mistaken for speed.
"""
from __future__ import annotations

import argparse
import dataclasses
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from report import report  # benchmarks/report.py (scripts run from this folder's path)

from rlhf_jax.model.config import flops_per_token, get_preset, param_counts
from rlhf_jax.model.sampling import generate
from rlhf_jax.model.transformer import Transformer, init_params
from rlhf_jax.trainers import lm_steps
from rlhf_jax.training import sharding as shd
from rlhf_jax.training.optimizer import make_optimizer
from rlhf_jax.training.train_state import create_train_state


def _median_seconds(fn, repeats: int) -> float:
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return float(np.median(times))


def peak_matmul_flops(dtype: str, n: int) -> float:
  a = jnp.ones((n, n), dtype)
  b = jnp.ones((n, n), dtype)
  f = jax.jit(lambda x, y: x @ y)
  jax.block_until_ready(f(a, b))
  return 2 * n ** 3 / _median_seconds(lambda: f(a, b), 5)


def peak_bandwidth(megabytes: int) -> float:
  """Bytes/s of a streaming read + write of a large array (the decode roofline's memory ceiling)."""
  x = jnp.ones((megabytes * 2 ** 20 // 4,), jnp.float32)
  f = jax.jit(lambda v: v * 2.0)
  jax.block_until_ready(f(x))
  return 2 * x.nbytes / _median_seconds(lambda: f(x), 5)


def decode_bytes_per_step(cfg, batch: int, cache_len: float) -> float:
  """Bytes one decode step must read at least: every parameter (in its stored dtype) and the
  keys and values of cache_len slots for every sequence."""
  param_bytes = param_counts(cfg)["total"] * jnp.dtype(cfg.param_dtype).itemsize
  kv = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * jnp.dtype(cfg.dtype).itemsize
  return param_bytes + batch * cache_len * kv


def bench_train(cfg, batch: int, seq: int, steps: int) -> dict:
  mesh = shd.make_mesh((1, -1, 1))
  opt = ml_collections.ConfigDict(dict(learning_rate=1e-4, warmup_steps=0, final_lr_fraction=1.0,
                                       b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.0, grad_clip=1.0))
  tx = make_optimizer(opt, total_steps=steps + 1)
  state, shardings = create_train_state(lambda r: init_params(cfg, r), tx, mesh, jax.random.PRNGKey(0))
  step = lm_steps.jit_lm_train_step(Transformer(cfg), tx, mesh, shardings)
  rng = np.random.default_rng(0)
  data = shd.shard_batch({"tokens": rng.integers(0, cfg.vocab_size, (batch, seq)).astype(np.int32),
                          "loss_mask": np.ones((batch, seq), np.float32),
                          "attention_mask": np.ones((batch, seq), bool)}, mesh)
  t0 = time.perf_counter()
  state, m = step(state, data)
  jax.block_until_ready(m)
  compile_s = time.perf_counter() - t0
  holder = [state]

  def one():
    holder[0], metrics = step(holder[0], data)
    return metrics

  seconds = _median_seconds(one, steps)
  return {"compile_s": compile_s, "step_s": seconds, "tokens_per_s": batch * seq / seconds}


def bench_decode(cfg, batch: int, prompt_len: int, new_tokens: int, repeats: int) -> dict:
  params = jax.jit(lambda r: nn.meta.unbox(init_params(cfg, r)))(jax.random.PRNGKey(0))
  prompts = jnp.ones((batch, prompt_len), jnp.int32)
  mask = jnp.ones((batch, prompt_len), bool)
  run = lambda: generate(params, prompts, mask, jax.random.PRNGKey(1), model=Transformer(cfg),
                         max_new_tokens=new_tokens, temperature=1.0)
  jax.block_until_ready(run())
  seconds = _median_seconds(run, repeats)
  return {"decode_s": seconds, "decode_tokens_per_s": batch * new_tokens / seconds}


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--preset", default="tiny")
  p.add_argument("--dtype", default=None, help="compute dtype (default: preset's)")
  p.add_argument("--batch", type=int, default=16)
  p.add_argument("--seq", type=int, default=256)
  p.add_argument("--steps", type=int, default=5)
  p.add_argument("--decode_batch", type=int, default=16)
  p.add_argument("--prompt_len", type=int, default=32)
  p.add_argument("--new_tokens", type=int, default=64)
  p.add_argument("--matmul_n", type=int, default=2048)
  p.add_argument("--bandwidth_mb", type=int, default=256, help="array size of the bandwidth measurement")
  p.add_argument("--skip_train", action="store_true", help="decode only (e.g. a sweep over decode batches)")
  p.add_argument("--json", default=None, help="append the result as one JSON line to this file")
  args = p.parse_args()

  cfg = get_preset(args.preset)
  if args.dtype:
    cfg = dataclasses.replace(cfg, dtype=args.dtype)
  result = {"device": jax.devices()[0].device_kind, "num_devices": jax.device_count(), "jax": jax.__version__,
            "preset": args.preset, "dtype": cfg.dtype, "params_total": param_counts(cfg)["total"]}
  if not args.skip_train:
    peak = peak_matmul_flops(cfg.dtype, args.matmul_n)
    train = bench_train(cfg, args.batch, args.seq, args.steps)
    model_flops = flops_per_token(cfg, args.seq) * train["tokens_per_s"]
    result |= {"batch": args.batch, "seq": args.seq, **train, "model_tflops_per_s": model_flops / 1e12,
               "peak_tflops_per_s": peak / 1e12, "mfu": model_flops / peak}
  decode = bench_decode(cfg, args.decode_batch, args.prompt_len, args.new_tokens, 3)
  bandwidth = peak_bandwidth(args.bandwidth_mb)
  # The roofline at the mean cache length over the generated tokens.
  step_bytes = decode_bytes_per_step(cfg, args.decode_batch, args.prompt_len + args.new_tokens / 2)
  roofline = args.decode_batch * bandwidth / step_bytes
  result |= {"decode_batch": args.decode_batch, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
             **decode, "bandwidth_gb_per_s": bandwidth / 1e9, "decode_roofline_tokens_per_s": roofline,
             "decode_roofline_fraction": decode["decode_tokens_per_s"] / roofline}
  report(result, args.json)


if __name__ == "__main__":
  main()
