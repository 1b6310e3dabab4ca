"""Experiments made of stages, the top layer. May import: every other layer.

  stages.py             the stage runner: cached, resumable stages that declare their inputs and
                        refuse changed settings
  checkpoint_sizes.py   sweep sizes that are checkpoints (hf:DIR, gguf:FILE): imported as lm_<size>
  stage_configs.py      each stage's trainer config, derived from a sweep config
  sweep.py              the scaling experiment: every stage per size; results.jsonl  (job sweep)
  online.py             iterated online RLHF: rounds of labels, PM, policy          (job online)
  simulated_labeller.py the noisy gold-PM labeller of the online rounds
"""
