"""One jitted step per objective, and the trainers that run them. May import: errors, model,
data, objectives, training, hf.

  lm_steps.py, pm_steps.py, dpo_steps.py, ppo_steps.py   the jitted, sharded steps
  train_lm.py     pretraining, SFT, context distillation          (job train_lm)
  train_pm.py     preference models, with PMP                     (job train_pm)
  train_ppo.py    PPO, RLOO, GRPO against a frozen PM             (job train_ppo)
  train_dpo.py    DPO / IPO                                       (job train_dpo)
  best_of_n.py    best-of-N against a PM                          (job best_of_n)
  pm_evaluation.py, eval_pm.py   a PM's accuracy, calibration, normalisation (job eval_pm)
  config_checks.py  a trainer's config checked before anything is built
"""
