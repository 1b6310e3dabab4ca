"""Pretrained HuggingFace checkpoints in and out: Llama, Mistral and Gemma model directories
(config.json, *.safetensors, tokenizer.model) as rlhf_jax runs, and runs back as such directories.
May import: errors, model, data, training.

  config.py        their config.json <-> ModelConfig and the tokenizer's special ids; what we refuse
  tensor_files.py  safetensors files, read by memory map and written one tensor at a time
  weights.py       their tensor names and layouts <-> our params, loaded straight onto a mesh
  runs.py          `hf:DIR` -> an imported run directory (cached), for init_from / policy_from
  import_model.py, export_model.py   the jobs hf_import and hf_export
"""
