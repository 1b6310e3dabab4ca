"""Optimizer from config: AdamW with linear warmup and cosine decay, global-norm clipping."""
from __future__ import annotations

import jax
import optax


def learning_rate_schedule(cfg, total_steps: int) -> optax.Schedule:
  """cfg: learning_rate, warmup_steps, final_lr_fraction; cosine decay ends at total_steps."""
  decay_steps = max(total_steps - cfg.warmup_steps, 1)
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=cfg.learning_rate, warmup_steps=cfg.warmup_steps,
      decay_steps=cfg.warmup_steps + decay_steps,
      end_value=cfg.learning_rate * cfg.final_lr_fraction)


def _decay_mask(params):
  # No weight decay on norm scales, biases and other vectors: decaying a gain towards 0 is
  # a regulariser nobody wants (the usual GPT practice).
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(cfg, total_steps: int) -> optax.GradientTransformation:
  """cfg: learning_rate, warmup_steps, final_lr_fraction, b1, b2, eps, weight_decay, grad_clip
  (a global-norm bound; <= 0: no clipping)."""
  # grad_clip <= 0 turns clipping off (optax would scale every gradient to norm 0 instead).
  clip = optax.clip_by_global_norm(cfg.grad_clip) if cfg.grad_clip > 0 else optax.identity()
  return optax.chain(
      clip,
      optax.adamw(learning_rate_schedule(cfg, total_steps), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                  weight_decay=cfg.weight_decay, mask=_decay_mask),
  )
