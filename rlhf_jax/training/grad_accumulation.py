"""Gradient accumulation: one update from k micro-batches, so a step's activations are those of
batch / k sequences while its gradient is the whole batch's.

The batch's rows are dealt round-robin (micro-batch j holds rows j, j + k, ...), so each device
keeps its own rows and every micro-batch stays split across the batch mesh axes. Losses that are
means over a micro-batch combine with weights w_j = n_j / sum(n): equal for per-sequence means (PM
comparisons), the token counts for a token mean (LM loss), which makes the accumulated loss and
gradient equal to the full batch's, not a mean of micro-batch means.
"""
from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp


def micro_batches(batch, k: int):
  """[B, ...] leaves -> [k, B / k, ...]; micro-batch j holds rows j, j + k, j + 2k, ..."""
  def split(x):
    if x.shape[0] % k:
      raise ValueError(f"batch of {x.shape[0]} rows does not split into {k} micro-batches")
    return jnp.swapaxes(x.reshape(x.shape[0] // k, k, *x.shape[1:]), 0, 1)
  return jax.tree.map(split, batch)


def accumulated_value_and_grad(loss_fn: Callable, params, batch, k: int,
                               weight_fn: Optional[Callable] = None):
  """((loss, metrics), grads) of loss_fn(params, batch) -> (loss, metrics), computed over k
  micro-batches. weight_fn(micro_batch) -> the count the micro-batch's mean is over (None: equal
  counts). Metrics are combined with the same weights (exact for means; callers fix sums)."""
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  if k == 1:
    return grad_fn(params, batch)
  micro = micro_batches(batch, k)
  if weight_fn is None:
    weights = jnp.full((k,), 1.0 / k, jnp.float32)
  else:
    counts = jax.vmap(weight_fn)(micro).astype(jnp.float32)
    weights = counts / jnp.maximum(counts.sum(), 1.0)

  def body(acc, xs):
    mb, w = xs
    (loss, metrics), grads = grad_fn(params, mb)
    scale = lambda tree: jax.tree.map(lambda x: w * x.astype(jnp.float32), tree)
    acc = jax.tree.map(jnp.add, acc, (scale(loss), scale(metrics), scale(grads)))
    return acc, None

  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.float32),
                       jax.eval_shape(lambda: grad_fn(params, jax.tree.map(lambda x: x[0], micro))))
  (loss, metrics), grads = zeros
  (loss, metrics, grads), _ = jax.lax.scan(body, (loss, metrics, grads), (micro, weights))
  grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params)
  return (loss, metrics), grads
