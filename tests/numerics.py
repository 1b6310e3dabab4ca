"""Tolerances for comparing two runs of the same training step on different shardings (or CPUs),
derived from the numerics rather than chosen.

Before any optimizer update both runs compute on identical parameters, so losses, metrics and
gradients differ only by float32 reassociation: a few ulps per summand, compared tightly.

After an Adam update they need not agree to that precision. Adam's update m_hat / (sqrt(v_hat)
+ eps) is scale-free: for a weight whose gradient is at the level of the reduction noise, the
last bits decide its sign, so one run can move it by +lr and the other by -lr. Two bounds follow:

- parameters: each step moves a weight by at most lr_t * r_t (plus decoupled weight decay),
  where r_t = max |m_hat| / sqrt(v_hat) over all gradient histories, by Cauchy-Schwarz
  sqrt(sum_i a_i^2 / b_i) with a_i, b_i the bias-corrected EMA weights of g_i in m_hat and v_hat
  (r_1 = 1). Two runs differ by at most twice the sum of these. A sharding bug (a missing
  all-reduce) moves most weights by a whole step, so the median difference is also checked.
- anything computed after the update: to first order |f(theta_a) - f(theta_b)| <=
  sum |df/dtheta| |theta_a - theta_b| (the measured parameter difference), with a safety factor
  for the second-order terms, plus the float32 slack of the evaluation itself.
- counts of decisions (accuracy, clip fractions): only an item whose decision margin lies within
  its tolerance of 0 may land on the other side.
"""
from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

FLOAT32_SLACK_RTOL = 1e-5  # a few hundred ulps: reductions over ~1e3-1e4 float32 summands
FLOAT32_SLACK_ATOL = 1e-6
# The second-order remainder is 1/2 H dtheta^2: a factor 4 on the first-order bound covers it while
# |H dtheta| <= 6 |J| per weight (dtheta <= 2 lr per step). Measured in test_pm, where one weight
# flipped: the step-2 margin moved by 1.0x its first-order bound.
FIRST_ORDER_SAFETY = 4.0


def adam_step_ratio_bound(b1: float, b2: float, t: int) -> float:
  """max |m_hat_t| / sqrt(v_hat_t) over gradient histories g_1..g_t (eps = 0)."""
  i = np.arange(1, t + 1)
  a = (1 - b1) * b1 ** (t - i) / (1 - b1 ** t)
  b = (1 - b2) * b2 ** (t - i) / (1 - b2 ** t)
  return float(np.sqrt(np.sum(a ** 2 / b)))


def assert_adam_runs_close(params_a, params_b, lrs: Sequence[float], b1: float, b2: float,
                           weight_decay: float = 0.0, max_abs_param: float = 10.0, first_step: int = 1) -> None:
  """params after len(lrs) Adam(W) steps from identical states (the first being optimizer step
  `first_step`), on two shardings."""
  per_step = [lr * (adam_step_ratio_bound(b1, b2, t) + weight_decay * max_abs_param)
              for t, lr in enumerate(lrs, first_step)]
  bound = 2 * sum(per_step)
  diffs = np.concatenate([np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).ravel()
                          for a, b in zip(jax.tree.leaves(params_a), jax.tree.leaves(params_b))])
  assert diffs.max() <= bound, f"a weight differs by {diffs.max():.3g} > {bound:.3g}, more than Adam allows"
  # Most weights have gradients far above the noise: they agree to float32 precision.
  assert np.median(diffs) <= 1e-2 * min(lrs), f"median difference {np.median(diffs):.3g}: most weights moved apart"


def first_order_tolerance(fn: Callable, params, other_params, *, safety: float = FIRST_ORDER_SAFETY,
                          rtol: float = FLOAT32_SLACK_RTOL, atol: float = FLOAT32_SLACK_ATOL):
  """(fn(params), tolerance) for a vector-valued fn [n] evaluated at other_params instead.

  fn is differentiated in float32 at params (the single-device run's); the tolerance is per output.
  """
  values = np.asarray(fn(params), np.float64)
  jac = jax.jacrev(fn)(params)  # leaves [n, *param_shape]
  spread = np.asarray(_contract(jac, _abs_diff(params, other_params)), np.float64)
  return values, safety * spread + rtol * np.abs(values) + atol


def first_order_tolerance_by_row(row_fn: Callable, params, other_params, *rows, safety: float = FIRST_ORDER_SAFETY,
                                 rtol: float = FLOAT32_SLACK_RTOL, atol: float = FLOAT32_SLACK_ATOL):
  """first_order_tolerance for outputs that each depend on one row of the inputs (per-token
  quantities): row_fn(params, *row) -> [n], mapped over the leading axis of `rows`; returns
  (values, tolerance) [num_rows, n]. Differentiating one row at a time costs n backward passes
  of one row rather than num_rows * n of the whole batch."""
  delta = _abs_diff(params, other_params)

  @jax.jit
  def values_and_spread(p, d, *rows):
    one = lambda *row: (row_fn(p, *row), _contract(jax.jacrev(row_fn)(p, *row), d))
    return jax.vmap(one)(*rows)

  values, spread = (np.asarray(x, np.float64) for x in values_and_spread(params, delta, *rows))
  return values, safety * spread + rtol * np.abs(values) + atol


def _abs_diff(a, b):
  return jax.tree.map(lambda x, y: jnp.abs(jnp.asarray(x, jnp.float32) - jnp.asarray(y, jnp.float32)), a, b)


def _contract(jac, delta):
  """sum_i |jac[..., i]| delta_i over every parameter: jac leaves [n, *param_shape] -> [n]."""
  return sum(jnp.tensordot(jnp.abs(j), d, axes=d.ndim) for j, d in zip(jax.tree.leaves(jac), jax.tree.leaves(delta)))
