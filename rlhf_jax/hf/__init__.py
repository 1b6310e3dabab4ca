"""Pretrained HuggingFace checkpoints in and out: Llama 1-3.x, Mistral, Gemma, Qwen2/2.5, Qwen3 and
SmolLM2 model directories (config.json, *.safetensors, tokenizer files) as rlhf_jax runs, and runs
back as such directories.
May import: errors, model, data, training.

  config.py        their config.json <-> ModelConfig and the tokenizer's special ids; what we refuse
  tensor_files.py  safetensors files, read by memory map and written one tensor at a time
  weights.py       their tensor names and layouts <-> our params, loaded straight onto a mesh
  gguf_model.py    a llama.cpp GGUF file: its metadata -> ModelConfig, its tensors dequantised under HF names
  gguf_tokenizer.py  a GGUF file's byte-level BPE vocabulary -> tokenizer.json, special ids, chat template
  runs.py          `hf:DIR` or `gguf:FILE` -> an imported run directory (cached), for init_from / policy_from;
                   a checkpoint's content hash, model and tokenizer bytes
  import_model.py, export_model.py   the jobs hf_import and hf_export
"""
