"""rlhf_jax: preference models and RLHF in JAX/Flax, and the scaling experiments of Bai et al. 2022.

Layers, bottom first; each may import only those below it (tests/test_layers.py holds the table):

  errors       user errors, the floor every layer stands on
  model/       the transformer, its configs and sampling
  data/        hh-rlhf, tokenizers, batching
  objectives/  the maths of each objective
  training/    what every trainer shares: sharding, state, checkpoints, the loop
  hf/          HuggingFace checkpoints in and out
  trainers/    jitted steps and the trainers
  evals/       evaluations of trained policies
  analysis/    fits, tables and figures
  experiments/ the stage runner, the sweep, online RLHF
  jobs         every job behind `python -m rlhf_jax JOB`

ARCHITECTURE.md draws the picture.
"""
