"""PPO iterations end to end (generate -> score_rollout -> ppo_update, as train_ppo.step does) on
a tiny random-init policy against a rule "PM" whose reward has a known optimum: the number of
marker tokens in the response. Checks that PPO learns it while the KL to the reference grows,
that padding and post-EOS tokens never reach the losses, that a sharded update equals the
single-device one, that a checkpointed run resumes bitwise, and the adaptive KL controller.

Compilation is the dominant cost: the learning run is on a one-device mesh and every test
reuses the module's few jitted functions (one generate, score and update); the separate-value-net
losses and the 8-device iterations (sharded update, sharded resumption) compile anew.
"""
from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from rlhf_jax.data.batching import Encoded
from rlhf_jax.data.prompts import PromptBatcher
from rlhf_jax.model.config import PRESETS
from rlhf_jax.model.sampling import Generation, generate
from rlhf_jax.model.transformer import ModelOutput, Transformer, init_params
from rlhf_jax.objectives import ppo
from rlhf_jax.trainers.ppo_steps import Models, PPOHyper, ppo_loss, ppo_update, score_rollout
from rlhf_jax.training import sharding as shd
from rlhf_jax.training.checkpointing import Checkpointer
from rlhf_jax.training.optimizer import make_optimizer
from rlhf_jax.training.train_state import create_train_state, state_shardings

import numerics

PAD, EOS, EOC, MARKER = 0, 1, 2, 7
CFG = dataclasses.replace(PRESETS["tiny"], vocab_size=32, num_layers=1)
VALUE_CFG = dataclasses.replace(CFG, d_model=32, mlp_dim=64)  # a separate value net of its own shape
BATCH, PROMPT_LEN, NEW_TOKENS = 32, 4, 8
ITERS = 24  # the straight run; resumption restarts from its snapshot at ITERS // 2
KL_COEF, KL_TARGET, KL_HORIZON = 0.01, 6.0, 320  # 32 / 320: the coefficient moves <= 2% a step
HYPER = PPOHyper(gamma=1.0, lam=0.95, clip_eps=0.2, value_clip_eps=0.2, vf_coef=0.5, entropy_coef=0.0,
                 epochs=2, num_minibatches=2, whiten_advantages=True)
OPT = ml_collections.ConfigDict(dict(learning_rate=1e-3, warmup_steps=0, final_lr_fraction=1.0, b1=0.9,
                                     b2=0.95, eps=1e-8, weight_decay=0.0, grad_clip=1.0))


class MarkerPM(nn.Module):
  """A parameter-free "PM": at an EOC token, the count of MARKER among the valid tokens so far
  (prompts hold none, so: markers in the response); -10 anywhere else, so a score read off the
  EOC token would show."""

  @nn.compact
  def __call__(self, tokens, positions=None, attention_mask=None, cache=None, cache_index=0, *,
               lm_head=True):
    if attention_mask is None:
      attention_mask = jnp.ones(tokens.shape, bool)
    count = jnp.cumsum((tokens == MARKER) & attention_mask.astype(bool), axis=1).astype(jnp.float32)
    scalar = jnp.where(tokens == EOC, count, -10.0)
    return ModelOutput(None, scalar, scalar[..., None], None)


def _host(tree):
  """Deep host copy: later donation of the device buffers cannot touch it."""
  return jax.tree.map(lambda x: np.array(x, copy=True), tree)


def _assert_bitwise_equal(actual, expected):
  a_leaves, a_def = jax.tree_util.tree_flatten_with_path(actual)
  e_leaves, e_def = jax.tree_util.tree_flatten_with_path(expected)
  assert a_def == e_def
  for (path, a), (_, e) in zip(a_leaves, e_leaves):
    a, e = np.asarray(a), np.asarray(e)
    assert a.dtype == e.dtype and a.shape == e.shape, jax.tree_util.keystr(path)
    assert a.tobytes() == e.tobytes(), f"{jax.tree_util.keystr(path)}: values differ"


def _prompts() -> PromptBatcher:
  rng = np.random.default_rng(0)
  ids = [i for i in range(3, CFG.vocab_size) if i != MARKER]
  examples = [Encoded([int(t) for t in rng.choice(ids, rng.integers(1, PROMPT_LEN + 1))], [])
              for _ in range(64)]
  return PromptBatcher(examples, batch_size=BATCH, seq_len=PROMPT_LEN, seed=0, pad_id=PAD)


class Setup:
  """Models, optimizer, prompts and the jitted halves of an iteration, built like train_ppo's,
  on one mesh. With `base`, the same run (initial state, jitted functions) on another mesh."""

  def __init__(self, mesh_shape=(1, 1, 1), base: "Setup | None" = None):
    self.mesh = shd.make_mesh(mesh_shape, jax.devices()[:int(np.prod(mesh_shape))])
    self.init_fn = lambda r: {"policy": init_params(CFG, r)}
    self.extra = {"kl_coef": jnp.float32(KL_COEF)}
    if base is None:
      policy = Transformer(CFG)
      self.models = Models(policy, policy, MarkerPM())  # shared trunk: the policy's scalar head
      self.tx = make_optimizer(OPT, ITERS * HYPER.epochs * HYPER.num_minibatches)
      state, _ = create_train_state(self.init_fn, self.tx, self.mesh, jax.random.PRNGKey(0), self.extra)
      self.initial = _host(state)
      self.prompts = _prompts()
      self.sample = functools.partial(generate, model=policy, max_new_tokens=NEW_TOKENS, eos_id=EOS,
                                      pad_id=PAD)
      self.score = jax.jit(functools.partial(score_rollout, models=self.models, hyper=HYPER, eoc_id=EOC))
      self.update = jax.jit(functools.partial(ppo_update, models=self.models, hyper=HYPER, tx=self.tx),
                            donate_argnums=(0,))
    else:
      for name in ("models", "tx", "initial", "prompts", "sample", "score", "update"):
        setattr(self, name, getattr(base, name))
    self.abstract, self.shardings = state_shardings(self.init_fn, self.tx, self.mesh, self.extra)
    self.ref = jax.device_put(self.initial.params["policy"], self.shardings.params["policy"])
    self.norm = (jnp.float32(0.0), jnp.float32(1.0))  # the count itself is the reward
    # Keys and scalars committed like the loop's own (split from state.rng, read from state.extra):
    # uncommitted ones would be a new jit signature, i.e. a recompilation.
    self.commit = lambda x: jax.device_put(x, shd.replicated(self.mesh))

  def fresh(self, host_state=None):
    return jax.device_put(self.initial if host_state is None else host_state, self.shardings)

  def step(self, state, adaptive: bool):
    """One PPO iteration as train_ppo.step: all randomness from state.rng."""
    batch = self.prompts.batch_at(int(state.data_position))
    gen_rng, update_rng, next_rng = jax.random.split(state.rng, 3)
    gen = self.sample(state.params["policy"], batch["tokens"], batch["attention_mask"], gen_rng)
    rollout, metrics = self.score(state.params, self.ref, {}, gen, state.extra["kl_coef"], *self.norm)
    state, update_metrics = self.update(state, rollout, update_rng)
    kl_coef = state.extra["kl_coef"]
    if adaptive:
      kl_coef = ppo.adaptive_kl_coef(kl_coef, metrics["kl"], BATCH, KL_TARGET, KL_HORIZON)
    state = state.replace(step=state.step + 1, rng=next_rng, extra={"kl_coef": kl_coef},
                          data_position=state.data_position + BATCH)
    # Back to state_shardings' layout (train_ppo pins it with out_shardings): the un-pinned update
    # leaves some vectors sharded differently, and another input layout is another executable,
    # whose float32 results need not be bitwise those of a run restored from a checkpoint.
    state = jax.device_put(state, self.shardings)
    return state, {k: float(v) for k, v in {**metrics, **update_metrics}.items()}

  def run(self, state, iters: int, adaptive: bool = True):
    history = []
    for _ in range(iters):
      state, metrics = self.step(state, adaptive)
      history.append(metrics)
    return state, history

  def evaluate(self, params) -> dict[str, float]:
    """Mean raw PM reward and KL over 4 x 32 fixed prompts and sampling seeds."""
    out = []
    for i in range(4):
      batch = self.prompts.batch_at(BATCH * i)
      gen = self.sample(params["policy"], batch["tokens"], batch["attention_mask"],
                        self.commit(jax.random.PRNGKey(100 + i)))
      _, metrics = self.score(params, self.ref, {}, gen, self.commit(jnp.float32(KL_COEF)), *self.norm)
      out.append((float(metrics["pm_reward_raw"]), float(metrics["kl"])))
    reward, kl = np.mean(out, axis=0)
    return {"reward": reward, "kl": kl}


@pytest.fixture(scope="module")
def setup() -> Setup:
  return Setup()


@pytest.fixture(scope="module")
def sharded_setup(setup) -> Setup:
  return Setup((2, 2, 2), base=setup)


def _straight_run(setup: Setup, iters: int):
  """The uninterrupted run (adaptive KL): host snapshots after every iteration, and metrics."""
  state = setup.fresh()
  snapshots, history = {0: setup.initial}, []
  for i in range(1, iters + 1):
    state, metrics = setup.step(state, adaptive=True)
    snapshots[i] = _host(state)
    history.append(metrics)
  return snapshots, history


@pytest.fixture(scope="module")
def straight(setup):
  return _straight_run(setup, ITERS)


def test_ppo_learns_marker_reward_and_moves_away_from_reference(setup, straight):
  snapshots, history = straight
  initial = setup.evaluate(setup.fresh().params)
  final = setup.evaluate(setup.fresh(snapshots[ITERS]).params)
  # Measured: 0.19 markers per response at init (0.17-0.54 over other init seeds), 7.8 of a
  # possible 8 after 24 iterations; KL 0 -> 16 nats (29-35 over other seeds).
  assert initial["kl"] == 0.0  # the initial policy is the reference
  assert initial["reward"] < 1.5
  assert final["reward"] > max(3 * initial["reward"], 5.0)
  assert final["kl"] > 2.0
  # In the training loop: policy == reference at the first rollout, so its KL is exactly 0;
  # afterwards the policy has moved.
  assert abs(history[0]["kl"]) < 1e-6
  assert all(m["kl"] > 0.1 for m in history[2:])
  assert history[-1]["pm_reward_raw"] > 5.0
  assert all(np.isfinite(v) for m in history for v in m.values())


def test_larger_kl_coefficient_keeps_policy_closer(setup, straight):
  _, history = straight
  state = setup.fresh()
  state = state.replace(extra={"kl_coef": jnp.full_like(state.extra["kl_coef"], 1.0)})
  _, strong = setup.run(state, ITERS, adaptive=False)
  # The penalty is -kl_coef * log-ratio per token: at 1.0 every nat of KL costs as much as a marker.
  assert all(m["kl_coef"] == 1.0 for m in strong)
  assert strong[-1]["kl"] < 0.25 * history[-1]["kl"]  # measured: 1.0 against 16.8


def _random_params(cfg, seed):
  """Random params from numpy (eager jax.random init would compile per shape), all non-zero:
  a non-zero scalar head, so value gradients reach the trunk."""
  rng = np.random.default_rng(seed)
  shapes = nn.meta.unbox(jax.eval_shape(lambda r: init_params(cfg, r), jax.random.PRNGKey(0)))
  return jax.tree_util.tree_map_with_path(
      lambda path, x: ((1.0 if "scale" in jax.tree_util.keystr(path) else 0.0)
                       + 0.1 * rng.normal(size=x.shape)).astype(x.dtype), shapes)


def _gen_with_padding(setup) -> Generation:
  """Prompts with 0-3 left pads, and responses of lengths 1..8 (EOS last when shorter), pad after."""
  batch = setup.prompts.batch_at(0)
  rng = np.random.default_rng(1)
  lengths = np.arange(BATCH) % NEW_TOKENS + 1
  tokens = rng.integers(3, CFG.vocab_size, (BATCH, NEW_TOKENS)).astype(np.int32)
  mask = np.arange(NEW_TOKENS)[None, :] < lengths[:, None]
  short = lengths < NEW_TOKENS
  tokens[~short, -1] = MARKER  # markers right before EOC, so a score read one slot early shows
  odd = np.arange(1, BATCH, 2)  # lengths 2, 4, ..., 8: a marker just before EOS (or the last token)
  tokens[odd, lengths[odd] - 2] = MARKER
  tokens[short, lengths[short] - 1] = EOS
  tokens[~mask] = PAD
  assert (~batch["attention_mask"]).any() and batch["attention_mask"][:, -1].all()
  return Generation(jnp.asarray(batch["tokens"]), jnp.asarray(batch["attention_mask"]),
                    jnp.asarray(tokens), jnp.zeros((BATCH, NEW_TOKENS)), jnp.asarray(mask),
                    jnp.asarray(lengths))


def test_padding_and_post_eos_tokens_never_reach_the_losses(setup, straight):
  snapshots, _ = straight
  # A separate value net (train_ppo's default) with a random scalar head, so value gradients
  # reach its trunk; entropy on, so that term's masking is exercised too.
  hyper = HYPER._replace(entropy_coef=0.01)
  models = Models(setup.models.policy, Transformer(VALUE_CFG), MarkerPM())
  value = _random_params(VALUE_CFG, seed=1)
  rollout_params = {"policy": snapshots[2].params["policy"], "value": value}
  params = {"policy": snapshots[3].params["policy"], "value": value}  # ratios != 1: clipping is live
  score = jax.jit(functools.partial(score_rollout, models=models, hyper=hyper, eoc_id=EOC))
  loss_grad = jax.jit(jax.value_and_grad(functools.partial(ppo_loss, models=models, hyper=hyper,
                                                           prompt_len=PROMPT_LEN), has_aux=True))
  ref = setup.initial.params["policy"]

  gen = _gen_with_padding(setup)
  rollout, metrics = score(rollout_params, ref, {}, gen, jnp.float32(0.1), *setup.norm)
  rollout, metrics = _host(rollout), _host(metrics)
  m = np.asarray(gen.mask)
  assert (~m).any() and m.any(axis=1).all()
  for key in ("advantages", "returns"):
    assert np.all(rollout[key][~m] == 0.0), key
  assert np.all(rollout["advantages"][m] != 0.0)
  # The PM scores the responses themselves: markers counted over real tokens only.
  assert metrics["pm_reward_raw"] == pytest.approx(((np.asarray(gen.tokens) == MARKER) & m).sum(1).mean())

  # Junk (markers and EOS included) at every masked slot: prompt pads and tokens after EOS.
  junk_rng = np.random.default_rng(3)
  prompt_junk = np.where(np.asarray(gen.prompt_mask), np.asarray(gen.prompt_tokens),
                         junk_rng.choice([EOS, MARKER, 5, 31], gen.prompt_tokens.shape))
  response_junk = np.where(m, np.asarray(gen.tokens), junk_rng.choice([EOS, MARKER, 9], m.shape))
  junk_gen = gen._replace(prompt_tokens=jnp.asarray(prompt_junk), tokens=jnp.asarray(response_junk))
  junk_rollout, junk_metrics = _host(score(rollout_params, ref, {}, junk_gen, jnp.float32(0.1),
                                           *setup.norm))
  for key in ("old_logp", "old_values", "advantages", "returns"):
    np.testing.assert_allclose(junk_rollout[key][m], rollout[key][m], rtol=1e-6, atol=1e-6, err_msg=key)
  assert np.all(junk_rollout["advantages"][~m] == 0.0) and np.all(junk_rollout["returns"][~m] == 0.0)
  for key in metrics:
    np.testing.assert_allclose(junk_metrics[key], metrics[key], rtol=1e-6, atol=1e-6, err_msg=key)

  # ppo_loss on the fixed rollout: junk at masked positions changes neither the loss nor its
  # gradients, nor do junk rollout statistics (old log-probs, values, advantages) there. (score_rollout
  # leaves the pad token's log-prob and value at those positions, unlike the sampler's zeros.)
  def loss_and_grads(mb):
    (loss, aux), grads = loss_grad(params, mb)
    return float(loss), _host(aux), _host(grads)

  loss, aux, grads = loss_and_grads(rollout)
  assert aux["clip_fraction"] > 0 and aux["value_loss"] > 0
  assert all(np.abs(g).max() > 0 for g in jax.tree.leaves(grads["value"]))  # every value param learns
  full_mask = np.asarray(rollout["mask"])
  tokens_junk = np.concatenate([prompt_junk, response_junk], axis=1)
  junk = dict(rollout, tokens=tokens_junk, response=response_junk,
              old_logp=np.where(m, rollout["old_logp"], -7.0).astype(np.float32),
              old_values=np.where(m, rollout["old_values"], 50.0).astype(np.float32),
              advantages=np.where(m, rollout["advantages"], 3.0).astype(np.float32),
              returns=np.where(m, rollout["returns"], -9.0).astype(np.float32))
  assert not np.array_equal(tokens_junk[~full_mask], rollout["tokens"][~full_mask])
  junk_loss, junk_aux, junk_grads = loss_and_grads(junk)
  np.testing.assert_allclose(junk_loss, loss, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9), junk_aux, aux)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-9), junk_grads, grads)

  # ... while one real response token, or one real prompt token, does change it.
  row = 3  # response length 4
  changed = dict(rollout, tokens=rollout["tokens"].copy(), response=rollout["response"].copy())
  new_token = 5 if changed["response"][row, 1] != 5 else 6
  changed["response"][row, 1] = changed["tokens"][row, PROMPT_LEN + 1] = new_token
  assert abs(loss_and_grads(changed)[0] - loss) > 1e-5
  changed = dict(rollout, tokens=rollout["tokens"].copy())
  changed["tokens"][row, PROMPT_LEN - 1] = 5 if changed["tokens"][row, PROMPT_LEN - 1] != 5 else 6
  assert abs(loss_and_grads(changed)[0] - loss) > 1e-5


def test_score_rollout_log_probs_are_the_samplers(setup):
  # The logit at slot P-1+t predicts response token t: the rescored log-probs of real tokens are
  # those the sampler drew with, so the first update's ratios start at exactly 1 (up to float).
  state = setup.fresh()
  batch = setup.prompts.batch_at(0)
  gen = setup.sample(state.params["policy"], batch["tokens"], batch["attention_mask"],
                     setup.commit(jax.random.PRNGKey(7)))
  rollout, _ = setup.score(state.params, setup.ref, {}, gen, state.extra["kl_coef"], *setup.norm)
  m = np.asarray(gen.mask)
  np.testing.assert_allclose(np.asarray(rollout["old_logp"])[m], np.asarray(gen.log_probs)[m],
                             rtol=1e-4, atol=1e-5)
  # ... and the logged gap between the two programs is that float rounding.
  _, metrics = setup.score(state.params, setup.ref, {}, gen, state.extra["kl_coef"], *setup.norm)
  gap = np.abs(np.asarray(rollout["old_logp"], np.float64) - np.asarray(gen.log_probs, np.float64))[m]
  np.testing.assert_allclose(float(metrics["sampler_logp_gap_max"]), gap.max(), rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(float(metrics["sampler_logp_gap_mean"]), gap.mean(), rtol=1e-4, atol=1e-7)
  assert float(metrics["sampler_logp_gap_max"]) < 1e-4
  # The advantages' spread (a reward-hacking monitor) is measured before whitening: GAE's returns
  # are advantages + values, so the raw advantages are returns - values.
  raw = (np.asarray(rollout["returns"], np.float64) - np.asarray(rollout["old_values"], np.float64))[m]
  np.testing.assert_allclose(float(metrics["advantage_std"]), raw.std(), rtol=1e-4)
  assert abs(raw.std() - 1.0) > 0.05  # not the whitened spread (std 1) by accident


def test_critic_free_advantage_spread_is_the_returns_spread_within_groups():
  # GRPO: normalised advantages have std sqrt(3/4) in every group of 4; the monitor is the mean
  # within-group std of the KL-penalised returns.
  rng = np.random.default_rng(0)
  rewards = rng.normal(0.0, 1.0, (8, 5)) * np.array([0.1, 0.1, 1.0, 1.0, 3.0, 3.0, 0.5, 0.5])[:, None]
  mask = np.ones((8, 5), bool)
  from rlhf_jax.trainers import ppo_steps
  grpo = HYPER._replace(algorithm="grpo", samples_per_prompt=4)
  _, _, spread = ppo_steps._advantages(jnp.asarray(rewards, jnp.float32), jnp.zeros((8, 5)), jnp.asarray(mask), grpo)
  want = rewards.sum(axis=1).reshape(2, 4).std(axis=1).mean()
  np.testing.assert_allclose(float(spread), want, rtol=1e-5)


def test_a_sampler_that_differs_is_measured_and_its_tokens_reweighted(setup):
  """A sampler at temperature 2 draws from another distribution than the learner's, by
  construction: the gap is logged, and with TIS every token's surrogate is weighted by
  min(p_learner / p_sampler, cap)."""
  state = setup.fresh()
  batch = setup.prompts.batch_at(0)
  hot = functools.partial(generate, model=setup.models.policy, max_new_tokens=NEW_TOKENS, eos_id=EOS, pad_id=PAD,
                          temperature=2.0)
  gen = hot(state.params["policy"], batch["tokens"], batch["attention_mask"], setup.commit(jax.random.PRNGKey(7)))
  cap = 1.5
  tis = HYPER._replace(tis_cap=cap)
  score = jax.jit(functools.partial(score_rollout, models=setup.models, hyper=tis, eoc_id=EOC))
  rollout, metrics = score(state.params, setup.ref, {}, gen, state.extra["kl_coef"], *setup.norm)
  m = np.asarray(gen.mask)
  learner, sampler = np.asarray(rollout["old_logp"], np.float64), np.asarray(gen.log_probs, np.float64)
  want = np.where(m, np.minimum(np.exp(learner - sampler), cap), 0.0)
  np.testing.assert_allclose(np.asarray(rollout["tis_weight"]), want, rtol=1e-5, atol=1e-6)
  assert 0 < (want[m] >= cap).mean() < 1, "the case must hold truncated and untruncated weights"
  np.testing.assert_allclose(float(metrics["sampler_logp_gap_mean"]), np.abs(learner - sampler)[m].mean(), rtol=1e-4)
  assert float(metrics["sampler_logp_gap_mean"]) > 0.1  # temperature 2 flattens a peaked distribution
  # The update's surrogate: each token's clipped term times its (constant) weight.
  _, base = ppo_loss(state.params, {**rollout, "tis_weight": jnp.ones_like(rollout["tis_weight"])},
                     models=setup.models, hyper=tis, prompt_len=PROMPT_LEN)
  _, weighted = ppo_loss(state.params, rollout, models=setup.models, hyper=tis, prompt_len=PROMPT_LEN)
  adv = np.asarray(rollout["advantages"], np.float64)
  # At the rollout's own params every ratio is 1: the surrogate is -A per token, masked mean.
  np.testing.assert_allclose(float(base["policy_loss"]), -adv[m].mean(), rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(float(weighted["policy_loss"]), -(want * adv)[m].mean(), rtol=1e-4, atol=1e-6)


# The continuous metrics of ppo_loss, compared after the update (grad_norm, which would need
# second derivatives there, is compared before it).
UPDATE_METRICS = ("policy_loss", "value_loss", "approx_kl", "update_entropy")


def _minibatch_order(rng):
  """Rows of each minibatch step, drawn as ppo_update draws them: a permutation per epoch."""
  perms = jnp.stack([jax.random.permutation(k, BATCH) for k in jax.random.split(rng, HYPER.epochs)])
  return np.asarray(perms).reshape(HYPER.epochs * HYPER.num_minibatches, -1)


def _update_metrics_fn(setup, rollout, order):
  """params -> UPDATE_METRICS averaged over the minibatch steps, all evaluated at params."""
  def one(params, rows):
    mb = jax.tree.map(lambda x: jnp.take(x, rows, axis=0), rollout)
    _, m = ppo_loss(params, mb, models=setup.models, hyper=HYPER, prompt_len=PROMPT_LEN)
    return jnp.stack([m[k] for k in UPDATE_METRICS])

  return jax.jit(lambda params: jnp.mean(jax.lax.map(functools.partial(one, params), jnp.asarray(order)), axis=0))


def _token_outputs(setup, params, tokens, mask, response):
  """One rollout row -> [log-probs of its response tokens, their values] [2 * NEW_TOKENS]: what
  ppo_loss's clip decisions are made on."""
  out = setup.models.policy.apply({"params": params["policy"]}, tokens[None], attention_mask=mask[None])
  logits = out.logits[0, PROMPT_LEN - 1:-1]
  logp = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), response[:, None], axis=-1)[:, 0]
  return jnp.concatenate([logp, out.scalar[0, PROMPT_LEN - 1:-1]])


def _undecided_clips(setup, rollout, params, other_params):
  """Per token [batch, NEW_TOKENS]: whether its policy / value clip decision lies within the
  first-order tolerance (tests/numerics.py) of flipping between params and other_params."""
  outputs, tol = numerics.first_order_tolerance_by_row(
      functools.partial(_token_outputs, setup), params, other_params,
      rollout["tokens"], rollout["mask"], rollout["response"])
  logp, values = outputs[:, :NEW_TOKENS], outputs[:, NEW_TOKENS:]
  tol_logp, tol_values = tol[:, :NEW_TOKENS], tol[:, NEW_TOKENS:]
  m = np.asarray(rollout["response_mask"])
  adv = np.asarray(rollout["advantages"], np.float64)
  log_ratio = logp - np.asarray(rollout["old_logp"], np.float64)
  # Clipped iff A > 0 and log ratio > log(1 + eps), or A < 0 and log ratio < log(1 - eps).
  policy_margin = np.where(adv > 0, log_ratio - np.log1p(HYPER.clip_eps), np.log1p(-HYPER.clip_eps) - log_ratio)
  policy = m & (adv != 0) & (np.abs(policy_margin) <= tol_logp)
  # Clipped iff the value left the clip range and the clipped one is the farther from the return:
  # both margins move by at most the value's own change.
  old, ret = np.asarray(rollout["old_values"], np.float64), np.asarray(rollout["returns"], np.float64)
  clipped = old + HYPER.value_clip_eps * np.sign(values - old)
  value_margin = np.minimum(np.abs(values - old) - HYPER.value_clip_eps, np.abs(clipped - ret) - np.abs(values - ret))
  value = m & (np.abs(value_margin) <= tol_values)
  return policy, value


def test_sharded_update_equals_single_device(setup, sharded_setup, straight):
  snapshots, _ = straight
  host_state = snapshots[ITERS // 2]  # Adam moments and a policy away from the reference
  state = setup.fresh(host_state)
  batch = setup.prompts.batch_at(int(host_state.data_position))
  gen = setup.sample(state.params["policy"], batch["tokens"], batch["attention_mask"],
                     setup.commit(jax.random.PRNGKey(3)))
  rollout_1, _ = setup.score(state.params, setup.ref, {}, gen, state.extra["kl_coef"], *setup.norm)
  rollout = _host(rollout_1)
  rng = jax.random.PRNGKey(4)
  # The same update with learning rate 0 (same optimizer state layout): every minibatch step on
  # the parameters it was given, so its metrics are those of that parameter set.
  frozen_tx = make_optimizer(ml_collections.ConfigDict(dict(OPT, learning_rate=0.0)),
                             ITERS * HYPER.epochs * HYPER.num_minibatches)
  frozen = jax.jit(functools.partial(ppo_update, models=setup.models, hyper=HYPER, tx=frozen_tx))

  def on_mesh(s, host):
    sharded = s is sharded_setup
    run_rollout = shd.shard_batch(rollout, s.mesh) if sharded else rollout_1
    before, before_metrics = _host(frozen(s.fresh(host), run_rollout, s.commit(rng)))
    state = s.fresh(host)
    if sharded:
      w = state.params["policy"]["layer_0"]["mlp"]["w_gate"]
      assert w.addressable_shards[0].data.shape == (CFG.d_model // 2, CFG.mlp_dim // 2)  # really split
    state, _ = setup.update(state, run_rollout, s.commit(rng))
    after = _host(state)
    after_metrics = _host(frozen(s.fresh(after), run_rollout, s.commit(rng))[1])
    return before, before_metrics, after, after_metrics

  frozen_1, before_1, state_1, after_1 = on_mesh(setup, host_state)
  _, before_8, state_8, after_8 = on_mesh(sharded_setup, host_state)
  _assert_bitwise_equal(frozen_1.params, host_state.params)  # learning rate 0 really froze them
  assert before_1.keys() == before_8.keys() == after_1.keys() == after_8.keys()
  # On identical parameters only float32 reassociation across shards separates the two: means of
  # unit-scale summands (whitened advantages) over <= 128 tokens and a norm over 5e4 squares, a few
  # ulps each. Measured: <= 2e-7 relative, 1e-7 absolute for the ~0 policy loss at ratio 1.
  for key in before_1:
    np.testing.assert_allclose(before_8[key], before_1[key], rtol=1e-5, atol=1e-6, err_msg=key)

  params_before = host_state.params
  params_1, params_8 = state_1.params, state_8.params
  assert max(float(np.abs(a - b).max()) for a, b in
             zip(jax.tree.leaves(params_1), jax.tree.leaves(params_before))) > 1e-3  # a real update
  # Adam may move a weight whose gradient is at the reduction noise differently on the two meshes
  # (tests/numerics.py); a sharding bug (a missing all-reduce, a minibatch drawn differently)
  # moves most weights by whole steps. Measured: max 3e-8, median 0.
  first = ITERS // 2 * HYPER.epochs * HYPER.num_minibatches + 1  # optimizer steps taken before
  numerics.assert_adam_runs_close(params_1, params_8, [OPT.learning_rate] * (HYPER.epochs * HYPER.num_minibatches),
                                  OPT.b1, OPT.b2, first_step=first)
  assert int(state_8.step) == int(state_1.step) == ITERS // 2  # iterations are counted by the caller

  # After the update the two parameter sets may differ by what Adam allows: the metrics there by
  # what that difference explains to first order (and no more).
  order = _minibatch_order(rng)
  values, tol = numerics.first_order_tolerance(_update_metrics_fn(setup, rollout, order), params_1, params_8)
  np.testing.assert_allclose(values, [after_1[k] for k in UPDATE_METRICS], rtol=1e-5,
                             atol=1e-6)  # the reference computation (and minibatch order) is the update's own
  for i, key in enumerate(UPDATE_METRICS):
    assert abs(after_8[key] - after_1[key]) <= tol[i], (key, after_8[key], after_1[key], tol[i])
  # Clip fractions count decisions: only tokens within their tolerance of a clip boundary may
  # change side, each by 1 / (tokens in its minibatch), plus an ulp or so for the float32 mean.
  # Measured: no token is undecided.
  undecided = dict(zip(("clip_fraction", "value_clip_fraction"), _undecided_clips(setup, rollout, params_1, params_8)))
  tokens = np.asarray(rollout["response_mask"])
  for key, und in undecided.items():
    bound = np.mean([und[rows].sum() / tokens[rows].sum() for rows in order])
    assert abs(after_8[key] - after_1[key]) <= bound + 1e-6 * after_1[key], (key, after_8[key], after_1[key], bound)
  assert after_1["clip_fraction"] > 0 and after_1["value_clip_fraction"] > 0  # both decisions are live
  assert after_8["nonfinite"] == after_1["nonfinite"] == 0


def _check_resume(setup: Setup, snapshots, half: int, end: int, directory):
  """Checkpoint the straight run's state at `half`, restore it (abstract state from
  state_shardings, as a new process would), continue to `end`: bitwise the straight run's."""
  with Checkpointer(directory, async_save=False) as ckpt:
    ckpt.save(half, setup.fresh(snapshots[half]))
  with Checkpointer(directory) as ckpt:  # a new process would see only the directory
    abstract, _ = state_shardings(setup.init_fn, setup.tx, setup.mesh, setup.extra)
    resumed, meta = ckpt.restore(abstract)
  assert meta == {"step": half}
  _assert_bitwise_equal(resumed, snapshots[half])
  resumed, _ = setup.run(resumed, end - half)
  resumed = _host(resumed)

  final = snapshots[end]
  assert int(final.step) == end and int(final.data_position) == end * BATCH
  _assert_bitwise_equal(resumed, final)
  # Nothing in it is vacuously equal: the parameters, the KL coefficient and the rng all moved.
  assert final.extra["kl_coef"] != snapshots[half].extra["kl_coef"]
  assert not np.array_equal(final.rng, snapshots[half].rng)
  assert not np.array_equal(final.params["policy"]["embedding"],
                            snapshots[half].params["policy"]["embedding"])


def test_resume_equals_uninterrupted_run(setup, straight, tmp_path):
  _check_resume(setup, straight[0], ITERS // 2, ITERS, tmp_path / "ckpt")


def test_resume_on_sharded_mesh_equals_uninterrupted_run(sharded_setup, tmp_path):
  # On 8 devices the restored state is placed by state_shardings, as Setup.step re-places the
  # straight run's after every iteration: both run the same executables, so bitwise it is.
  snapshots, _ = _straight_run(sharded_setup, 4)
  _check_resume(sharded_setup, snapshots, 2, 4, tmp_path / "ckpt")


def test_adaptive_kl_coefficient_follows_observed_kl(straight):
  snapshots, history = straight
  coefs = [float(snapshots[i].extra["kl_coef"]) for i in range(ITERS + 1)]
  assert coefs[0] == pytest.approx(KL_COEF)
  below = above = 0
  for i, metrics in enumerate(history):
    # Each rollout's rewards use the coefficient of the state it started from ...
    assert metrics["kl_coef"] == pytest.approx(coefs[i], rel=1e-6)
    # ... and its KL moves the next one towards the target: up when above, down when below.
    error = np.clip(metrics["kl"] / KL_TARGET - 1.0, -0.2, 0.2)
    assert coefs[i + 1] == pytest.approx(coefs[i] * (1 + error * BATCH / KL_HORIZON), rel=1e-5)
    if metrics["kl"] > KL_TARGET:
      above += 1
      assert coefs[i + 1] > coefs[i]
    else:
      below += 1
      assert coefs[i + 1] < coefs[i]
  assert below >= 2 and above >= 2  # the run crossed the target: both directions were exercised
