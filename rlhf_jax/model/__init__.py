"""The model, and nothing else: no data, optimiser or device logic. May import: errors.

  config.py       ModelConfig, the size presets (tiny, 13m ... 52b), parameter and FLOP counts
  transformer.py  the decoder-only transformer: RMSNorm, RoPE, SwiGLU/GeGLU, GQA, KV cache, LM
                  and scalar heads; logical axis names on every parameter
  lora.py         LoRA adapters on chosen weights: their spec, creation inside the modules, the
                  trainable/frozen split and join, and the merge into dense weights
  sampling.py     jitted KV-cache sampling: temperature, top-k, top-p, EOS, mixed-length prompts
"""
