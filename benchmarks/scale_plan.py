"""AOT scale plan: compile the PM train step, rollout generation and the PPO update of a preset on a simulated
mesh of CPU devices, with abstract inputs (nothing allocated), and report per-device memory and
the collectives XLA inserted.

  python benchmarks/scale_plan.py --devices=64 --mesh=1,16,4 --presets=2.7b,13b,52b --steps=pm,rollout
  python benchmarks/scale_plan.py --plan   # the standard table: each mesh in its own process
  python benchmarks/scale_plan.py --plan --pretrained   # experiments/pretrained_sweep.py's Qwen2.5 rows

Per (preset, step, mesh) it prints one JSON line: argument / output / temporary bytes per device
(`compiled.memory_analysis()`), their sum less aliased (donated) bytes as the peak estimate, the
count and bytes of all-gather, reduce-scatter, all-reduce, all-to-all and collective-permute ops in
the compiled HLO, compile seconds, and which accelerators' memory the peak fits. How far to trust
it: argument bytes are exact (shapes and shardings); temporaries come from the CPU backend's
buffer assignment, which fuses and schedules differently from TPU/GPU backends, so read them as
an estimate within a factor of about 2, and leave headroom.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time

DEVICE_GIB = {"TPU v5e": 16, "TPU v4": 32, "H100": 80, "TPU v5p": 95, "H200": 141}
COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "f32": 4, "s32": 4, "u32": 4,
               "f64": 8, "s64": 8, "u64": 8}
# The standard plan: (devices, mesh (data, fsdp, tensor), presets, remat ("" = the preset's), PM
# micro-batches). Each size first as its preset stands, then with the choices that make it fit
# (put into the presets and experiments/paper_sweep.py).
PLAN = (
    (8, (1, 8, 1), ("13m", "42m", "197m", "810m"), "", 1),
    (8, (1, 8, 1), ("810m",), "full", 4),
    (32, (1, 32, 1), ("810m", "2.7b"), "", 1),
    (32, (1, 32, 1), ("810m", "2.7b"), "full", 2),
    (64, (1, 16, 4), ("2.7b", "13b", "52b"), "", 1),
    (64, (1, 16, 4), ("13b",), "full", 4),
    (64, (1, 16, 4), ("52b",), "", 4),
    (256, (4, 16, 4), ("13b", "52b"), "", 1),
)

# A pretrained family's real shapes (their config.json fields that decide memory), for the rows of
# experiments/pretrained_sweep.py: Qwen2.5 base models, the four sizes and the 14B gold PM.
_QWEN25 = {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "hidden_act": "silu",
           "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "max_position_embeddings": 32768,
           "use_sliding_window": False, "sliding_window": None}
PRETRAINED = {
    "qwen2.5-0.5b": dict(_QWEN25, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "qwen2.5-1.5b": dict(_QWEN25, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                         num_attention_heads=12, num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "qwen2.5-3b": dict(_QWEN25, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                       num_attention_heads=16, num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "qwen2.5-7b": dict(_QWEN25, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                       num_attention_heads=28, num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False),
    "qwen2.5-14b": dict(_QWEN25, hidden_size=5120, intermediate_size=13824, num_hidden_layers=48,
                        num_attention_heads=40, num_key_value_heads=8, vocab_size=152064, tie_word_embeddings=False,
                        rms_norm_eps=1e-5),
}
# experiments/pretrained_sweep.py's rows: (devices, mesh, models, remat, PM micro-batches, LoRA rank
# (0 = full fine-tuning)). Fully sharded data parallel only: the small members' 2 KV heads and 14
# query heads do not divide a tensor axis of 4.
PRETRAINED_PLAN = (
    (8, (1, 8, 1), ("qwen2.5-0.5b", "qwen2.5-1.5b"), "full", 4, 0),
    (8, (1, 8, 1), ("qwen2.5-0.5b", "qwen2.5-1.5b"), "full", 4, 64),
    (32, (1, 32, 1), ("qwen2.5-3b", "qwen2.5-7b", "qwen2.5-14b"), "full", 2, 0),
    (32, (1, 32, 1), ("qwen2.5-3b", "qwen2.5-7b", "qwen2.5-14b"), "full", 2, 64),
    (64, (1, 16, 4), ("qwen2.5-7b", "qwen2.5-14b"), "full", 2, 0),
    (64, (1, 16, 4), ("qwen2.5-7b", "qwen2.5-14b"), "full", 2, 64),
)


def model_of(name: str):
  """A preset's ModelConfig, or a pretrained shape's (through the HF config reader, as an import)."""
  import tempfile

  from rlhf_jax.hf import config as hf_config
  from rlhf_jax.model.config import get_preset
  if name not in PRETRAINED:
    return get_preset(name)
  with tempfile.TemporaryDirectory() as d:
    with open(os.path.join(d, "config.json"), "w", encoding="utf-8") as f:
      json.dump(PRETRAINED[name], f)
    return hf_config.model_config(d)


def _lora_base(cfg, mesh, rank: int):
  """(spec, abstract frozen base in bfloat16 with its shardings, the shardings, trainable init) of
  rank-`rank` adapters on every projection (lora.base_dtype = bfloat16)."""
  import jax
  import jax.numpy as jnp
  from flax import linen as nn

  from rlhf_jax.model import lora
  from rlhf_jax.model.transformer import init_params
  from rlhf_jax.training import sharding as shd
  from rlhf_jax.training.saved_runs import adapter_init
  spec = lora.LoraSpec(rank, 2.0 * rank)
  boxed = jax.eval_shape(lambda r: init_params(cfg, r, lora=spec), jax.random.PRNGKey(0))
  base_shardings = lora.split(shd.logical_to_shardings(boxed, mesh))[0]
  base = lora.split(nn.meta.unbox(boxed))[0]
  base = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, jnp.bfloat16, sharding=s), base, base_shardings)
  return spec, base, base_shardings, adapter_init(cfg, spec)


def collective_stats(hlo_text: str) -> dict[str, dict[str, int]]:
  """{op: {"count", "bytes"}} over the compiled HLO (async pairs counted once, by their -start)."""
  out = {op: {"count": 0, "bytes": 0} for op in COLLECTIVES}
  pattern = re.compile(r"=\s*(.+?)\s+(" + "|".join(COLLECTIVES) + r")(-start)?\(")
  for line in hlo_text.splitlines():
    m = pattern.search(line)
    if not m:
      continue
    shapes = re.findall(r"(\w+)\[([\d,]*)\]", m.group(1))
    nbytes = 0
    for dtype, dims in shapes:
      n = 1
      for d in filter(None, dims.split(",")):
        n *= int(d)
      nbytes += n * DTYPE_BYTES.get(dtype, 4)
    if m.group(3):  # an async start's result tuple holds the operand and the result: count the result
      nbytes = nbytes // 2 if len(shapes) > 1 else nbytes
    out[m.group(2)]["count"] += 1
    out[m.group(2)]["bytes"] += nbytes
  return out


def _compile_pm(cfg, mesh, batch: int, seq: int, grad_accum: int = 1, lora_rank: int = 0):
  import flax.linen as nn
  import jax
  import jax.numpy as jnp

  from configs import pm as pm_config
  from rlhf_jax.model.transformer import Transformer, init_params
  from rlhf_jax.trainers.pm_steps import pm_train_step
  from rlhf_jax.training import sharding as shd
  from rlhf_jax.training.optimizer import make_optimizer
  from rlhf_jax.training.train_state import state_shardings
  tx = make_optimizer(pm_config.get_config("13m").optimizer, 1000)  # AdamW: two moments per parameter
  spec, base, base_shardings, init_fn = None, None, None, lambda r: init_params(cfg, r)
  if lora_rank:  # the state holds adapters and heads; the bf16 base is an argument, not donated
    spec, base, base_shardings, init_fn = _lora_base(cfg, mesh, lora_rank)
  abstract, shardings = state_shardings(init_fn, tx, mesh)
  bs = shd.batch_sharding(mesh)
  inputs = {"tokens": jax.ShapeDtypeStruct((batch, 2, seq), jnp.int32, sharding=bs),
            "attention_mask": jax.ShapeDtypeStruct((batch, 2, seq), bool, sharding=bs),
            "eoc_index": jax.ShapeDtypeStruct((batch, 2), jnp.int32, sharding=bs)}
  step = jax.jit(lambda s, b, f: pm_train_step(s, b, f, model=Transformer(cfg, spec), tx=tx, grad_accum=grad_accum),
                 in_shardings=(shardings, bs, base_shardings), out_shardings=(shardings, shd.replicated(mesh)),
                 donate_argnums=(0,))
  with jax.set_mesh(mesh), nn.logical_axis_rules(shd.LOGICAL_RULES):
    return step.lower(abstract, inputs, base).compile()


def _compile_rollout(cfg, mesh, batch: int, seq: int, grad_accum: int = 1, lora_rank: int = 0):
  del grad_accum, lora_rank  # sampling has no gradient; a LoRA policy samples as its merged weights
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  import optax

  from rlhf_jax.model.sampling import generate
  from rlhf_jax.model.transformer import Transformer, init_params
  from rlhf_jax.training import sharding as shd
  from rlhf_jax.training.train_state import state_shardings
  abstract, _ = state_shardings(lambda r: init_params(cfg, r), optax.identity(), mesh)
  bs = shd.batch_sharding(mesh)
  prompt = seq // 2
  tokens = jax.ShapeDtypeStruct((batch, prompt), jnp.int32, sharding=bs)
  mask = jax.ShapeDtypeStruct((batch, prompt), bool, sharding=bs)
  key = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=shd.replicated(mesh))
  with jax.set_mesh(mesh), nn.logical_axis_rules(shd.LOGICAL_RULES):
    return generate.lower(abstract.params, tokens, mask, key, model=Transformer(cfg),
                          max_new_tokens=seq - prompt, eos_id=2).compile()


def _compile_ppo_update(cfg, mesh, batch: int, seq: int, grad_accum: int = 1, lora_rank: int = 0):
  """One PPO update (2 epochs x 4 minibatches) of a policy and a separate value model of the
  preset's shape on a rollout of `batch` prompts of seq / 2 tokens plus seq / 2 response tokens.
  With lora_rank, both are adapters over one shared bf16 base."""
  del grad_accum  # PPO's memory knob is ppo.num_minibatches
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  import optax

  from configs import ppo as ppo_config
  from rlhf_jax.model.sampling import Generation
  from rlhf_jax.model.transformer import Transformer, init_params
  from rlhf_jax.trainers.ppo_steps import Models, PPOHyper, ppo_update, score_rollout
  from rlhf_jax.training import sharding as shd
  from rlhf_jax.training.optimizer import make_optimizer
  from rlhf_jax.training.train_state import state_shardings
  tx = make_optimizer(ppo_config.get_config("13m").optimizer, 1000)
  spec, base, base_shardings, one = None, None, None, lambda r: init_params(cfg, r)
  if lora_rank:
    spec, base, base_shardings, one = _lora_base(cfg, mesh, lora_rank)
  init = lambda r: {"policy": one(r), "value": one(r)}
  abstract, shardings = state_shardings(init, tx, mesh, {"kl_coef": jnp.float32(0.0)})
  models = Models(Transformer(cfg, spec), Transformer(cfg, spec), Transformer(cfg))
  hyper = PPOHyper(1.0, 0.95, 0.2, 0.2, 0.5, 0.0, 2, 4, True)
  bs = shd.batch_sharding(mesh)
  half = seq // 2
  spec = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=bs)
  gen = Generation(spec((batch, half), jnp.int32), spec((batch, half), bool), spec((batch, half), jnp.int32),
                   spec((batch, half), jnp.float32), spec((batch, half), bool), spec((batch,), jnp.int32))
  dense, _ = state_shardings(lambda r: {"policy": init_params(cfg, r)}, optax.identity(), mesh)
  dense_models = Models(Transformer(cfg), Transformer(cfg), Transformer(cfg))
  score = lambda params, g: score_rollout(params, params["policy"], params["policy"], g, 0.0, 0.0, 1.0,
                                         models=dense_models, hyper=hyper, eoc_id=3)[0]
  with jax.set_mesh(mesh), nn.logical_axis_rules(shd.LOGICAL_RULES):
    rollout = jax.eval_shape(score, dense.params, gen)  # its shapes do not depend on LoRA
  rollout = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=bs if x.ndim else shd.replicated(mesh)),
                         rollout)
  key = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=shd.replicated(mesh))
  # One base for policy and value (as train_ppo shares it), passed once.
  frozen = (lambda b: None) if not lora_rank else (lambda b: {"policy": b, "value": b})
  step = jax.jit(lambda s, r, k, b: ppo_update(s, r, k, frozen(b), models=models, hyper=hyper, tx=tx),
                 in_shardings=(shardings, jax.tree.map(lambda x: x.sharding, rollout), shd.replicated(mesh),
                               base_shardings),
                 donate_argnums=(0,))
  with jax.set_mesh(mesh), nn.logical_axis_rules(shd.LOGICAL_RULES):
    return step.lower(abstract, rollout, key, base).compile()


def plan_one(preset: str, step: str, mesh_shape, batch: int, seq: int, remat: str = "", grad_accum: int = 1,
             lora_rank: int = 0) -> dict:
  import dataclasses

  from rlhf_jax.model.config import param_counts
  from rlhf_jax.training import sharding as shd
  cfg = dataclasses.replace(model_of(preset), dtype="bfloat16", scan_layers=True, max_seq_len=max(seq, 2048))
  cfg = dataclasses.replace(cfg, remat=remat or cfg.remat)
  mesh = shd.make_mesh(mesh_shape)
  t0 = time.perf_counter()
  compile_fn = {"pm": _compile_pm, "rollout": _compile_rollout, "ppo_update": _compile_ppo_update}[step]
  compiled = compile_fn(cfg, mesh, batch, seq, grad_accum, lora_rank)
  seconds = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  peak = mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes - mem.alias_size_in_bytes
  return {"preset": preset, "step": step, "devices": int(mesh.devices.size), "mesh": list(mesh_shape),
          "batch": batch, "seq": seq, "params": param_counts(cfg)["total"], "remat": cfg.remat,
          "grad_accum": grad_accum if step == "pm" else 1, "lora_rank": lora_rank if step != "rollout" else 0,
          "argument_bytes": int(mem.argument_size_in_bytes), "output_bytes": int(mem.output_size_in_bytes),
          "temp_bytes": int(mem.temp_size_in_bytes), "alias_bytes": int(mem.alias_size_in_bytes),
          "peak_bytes": int(peak), "compile_seconds": round(seconds, 2),
          "collectives": collective_stats(compiled.as_text()),
          "fits": [name for name, gib in DEVICE_GIB.items() if peak <= gib * 2 ** 30]}


def table(rows: list[dict]) -> str:
  gib = lambda b: f"{b / 2 ** 30:.2f}"
  lines = ["| preset | step | devices (data, fsdp, tensor) | remat, micro-batches, tuning | params+opt / device GiB | "
           "temporaries GiB | peak GiB | all-gather n / GiB | reduce-scatter n / GiB | all-reduce n / GiB | compile s | fits |",
           "|---" * 12 + "|"]
  for r in rows:
    c = r["collectives"]
    coll = lambda op: f"{c[op]['count']} / {gib(c[op]['bytes'])}"
    tuning = f"LoRA r{r['lora_rank']}" if r.get("lora_rank") else "full"
    lines.append(f"| {r['preset']} | {r['step']} | {r['devices']} {tuple(r['mesh'])} | {r['remat']}, {r['grad_accum']}, {tuning} | "
                 f"{gib(r['argument_bytes'])} | {gib(r['temp_bytes'])} | {gib(r['peak_bytes'])} | {coll('all-gather')} | "
                 f"{coll('reduce-scatter')} | {coll('all-reduce')} | {r['compile_seconds']} | "
                 f"{', '.join(r['fits']) or 'none'} |")
  return "\n".join(lines) + "\n"


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--devices", type=int, default=8)
  p.add_argument("--mesh", default="1,-1,1", help="data,fsdp,tensor")
  p.add_argument("--presets", default="810m")
  p.add_argument("--steps", default="pm,rollout,ppo_update")
  p.add_argument("--batch", type=int, default=64)
  p.add_argument("--seq", type=int, default=1024)
  p.add_argument("--remat", default="", help="none|dots|full; default: the preset's")
  p.add_argument("--grad_accum", type=int, default=1, help="micro-batches per PM update")
  p.add_argument("--lora_rank", type=int, default=0, help="PM and PPO steps train rank-r adapters over a bf16 base")
  p.add_argument("--plan", action="store_true", help="run the standard plan, one process per mesh")
  p.add_argument("--pretrained", action="store_true",
                 help="with --plan: experiments/pretrained_sweep.py's rows (Qwen2.5 shapes) instead")
  p.add_argument("--out", default="", help="with --plan: write the Markdown table here")
  args = p.parse_args(argv)
  if args.plan:
    rows = []
    plan = PRETRAINED_PLAN if args.pretrained else tuple(row + (0,) for row in PLAN)
    for devices, mesh, presets, remat, accum, rank in plan:
      cmd = [sys.executable, __file__, f"--devices={devices}", f"--mesh={','.join(map(str, mesh))}",
             f"--presets={','.join(presets)}", f"--steps={args.steps}", f"--batch={args.batch}", f"--seq={args.seq}",
             f"--remat={remat}", f"--grad_accum={accum}", f"--lora_rank={rank}"]
      proc = subprocess.run(cmd, capture_output=True, text=True)
      if proc.returncode:
        print(proc.stderr[-3000:], file=sys.stderr)
        return proc.returncode
      rows += [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    text = table(rows)
    print(text)
    if args.out:
      with open(args.out, "w", encoding="utf-8") as f:
        f.write(text)
    return 0
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={args.devices}"
  sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))
  import jax
  jax.config.update("jax_platforms", "cpu")
  mesh = tuple(int(x) for x in args.mesh.split(","))
  for preset in args.presets.split(","):
    for step in args.steps.split(","):
      print(json.dumps(plan_one(preset, step, mesh, args.batch, args.seq, args.remat, args.grad_accum,
                                args.lora_rank)), flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
