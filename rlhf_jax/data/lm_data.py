"""The LM trainer's data: hh-rlhf dialogues, a tokenizer trained on them, train/eval batchers.

Offline, only harmless-base test exists, so a seeded fraction of whichever split is used is held
out for evaluation (`data.eval_fraction`); with the real train split, set data.eval_split="test".
Pretraining with data.corpus set reads that text corpus instead (rlhf_jax.data.corpus).
"""
from __future__ import annotations

from typing import Iterable

import numpy as np

from rlhf_jax import hosts, storage
from rlhf_jax.data import corpus
from rlhf_jax.data.batching import Batcher, Encoded, encode_dialogue, pack
from rlhf_jax.data.chat import with_chat_format
from rlhf_jax.data.hh_rlhf.load import load_split
from rlhf_jax.data.hh_rlhf.records import read_comparisons
from rlhf_jax.data.tokenizer import Tokenizer, has_tokenizer, load_tokenizer, train_tokenizer
from rlhf_jax.errors import ConfigError


def _keep_ties(config) -> bool:
  return config.data.get("keep_ties", False)  # absent from the configs of runs made before it existed


def _records(config, split: str, workdir: str) -> tuple[list[dict], int]:
  d = config.data
  loaded = load_split(d.subset, split, data_dir=d.get("tfds_dir") or storage.join(workdir, "tfds"),
                      source_dir=d.source_dir or None, skip_malformed=d.skip_malformed,
                      keep_ties=_keep_ties(config))
  if loaded.skipped:
    print(f"hh-rlhf {d.subset}/{split}: skipped {sum(loaded.skipped.values())} malformed records "
          f"{loaded.skipped}")
  if loaded.ties:
    print(f"hh-rlhf {d.subset}/{split}: {loaded.ties} ties (chosen == rejected) "
          f"{'kept' if _keep_ties(config) else 'left out'}")
  return loaded.records, sum(loaded.skipped.values())


def _file_records(config) -> tuple[list[dict], int]:
  loaded, report = read_comparisons(config.data.path, skip_malformed=config.data.skip_malformed,
                                    keep_ties=_keep_ties(config))
  if report.num_skipped or report.ties:
    print(report.summary())
  return loaded, report.num_skipped


def train_eval_records(config, workdir: str) -> tuple[list[dict], list[dict], int]:
  """(train records, eval records, number of malformed records skipped).

  data.path, if set, names any comparison file in the hh-rlhf format (e.g. preference-model
  pretraining data) and replaces data.subset / data.split.
  """
  d = config.data
  records, skipped = _file_records(config) if d.get("path") else _records(config, d.split, workdir)
  if d.max_examples:
    records = records[:d.max_examples]
  if d.eval_split:
    eval_records, eval_skipped = _records(config, d.eval_split, workdir)
    return records, eval_records, skipped + eval_skipped
  order = np.random.default_rng(d.seed).permutation(len(records))
  n_eval = max(1, int(round(len(records) * d.eval_fraction)))
  held_out = set(order[:n_eval].tolist())
  return ([r for i, r in enumerate(records) if i not in held_out],
          [r for i, r in enumerate(records) if i in held_out], skipped)


def load_or_train_tokenizer(config, texts: Iterable[str], workdir: str) -> Tokenizer:
  """config.tokenizer.path if given, else the tokenizer of the run in config.init_from, else the
  run's own (trained once on the training texts, then reused). texts may be lazy: it is read only
  when a tokenizer is trained."""
  init_from = config.get("init_from") or ""
  if config.tokenizer.path:
    tok = load_tokenizer(config.tokenizer.path)
  elif init_from and has_tokenizer(init_from):  # a model keeps the tokenizer it was trained with
    tok = load_tokenizer(init_from)
  elif has_tokenizer(workdir):
    tok = load_tokenizer(workdir)
  else:
    tok = train_tokenizer(texts, config.model.vocab_size, workdir)
  if storage.absolute(storage.dirname(tok.path)) != storage.absolute(workdir) and hosts.is_lead():
    tok.copy_to(workdir)  # every run directory is self-contained: later stages inherit it
  # A pretrained model's embedding may have rows no token uses (padded to a round size).
  if tok.vocab_size > config.model.vocab_size or (tok.vocab_size < config.model.vocab_size and not tok.pretrained):
    raise ConfigError(f"tokenizer {tok.path} has {tok.vocab_size} tokens but model.vocab_size is "
                     f"{config.model.vocab_size}")
  return with_chat_format(tok, config)


def _encode(tok: Tokenizer, records: list[dict], objective: str, seq_len: int) -> list[Encoded]:
  assistant_only = objective == "sft"
  encoded = [encode_dialogue(tok, r["chosen"], assistant_only=assistant_only) for r in records]
  # Pretraining packs dialogues into full rows; SFT and distillation keep one dialogue per row.
  return pack(encoded, seq_len) if objective == "pretrain" else encoded


def tokenizer_texts(config, workdir: str) -> list[str]:
  """What a tokenizer trained for this LM config learns from: a bounded sample of data.corpus when
  pretraining on one, else the training dialogues."""
  if corpus.uses_corpus(config):
    return list(corpus.sample_texts(config, workdir))
  return [r["chosen"] for r in train_eval_records(config, workdir)[0]]


def build_lm_batchers(config, workdir: str) -> tuple[Tokenizer, Batcher, Batcher, int]:
  """(tokenizer, train batcher, eval batcher, malformed records skipped); see rlhf_jax.data.inputs."""
  if corpus.uses_corpus(config):
    tok = load_or_train_tokenizer(config, corpus.sample_texts(config, workdir), workdir)
    return (tok, *corpus.corpus_batchers(config, workdir, tok))
  if config.data.get("corpus"):
    print(f"data.corpus is read by pretraining only: objective={config.objective} reads the dialogues")
  train_records, eval_records, skipped = train_eval_records(config, workdir)
  tok = load_or_train_tokenizer(config, [r["chosen"] for r in train_records], workdir)
  t = config.train
  make = lambda recs, seed: Batcher(_encode(tok, recs, config.objective, t.seq_len), batch_size=t.batch_size,
                                    seq_len=t.seq_len, seed=seed, pad_id=tok.pad_id)
  return tok, make(train_records, t.seed), make(eval_records, t.seed), skipped
