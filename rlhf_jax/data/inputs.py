"""The one call a trainer makes for its data: `trainer_data(config, workdir, kind)`.

- "lm": hh-rlhf dialogues (or data.path), packed rows for pretraining, one dialogue per row for
  SFT and distillation; the tokenizer trained on the training texts, or the one init_from has.
  Pretraining with data.corpus set: that text corpus's packed rows instead (data.corpus).
- "pm": comparisons [batch, 2, seq] (one seeded half with data.half); the tokenizer of init_from.
- "ppo": prompts of config.data, prompts_per_iteration a batch, and the fixed held-out prompts.
- "dpo": the comparisons of config.preferences with the loss on the final response only, and
  held-out prompts of config.data for the evaluation every policy gets.
A policy trainer's tokenizer is the one its policy and every PM share. Malformed records are
counted (data.skip_malformed) and reported by the readers; the count rides along.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

from rlhf_jax.data.batching import Batcher
from rlhf_jax.data.chat import with_chat_format
from rlhf_jax.data.lm_data import build_lm_batchers, load_or_train_tokenizer, train_eval_records
from rlhf_jax.data.pm_data import PMBatcher, encode_comparison, encode_pair, split_in_halves
from rlhf_jax.data.prompts import (
  PromptBatcher,
  eval_prompt_batcher,
  prompt_batcher,
  prompt_texts,
  prompts_per_iteration,
)
from rlhf_jax.data.tokenizer import Tokenizer, same_tokenizer
from rlhf_jax.errors import DataError

KINDS = ("lm", "pm", "ppo", "dpo")


class TrainerData(NamedTuple):
  tokenizer: Tokenizer
  train: Batcher
  eval: Batcher
  skipped: int  # malformed records skipped (only with data.skip_malformed)
  eval_prompts: Optional[PromptBatcher] = None  # "dpo": the held-out prompts its policy is sampled on


def comparison_records(config, workdir: str) -> tuple[list[dict], list[dict], int]:
  """(train, held-out, malformed skipped) comparisons of config.data, one half if data.half."""
  train_recs, eval_recs, skipped = train_eval_records(config, workdir)
  if config.data.half:  # the train-PM / test-PM robustness split of Bai et al. section 4.3
    train_recs = split_in_halves(train_recs, config.data.half_seed)["ab".index(config.data.half)]
  return train_recs, eval_recs, skipped


def _pm_batcher(config, tok: Tokenizer, records: list[dict], encode) -> PMBatcher:
  t = config.train
  return PMBatcher([encode(tok, r) for r in records], batch_size=t.batch_size, seq_len=t.seq_len, seed=t.seed,
                   pad_id=tok.pad_id)


def _comparisons(config, workdir: str, tok: Optional[Tokenizer], encode) -> TrainerData:
  train_recs, eval_recs, skipped = comparison_records(config, workdir)
  if not train_recs:  # a user's data, not a bug: one line, not the batcher's traceback
    raise DataError(f"no training comparisons in {config.data.get('path') or config.data.subset}")
  tok = tok or load_or_train_tokenizer(config, [r["chosen"] for r in train_recs], workdir)
  return TrainerData(tok, _pm_batcher(config, tok, train_recs, encode), _pm_batcher(config, tok, eval_recs, encode),
                     skipped)


def eval_comparisons(config, workdir: str) -> tuple[Tokenizer, PMBatcher]:
  """What a PM is evaluated on: its run's held-out comparisons (all of data.path when
  data.eval_fraction is 1), with the run's own tokenizer."""
  _, eval_recs, _ = train_eval_records(config, workdir)
  tok = load_or_train_tokenizer(config, [], workdir)
  return tok, _pm_batcher(config, tok, eval_recs, encode_comparison)


def policy_tokenizer(config) -> Tokenizer:
  return with_chat_format(same_tokenizer(config.policy_from, config.pm_dir, *config.eval.pm_dirs), config)


def trainer_data(config, workdir: str, kind: str) -> TrainerData:
  if kind == "lm":
    return TrainerData(*build_lm_batchers(config, workdir))
  if kind == "pm":
    return _comparisons(config, workdir, None, encode_comparison)
  if kind not in KINDS:
    raise ValueError(f"kind={kind!r}: expected one of {KINDS}")
  tok = policy_tokenizer(config)
  train_texts, eval_texts = prompt_texts(config, workdir)
  held_out = eval_prompt_batcher(config, tok, eval_texts)
  if kind == "ppo":
    return TrainerData(tok, prompt_batcher(config, tok, train_texts, prompts_per_iteration(config)), held_out, 0)
  view = config.copy_and_resolve_references()
  view.data = config.preferences  # the comparisons; config.data holds the evaluation prompts
  return _comparisons(view, workdir, tok, encode_pair)._replace(eval_prompts=held_out)
