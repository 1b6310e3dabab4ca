"""Imports a HuggingFace model directory as an rlhf_jax run directory.

  python -m rlhf_jax hf_import --hf_dir=DIR --out=RUN [--scan_layers] [--remat=dots]
      [--dtype=bfloat16] [--mesh=1,-1,1]
  python -m rlhf_jax hf_import --gguf=FILE --out=RUN [...]     (a llama.cpp GGUF file instead)

RUN can then be named wherever a run starts from another (init_from, policy_from). Trainers do
this themselves for `hf:DIR`; the command is for importing once, ahead of time, with the runtime
settings (dtype, scan_layers, remat, ...) the later runs will use.
"""
from __future__ import annotations

from absl import flags, logging

from rlhf_jax.errors import ConfigError
from rlhf_jax.hf import runs


def main_factory():
  hf_flag = flags.DEFINE_string("hf_dir", None, "HuggingFace model directory.")
  gguf_flag = flags.DEFINE_string("gguf", None, "GGUF file (llama architecture), instead of --hf_dir.")
  out_flag = flags.DEFINE_string("out", None, "Run directory to create.", required=True)
  dtype_flag = flags.DEFINE_string("dtype", "float32", "Compute dtype of later runs.")
  param_dtype_flag = flags.DEFINE_string("param_dtype", "float32", "Stored parameter dtype.")
  scan_flag = flags.DEFINE_bool("scan_layers", False, "Stack the layers for nn.scan.")
  remat_flag = flags.DEFINE_enum("remat", "none", ["none", "full", "dots"], "Activation checkpointing.")
  attention_flag = flags.DEFINE_enum("attention_impl", "xla", ["xla", "cudnn"], "Attention implementation.")
  mesh_flag = flags.DEFINE_list("mesh", ["1", "-1", "1"], "Mesh (data, fsdp, tensor) to load onto.")

  def main(argv):
    del argv
    if not flags.FLAGS["verbosity"].present:
      logging.set_verbosity(logging.WARNING)
    runtime = {"dtype": dtype_flag.value, "param_dtype": param_dtype_flag.value, "scan_layers": scan_flag.value,
               "remat": remat_flag.value, "attention_impl": attention_flag.value}
    if (hf_flag.value is None) == (gguf_flag.value is None):
      raise ConfigError("name one source: --hf_dir=DIR or --gguf=FILE")
    mesh = tuple(int(x) for x in mesh_flag.value)
    if gguf_flag.value is not None:
      out = runs.import_gguf(gguf_flag.value, out_flag.value, runtime, mesh)
    else:
      out = runs.import_model(hf_flag.value, out_flag.value, runtime, mesh)
    print(f"imported: {out} (use it as --config.init_from={out} or --config.policy_from={out})")

  return main

