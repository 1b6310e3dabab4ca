"""The one place evaluations call the model: log-probabilities of continuations, and activations.

A request is (context ids, continuation ids); its score is the log-probability of each
continuation token given everything before it, as lm-evaluation-harness scores multiple-choice
answers. Requests are sorted by length and padded to a few bucket lengths (powers of two) and
one fixed batch size, so a whole evaluation compiles once per bucket, not once per example.
Rows are right-padded: with a causal mask, padding after a sequence cannot change its scores.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from rlhf_jax.model.config import ModelConfig
from rlhf_jax.model.transformer import Transformer
from rlhf_jax.objectives.lm import token_log_probs
from rlhf_jax.training import sharding as shd
from rlhf_jax.training.metrics import progress

Request = tuple[Sequence[int], Sequence[int]]


def bucket_length(n: int, min_len: int, max_len: int) -> int:
  """Smallest power of two >= n (and >= min_len), capped at max_len."""
  return min(max(min_len, 1 << max(n - 1, 0).bit_length()), max_len)


def encode_requests(tok, contexts: Sequence[str], continuations: Sequence[str]) -> list[tuple[list[int], list[int]]]:
  """Token requests for text pairs, encoded separately so that the continuation's tokens are its
  own. Trailing whitespace of a context moves to its continuation (the harness's convention: "a"
  + " b", not "a " + "b"). A context opens with BOS where the model expects one; an empty one
  becomes BOS, or else EOS, the document boundary the LM trained on, so that the first
  continuation token is scored too."""
  out = []
  for ctx, cont in zip(contexts, continuations, strict=True):
    stripped = ctx.rstrip()
    cont = ctx[len(stripped):] + cont
    ctx_ids = tok.encode_sequence(stripped) if stripped else tok.bos_prefix()
    out.append((ctx_ids or [tok.eos_id], tok.encode(cont)))
  return out


class Scorer:
  """A model's params on a mesh, with jitted scoring. params: plain (unboxed) arrays, placed on
  `mesh` already (as `FrozenModel` loads them) or on one device; mesh None = every device, data
  parallel."""

  def __init__(self, params, cfg: ModelConfig, mesh: Optional[Mesh] = None, *, batch_size: int = 16,
               min_len: int = 16, max_len: int = 0, progress: bool = False):
    self.params, self.cfg = params, cfg
    self.mesh = mesh if mesh is not None else shd.make_mesh((-1, 1, 1))
    shards = int(np.prod([self.mesh.shape[a] for a in ("data", "fsdp")]))
    self.batch_size = -(-batch_size // shards) * shards  # the batch axis must split evenly
    self.min_len, self.max_len = min_len, max_len or cfg.max_seq_len
    self.progress = progress
    self._batch = shd.batch_sharding(self.mesh)
    out = shd.replicated(self.mesh)  # every host reads the scores
    self._logprobs = shd.under_mesh(jax.jit(functools.partial(_logprobs, Transformer(cfg)),
                                            out_shardings=out), self.mesh)
    self._activations = {}
    self._greedy = None  # compiled on first use (lm-evaluation-harness's is_greedy)

  @classmethod
  def from_run(cls, run_dir: str, mesh: Optional[Mesh] = None, **kwargs) -> "Scorer":
    """The model of a trained run directory (LM, SFT, PPO policy or PM)."""
    from rlhf_jax.training.saved_runs import FrozenModel
    mesh = mesh if mesh is not None else shd.make_mesh((-1, 1, 1))
    frozen = FrozenModel(run_dir, mesh)
    return cls(frozen.params, frozen.model.cfg, mesh, **kwargs)

  # --- batching ---------------------------------------------------------------------------------

  def _batches(self, seqs: list[list[int]], desc: str):
    """Yields (indices, tokens [B, L], mask [B, L]) over seqs sorted by length; B fixed, L a bucket."""
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    chunks = [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]
    if self.progress and chunks:  # a bar on a terminal only: in a log file it is a line per refresh
      chunks = progress(chunks, desc=desc, leave=False)
    for idx in chunks:
      length = bucket_length(max(len(seqs[i]) for i in idx), self.min_len, self.max_len)
      tokens = np.zeros((self.batch_size, length), np.int32)
      mask = np.zeros((self.batch_size, length), bool)
      for row, i in enumerate(idx):
        tokens[row, :len(seqs[i])] = seqs[i]
        mask[row, :len(seqs[i])] = True
      mask[len(idx):, 0] = True  # filler rows: one visible token keeps softmax rows finite
      yield idx, *shd.shard_batch((tokens, mask), self.mesh)

  def _fit(self, request: Request, index: int) -> tuple[list[int], int]:
    """(sequence, number of context tokens), the context cut from the left to fit max_len."""
    ctx, cont = list(request[0]), list(request[1])
    if not ctx or not cont:
      raise ValueError(f"request {index}: context and continuation must each have a token "
                       f"(got {len(ctx)} and {len(cont)})")
    if len(cont) >= self.max_len:
      raise ValueError(f"request {index}: continuation of {len(cont)} tokens does not fit max_len={self.max_len}")
    ctx = ctx[max(0, len(ctx) + len(cont) - self.max_len):]
    return ctx + cont, len(ctx)

  # --- scores -----------------------------------------------------------------------------------

  def _per_continuation(self, program, requests: Sequence[Request], desc: str) -> list[tuple[np.ndarray, ...]]:
    """program(params, tokens, mask) -> arrays [B, L-1] over the predicted positions; for each
    request, those arrays at its continuation tokens (token t is predicted at position t - 1)."""
    fitted = [self._fit(r, i) for i, r in enumerate(requests)]
    seqs = [s for s, _ in fitted]
    out: list = [None] * len(seqs)
    for idx, tokens, mask in self._batches(seqs, desc):
      arrays = [shd.to_host(x) for x in program(self.params, tokens, mask)]
      for row, i in enumerate(idx):
        span = slice(fitted[i][1] - 1, len(seqs[i]) - 1)
        out[i] = tuple(x[row, span] for x in arrays)
    return out

  def continuation_logprobs(self, requests: Sequence[Request], desc: str = "scoring") -> list[np.ndarray]:
    """log p(continuation token | everything before it), one float64 array per request."""
    return [logp.astype(np.float64) for logp, in self._per_continuation(self._logprobs, requests, desc)]

  def continuation_scores(self, requests: Sequence[Request], desc: str = "scoring") -> list[tuple[np.ndarray, np.ndarray]]:
    """(log-probs, is-argmax) of each continuation token, per request: continuation_logprobs
    with whether each token was the model's most likely one (another program, compiled once)."""
    if self._greedy is None:
      self._greedy = shd.under_mesh(jax.jit(functools.partial(_logprobs_and_greedy, Transformer(self.cfg)),
                                            out_shardings=shd.replicated(self.mesh)), self.mesh)
    return [(logp.astype(np.float64), greedy)
            for logp, greedy in self._per_continuation(self._greedy, requests, desc)]

  def continuation_sums(self, requests: Sequence[Request], desc: str = "scoring") -> np.ndarray:
    """Sum of the continuation's token log-probs per request -> [n] float64."""
    return np.array([lp.sum() for lp in self.continuation_logprobs(requests, desc)], np.float64)

  def mean_activations(self, token_lists: Sequence[Sequence[int]], layer: int = -1,
                       desc: str = "activations") -> np.ndarray:
    """Mean over each sequence's tokens of the residual stream after `layer` blocks (1 ..
    num_layers; -1 = the last), passed through the model's final RMSNorm -> [n, d_model] float64."""
    k = self.cfg.num_layers if layer == -1 else layer
    if not 1 <= k <= self.cfg.num_layers:
      raise ValueError(f"layer={layer}: expected 1 .. {self.cfg.num_layers} or -1")
    if k not in self._activations:
      fn = functools.partial(_mean_hidden, Transformer(dataclasses.replace(self.cfg, num_layers=k)), k)
      self._activations[k] = shd.under_mesh(jax.jit(fn, out_shardings=shd.replicated(self.mesh)), self.mesh)
    seqs = [list(s)[-self.max_len:] for s in token_lists]
    if any(not s for s in seqs):
      raise ValueError("mean_activations: every sequence needs at least one token")
    out = np.zeros((len(seqs), self.cfg.d_model), np.float64)
    for idx, tokens, mask in self._batches(seqs, desc):
      acts = shd.to_host(self._activations[k](self.params, tokens, mask)).astype(np.float64)
      out[idx] = acts[:len(idx)]
    return out


def _logprobs(model: Transformer, params, tokens, mask):
  out = model.apply({"params": params}, tokens, attention_mask=mask)
  return (token_log_probs(out.logits, tokens),)  # [batch, seq - 1]


def _logprobs_and_greedy(model: Transformer, params, tokens, mask):
  logits = model.apply({"params": params}, tokens, attention_mask=mask).logits
  greedy = jnp.argmax(logits[:, :-1], axis=-1) == tokens[:, 1:]
  return token_log_probs(logits, tokens), greedy


def _first_layers(params, k: int, scanned: bool):
  """params of the first k blocks (with the embedding, final norm and heads)."""
  if scanned:
    return {**params, "layers": jax.tree.map(lambda x: x[:k], params["layers"])}
  return {name: p for name, p in params.items()
          if not name.startswith("layer_") or int(name.split("_")[1]) < k}


def _mean_hidden(model: Transformer, k: int, params, tokens, mask):
  params = _first_layers(params, k, model.cfg.scan_layers)
  hidden = model.apply({"params": params}, tokens, attention_mask=mask, lm_head=False).hidden
  w = mask.astype(jnp.float32)[..., None]
  return (hidden.astype(jnp.float32) * w).sum(1) / jnp.maximum(w.sum(1), 1.0)  # [batch, d_model]
