"""AOT scale plan: compile the PM train step, rollout generation and the PPO update of a preset on a simulated
mesh of CPU devices, with abstract inputs (nothing allocated), and report per-device memory and
the collectives XLA inserted.

  python benchmarks/scale_plan.py --devices=64 --mesh=1,16,4 --presets=2.7b,13b,52b --steps=pm,rollout
  python benchmarks/scale_plan.py --plan   # the standard table: each mesh in its own process

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


def _compile_pm(cfg, mesh, batch: int, seq: int, grad_accum: int = 1):
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
  abstract, shardings = state_shardings(lambda r: init_params(cfg, r), tx, mesh)
  bs = shd.batch_sharding(mesh)
  inputs = {"tokens": jax.ShapeDtypeStruct((batch, 2, seq), jnp.int32, sharding=bs),
            "attention_mask": jax.ShapeDtypeStruct((batch, 2, seq), bool, sharding=bs),
            "eoc_index": jax.ShapeDtypeStruct((batch, 2), jnp.int32, sharding=bs)}
  step = jax.jit(lambda s, b: pm_train_step(s, b, model=Transformer(cfg), tx=tx, grad_accum=grad_accum),
                 in_shardings=(shardings, bs), out_shardings=(shardings, shd.replicated(mesh)), donate_argnums=(0,))
  with jax.set_mesh(mesh), nn.logical_axis_rules(shd.LOGICAL_RULES):
    return step.lower(abstract, inputs).compile()


def _compile_rollout(cfg, mesh, batch: int, seq: int, grad_accum: int = 1):
  del grad_accum  # sampling has no gradient
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


def _compile_ppo_update(cfg, mesh, batch: int, seq: int, grad_accum: int = 1):
  """One PPO update (2 epochs x 4 minibatches) of a policy and a separate value model of the
  preset's shape on a rollout of `batch` prompts of seq / 2 tokens plus seq / 2 response tokens."""
  del grad_accum  # PPO's memory knob is ppo.num_minibatches
  import flax.linen as nn
  import jax
  import jax.numpy as jnp

  from configs import ppo as ppo_config
  from rlhf_jax.model.sampling import Generation
  from rlhf_jax.model.transformer import Transformer, init_params
  from rlhf_jax.trainers.ppo_steps import Models, PPOHyper, ppo_update, score_rollout
  from rlhf_jax.training import sharding as shd
  from rlhf_jax.training.optimizer import make_optimizer
  from rlhf_jax.training.train_state import state_shardings
  tx = make_optimizer(ppo_config.get_config("13m").optimizer, 1000)
  init = lambda r: {"policy": init_params(cfg, r), "value": init_params(cfg, r)}
  abstract, shardings = state_shardings(init, tx, mesh, {"kl_coef": jnp.float32(0.0)})
  models = Models(Transformer(cfg), Transformer(cfg), Transformer(cfg))
  hyper = PPOHyper(1.0, 0.95, 0.2, 0.2, 0.5, 0.0, 2, 4, True)
  bs = shd.batch_sharding(mesh)
  half = seq // 2
  spec = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=bs)
  gen = Generation(spec((batch, half), jnp.int32), spec((batch, half), bool), spec((batch, half), jnp.int32),
                   spec((batch, half), jnp.float32), spec((batch, half), bool), spec((batch,), jnp.int32))
  score = lambda params, g: score_rollout(params, params["policy"], params["policy"], g, 0.0, 0.0, 1.0,
                                         models=models, hyper=hyper, eoc_id=3)[0]
  with jax.set_mesh(mesh), nn.logical_axis_rules(shd.LOGICAL_RULES):
    rollout = jax.eval_shape(score, abstract.params, gen)
  rollout = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=bs if x.ndim else shd.replicated(mesh)),
                         rollout)
  key = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=shd.replicated(mesh))
  step = jax.jit(lambda s, r, k: ppo_update(s, r, k, models=models, hyper=hyper, tx=tx),
                 in_shardings=(shardings, jax.tree.map(lambda x: x.sharding, rollout), shd.replicated(mesh)),
                 donate_argnums=(0,))
  with jax.set_mesh(mesh), nn.logical_axis_rules(shd.LOGICAL_RULES):
    return step.lower(abstract, rollout, key).compile()


def plan_one(preset: str, step: str, mesh_shape, batch: int, seq: int, remat: str = "", grad_accum: int = 1) -> dict:
  import dataclasses

  from rlhf_jax.model.config import get_preset, param_counts
  from rlhf_jax.training import sharding as shd
  cfg = dataclasses.replace(get_preset(preset), dtype="bfloat16", scan_layers=True, max_seq_len=max(seq, 2048))
  cfg = dataclasses.replace(cfg, remat=remat or cfg.remat)
  mesh = shd.make_mesh(mesh_shape)
  t0 = time.perf_counter()
  compile_fn = {"pm": _compile_pm, "rollout": _compile_rollout, "ppo_update": _compile_ppo_update}[step]
  compiled = compile_fn(cfg, mesh, batch, seq, grad_accum)
  seconds = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  peak = mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes - mem.alias_size_in_bytes
  return {"preset": preset, "step": step, "devices": int(mesh.devices.size), "mesh": list(mesh_shape),
          "batch": batch, "seq": seq, "params": param_counts(cfg)["total"], "remat": cfg.remat,
          "grad_accum": grad_accum if step == "pm" else 1,
          "argument_bytes": int(mem.argument_size_in_bytes), "output_bytes": int(mem.output_size_in_bytes),
          "temp_bytes": int(mem.temp_size_in_bytes), "alias_bytes": int(mem.alias_size_in_bytes),
          "peak_bytes": int(peak), "compile_seconds": round(seconds, 2),
          "collectives": collective_stats(compiled.as_text()),
          "fits": [name for name, gib in DEVICE_GIB.items() if peak <= gib * 2 ** 30]}


def table(rows: list[dict]) -> str:
  gib = lambda b: f"{b / 2 ** 30:.2f}"
  lines = ["| preset | step | devices (data, fsdp, tensor) | remat, micro-batches | params+opt / device GiB | "
           "temporaries GiB | peak GiB | all-gather n / GiB | reduce-scatter n / GiB | all-reduce n / GiB | compile s | fits |",
           "|---" * 12 + "|"]
  for r in rows:
    c = r["collectives"]
    coll = lambda op: f"{c[op]['count']} / {gib(c[op]['bytes'])}"
    lines.append(f"| {r['preset']} | {r['step']} | {r['devices']} {tuple(r['mesh'])} | {r['remat']}, {r['grad_accum']} | "
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
  p.add_argument("--plan", action="store_true", help="run the standard plan, one process per mesh")
  p.add_argument("--out", default="", help="with --plan: write the Markdown table here")
  args = p.parse_args(argv)
  if args.plan:
    rows = []
    for devices, mesh, presets, remat, accum in PLAN:
      cmd = [sys.executable, __file__, f"--devices={devices}", f"--mesh={','.join(map(str, mesh))}",
             f"--presets={','.join(presets)}", f"--steps={args.steps}", f"--batch={args.batch}", f"--seq={args.seq}",
             f"--remat={remat}", f"--grad_accum={accum}"]
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
      print(json.dumps(plan_one(preset, step, mesh, args.batch, args.seq, args.remat, args.grad_accum)), flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
