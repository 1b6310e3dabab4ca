"""The maths of each objective as pure functions on arrays. May import: errors, model.

  lm.py           token log-probs, next-token loss, context distillation
  pm.py           the preference loss on end-of-context scores, ranked comparisons
  ppo.py          KL-penalised rewards, KL estimates, GAE, clipped losses, the KL controller
  critic_free.py  RLOO and GRPO advantages over groups of samples of a prompt
  dpo.py          DPO / IPO losses and sequence log-probs
  calibration.py  accuracy intervals, calibration / ECE, PM score normalisation
  elo.py          Elo from PM score differences and from win counts
"""
