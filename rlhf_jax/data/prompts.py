"""Prompts for the policy-gradient trainers: the first Human turn of each dialogue (or a prompts
file), truncated from the left and left-padded.
"""
from __future__ import annotations

import numpy as np

from rlhf_jax.data.batching import Batcher, Encoded
from rlhf_jax.data.chat import with_chat_format
from rlhf_jax.data.dialogue import human_turns_prompt
from rlhf_jax.data.hh_rlhf.records import read_prompts
from rlhf_jax.data.lm_data import train_eval_records
from rlhf_jax.data.tokenizer import Tokenizer


class PromptBatcher(Batcher):
  """Prompts truncated from the left and left-padded: [batch, prompt_len] tokens and mask."""

  def _fit(self, example: Encoded) -> Encoded:
    return Encoded(example.tokens[-self.seq_len:], example.loss_mask[-self.seq_len:])

  def _filler(self):
    return self.examples[0]

  def _collate(self, rows):
    tokens = np.full((len(rows), self.seq_len), self.pad_id, np.int32)
    mask = np.zeros((len(rows), self.seq_len), bool)
    for i, ex in enumerate(rows):
      n = len(ex.tokens)
      tokens[i, self.seq_len - n:], mask[i, self.seq_len - n:] = ex.tokens, True
    return {"tokens": tokens, "attention_mask": mask}


def prompt_texts(config, workdir: str) -> tuple[list[str], list[str]]:
  """(train, held-out) prompts: those of data.prompts_path if set (a seeded data.eval_fraction
  held out), else the first Human turn of each hh-rlhf dialogue of the configured data."""
  d = config.data
  if d.get("prompts_path"):
    prompts, report = read_prompts(d.prompts_path, skip_malformed=d.skip_malformed)
    if report.num_skipped:
      print(report.summary())
    order = np.random.default_rng(d.seed).permutation(len(prompts))
    n_eval = max(1, int(round(len(prompts) * d.eval_fraction)))
    return [prompts[i] for i in sorted(order[n_eval:])], [prompts[i] for i in sorted(order[:n_eval])]
  train_recs, eval_recs, _ = train_eval_records(config, workdir)
  first_turn = lambda recs: [human_turns_prompt(r["chosen"]) for r in recs]
  return first_turn(train_recs), first_turn(eval_recs)


def prompts_per_iteration(config) -> int:
  """Distinct prompts in a rollout: ppo.rollout_batch sequences, ppo.samples_per_prompt each."""
  return config.ppo.rollout_batch // config.ppo.get("samples_per_prompt", 1)


def prompt_batcher(config, tok: Tokenizer, texts: list[str], batch_size: int) -> PromptBatcher:
  return PromptBatcher([Encoded(tok.encode_prompt(t), []) for t in texts], batch_size=batch_size,
                       seq_len=config.sampling.prompt_len, seed=config.train.seed, pad_id=tok.pad_id)


def eval_prompt_batcher(config, tok: Tokenizer, eval_texts: list[str]) -> PromptBatcher:
  """The fixed prompts a run's policies are evaluated on: the first eval.num_prompts held-out
  prompts, as one batch."""
  n = config.eval.num_prompts
  return prompt_batcher(config, tok, eval_texts[:n], n)


def held_out_prompts(config, tok: Tokenizer, workdir: str) -> PromptBatcher:
  """eval_prompt_batcher of a policy trainer's config: what its evaluations sampled on."""
  return eval_prompt_batcher(config, with_chat_format(tok, config), prompt_texts(config, workdir)[1])
