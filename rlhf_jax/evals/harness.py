"""lm-evaluation-harness (EleutherAI, 0.4.x) over any run directory: its tasks, our model.

`RunLM` is a harness model (`lm_eval.api.model.LM`) backed by this package's bucketed scorer
(rlhf_jax.evals.loglik.Scorer: a few compiled programs for a whole task, on any mesh) and KV-cache
sampler, so harness numbers for an LM, SFT, PPO or imported checkpoint compare with published ones.

  python -m rlhf_jax evaluate --config=configs/evaluate.py --config.policy_dir=RUN \\
      --config.suites=harness --config.harness.tasks=arc_easy,hellaswag \\
      [--config.harness.include_path=DIR_OF_YAML]

Conventions, the harness's, which our own `mc` suite (evals/multiple_choice.py) follows too:
- a request is (context, continuation); the continuation carries the delimiter (" blue"), and
  trailing whitespace of a context moves to its continuation (loglik.encode_requests);
- the context opens with BOS where the tokenizer's default adds one (Llama 3, SmolLM2 do not);
- `acc_norm` divides a choice's log-likelihood by its length in characters (the harness counts the
  choice as doc_to_choice gives it: a task whose choices carry their leading space, with
  target_delimiter "", counts that space, as `mc` does);
- is_greedy: every continuation token is the model's argmax;
- generate_until decodes greedily (or samples at the requested temperature) up to max_gen_toks
  and cuts the text at the first `until` string.
Tasks are the harness's own (downloaded by `datasets` when online) or YAML files in
`include_path`, e.g. over local JSONL (`dataset_path: json`, `dataset_kwargs.data_files`).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from lm_eval.api.model import LM

from rlhf_jax.errors import ConfigError
from rlhf_jax.evals.loglik import Scorer, encode_requests
from rlhf_jax.model.sampling import generate
from rlhf_jax.model.transformer import Transformer

GENERATE_BATCH = 8


class RunLM(LM):
  """A harness model over a Scorer (its params and config) and the run's tokenizer."""

  def __init__(self, scorer: Scorer, tok, *, max_gen_toks: int = 256, seed: int = 0):
    super().__init__()
    self.scorer, self.tok, self.max_gen_toks, self.seed = scorer, tok, max_gen_toks, seed

  def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
    contexts, continuations = zip(*[r.args for r in requests]) if requests else ((), ())
    scores = self.scorer.continuation_scores(encode_requests(self.tok, contexts, continuations), desc="harness")
    return [(float(logp.sum()), bool(greedy.all())) for logp, greedy in scores]

  def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
    """A document's log-likelihood, every token scored: windows of at most max_len tokens, each
    with as much of the text before it as fits as context (the harness's rolling windows)."""
    out = []
    for r in requests:
      ids = self.tok.encode(r.args[0])
      start = self.tok.bos_prefix() or [self.tok.eos_id]  # the document boundary predicts token 0
      window = max(self.scorer.max_len // 2, 1)
      requests_ = [(start + ids[:i], ids[i:i + window]) for i in range(0, len(ids), window)]
      out.append(float(sum(lp.sum() for lp in self.scorer.continuation_logprobs(requests_, desc="rolling"))))
    return out

  def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
    out = []
    for i in range(0, len(requests), GENERATE_BATCH):
      chunk = requests[i:i + GENERATE_BATCH]
      out += self._generate([r.args[0] for r in chunk], [dict(r.args[1]) for r in chunk], i)
    return out

  def _generate(self, contexts: list[str], kwargs: list[dict], offset: int) -> list[str]:
    settings = {(k.get("max_gen_toks", self.max_gen_toks), float(k.get("temperature", 0.0))
                 if k.get("do_sample", False) else 0.0) for k in kwargs}
    if len(settings) > 1:  # one request at a time then: the sampler's settings are static
      return [self._generate([c], [k], offset + j)[0] for j, (c, k) in enumerate(zip(contexts, kwargs))]
    max_new, temperature = settings.pop()
    limit = self.scorer.max_len - max_new
    if limit < 1:
      raise ConfigError(f"harness: max_gen_toks={max_new} leaves no room for a prompt in {self.scorer.max_len} tokens")
    prompts = [((self.tok.bos_prefix() or []) + self.tok.encode(c))[-limit:] or [self.tok.eos_id] for c in contexts]
    width = max(map(len, prompts))
    tokens = np.full((len(prompts), width), self.tok.pad_id, np.int32)
    mask = np.zeros((len(prompts), width), bool)
    for row, p in enumerate(prompts):  # left-padded, as the sampler expects
      tokens[row, width - len(p):], mask[row, width - len(p):] = p, True
    gen = generate(self.scorer.params, jnp.asarray(tokens), jnp.asarray(mask), jax.random.PRNGKey(self.seed + offset),
                   model=Transformer(self.scorer.cfg), max_new_tokens=max_new, temperature=temperature,
                   eos_id=self.tok.eos_id, pad_id=self.tok.pad_id)
    texts = [self.tok.decode(np.asarray(row)[np.asarray(valid)]) for row, valid in zip(gen.tokens, gen.mask)]
    return [_cut(text, k.get("until", [])) for text, k in zip(texts, kwargs)]


def _cut(text: str, until) -> str:
  for stop in [until] if isinstance(until, str) else until:
    if stop and stop in text:
      text = text[:text.index(stop)]
  return text


def run_tasks(scorer: Scorer, tok, tasks: list[str], *, include_path: str = "", limit: int = 0,
              num_fewshot: int = 0, seed: int = 0) -> dict:
  """{task: {metric: value}} of harness tasks (metric names as the harness gives them, e.g.
  "acc,none"); an unknown task or a task file that does not parse is a ConfigError."""
  import lm_eval
  from lm_eval.tasks import TaskManager

  manager = TaskManager(include_path=include_path or None)
  unknown = [t for t in tasks if t not in manager.all_tasks]
  if unknown:
    where = f" (nor in include_path {include_path})" if include_path else ""
    raise ConfigError(f"harness.tasks: unknown task(s) {unknown}{where}; a task file that does not parse is "
                      f"left out by the harness, check its YAML")
  out = lm_eval.simple_evaluate(model=RunLM(scorer, tok, seed=seed), tasks=list(tasks), num_fewshot=num_fewshot,
                                limit=limit or None, task_manager=manager, log_samples=False, random_seed=seed,
                                numpy_random_seed=seed, bootstrap_iters=0)
  return {task: {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and k != "alias"}
          for task, metrics in out["results"].items()}
