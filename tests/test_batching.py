"""From dialogues to batches: loss masks that select exactly the Assistant text, truncation that keeps
the end, padding, packing, and a seeded example order that is a pure function of position."""
import os
import re

import numpy as np
import pytest

from rlhf_jax.data.batching import Batcher, Encoded, encode_dialogue, fit_to_length, pack, pad_batch
from rlhf_jax.data.hh_rlhf import catalog
from rlhf_jax.data.hh_rlhf.records import read_comparisons
from rlhf_jax.data.tokenizer import train_tokenizer

_MARKER = re.compile(r"\n\n(Human|Assistant):")


@pytest.fixture(scope="module")
def records():
  return read_comparisons(os.path.join(catalog.SAMPLE_DIR, "harmless-base", "test.jsonl.gz"))[0]


@pytest.fixture(scope="module")
def tok(records, tmp_path_factory):
  return train_tokenizer([r["chosen"] for r in records[:150]], 512, str(tmp_path_factory.mktemp("tok")))


def _spans(dialogue):
  """[(role, raw text after the marker up to the next marker)], from the raw string."""
  ms = list(_MARKER.finditer(dialogue))
  ends = [m.start() for m in ms[1:]] + [len(dialogue)]
  return [(m.group(1), dialogue[m.end():end]) for m, end in zip(ms, ends)]


def _dialogues(records):
  return [r[k] for r in records for k in ("chosen", "rejected")]


# --- encode_dialogue ------------------------------------------------------------------------------

def _check_assistant_only(tok, dialogue):
  enc = encode_dialogue(tok, dialogue, assistant_only=True)
  assert len(enc.tokens) == len(enc.loss_mask)
  assert enc.tokens[-1] == tok.eos_id and enc.loss_mask[-1] is True
  assert tok.eos_id not in enc.tokens[:-1]
  spans = _spans(dialogue)
  targets = [t for t, m in zip(enc.tokens[:-1], enc.loss_mask[:-1]) if m]
  assert tok.decode(targets) == "".join(text for role, text in spans if role == "Assistant")
  # The rest is the markers and the Human turns.
  context = [t for t, m in zip(enc.tokens[:-1], enc.loss_mask[:-1]) if not m]
  assert tok.decode(context) == "".join(
      f"\n\n{role}:" + (text if role == "Human" else "") for role, text in spans)
  return enc


def test_assistant_only_masks_exactly_the_assistant_text(tok):
  d = ("\n\nHuman: What's 2+2?\n\nAssistant: It is 4.\n\nHuman: Sure?\nReally?"
       "\n\nAssistant: Yes.\nQuite sure.")
  enc = _check_assistant_only(tok, d)
  targets = [t for t, m in zip(enc.tokens, enc.loss_mask) if m]
  assert tok.decode(targets) == " It is 4. Yes.\nQuite sure."
  assert targets[-1] == tok.eos_id
  # Targets come in two contiguous runs (one per Assistant turn) plus EOS right after the last.
  runs = np.flatnonzero(np.diff(np.array([False] + enc.loss_mask + [False], int)))
  assert len(runs) == 4 and runs[-1] == len(enc.tokens)


def test_assistant_only_on_real_dialogues(tok, records):
  checked = 0
  for d in _dialogues(records):
    if any(text == " " for _, text in _spans(d)):
      continue  # a turn that is only its space: see test_encode_dialogue_is_lossless
    _check_assistant_only(tok, d)
    checked += 1
  assert checked >= 790


def test_all_tokens_are_targets_without_assistant_only(tok, records):
  for d in _dialogues(records)[:100]:
    full = encode_dialogue(tok, d, assistant_only=False)
    sft = encode_dialogue(tok, d, assistant_only=True)
    assert full.tokens == sft.tokens
    assert all(m is True for m in full.loss_mask) and len(full.loss_mask) == len(full.tokens)


def test_encode_dialogue_is_lossless(tok, records):
  hand = "\n\nHuman: Say nothing.\n\nAssistant: "
  assert tok.decode(encode_dialogue(tok, hand, assistant_only=True).tokens) == hand
  for d in _dialogues(records):
    assert tok.decode(encode_dialogue(tok, d, assistant_only=True).tokens) == d


def test_encode_dialogue_is_lossless_for_ordinary_dialogues(tok, records):
  checked = 0
  for d in _dialogues(records):
    if not d.endswith("\n\nAssistant: "):
      assert tok.decode(encode_dialogue(tok, d, assistant_only=False).tokens) == d
      checked += 1
  assert checked >= 795


def test_encode_dialogue_rejects_text_before_first_marker(tok):
  with pytest.raises(ValueError):
    encode_dialogue(tok, "preamble\n\nHuman: hi\n\nAssistant: yo", assistant_only=True)


# --- fit_to_length, pad_batch, pack ---------------------------------------------------------------

def test_fit_to_length_keeps_the_end(tok, records):
  d = max(_dialogues(records), key=len)
  enc = encode_dialogue(tok, d, assistant_only=True)
  final = _spans(d)[-1][1]
  n = len(tok.encode(final)) + 10
  assert len(enc.tokens) > n
  fit = fit_to_length(enc, n)
  assert fit.tokens == enc.tokens[-n:] and fit.loss_mask == enc.loss_mask[-n:]
  assert fit.tokens[-1] == tok.eos_id and fit.loss_mask[-1]
  assert tok.decode(fit.tokens).endswith(final) and d.endswith(tok.decode(fit.tokens[-n + 10:]))
  short = Encoded([5, 6, 2], [False, True, True])
  assert fit_to_length(short, 3) == short and fit_to_length(short, 100) == short
  assert fit_to_length(short, 2) == Encoded([6, 2], [True, True])


def test_pad_batch():
  examples = [Encoded([5, 6, 7, 2], [False, True, True, True]), Encoded([9, 2], [True, True]),
              Encoded([8] * 6, [False] * 6)]
  b = pad_batch(examples, seq_len=6, pad_id=0)
  assert sorted(b) == ["attention_mask", "loss_mask", "tokens"]
  assert b["tokens"].dtype == np.int32 and b["loss_mask"].dtype == np.float32
  assert b["attention_mask"].dtype == np.bool_
  assert all(v.shape == (3, 6) for v in b.values())
  np.testing.assert_array_equal(b["tokens"], [[5, 6, 7, 2, 0, 0], [9, 2, 0, 0, 0, 0], [8] * 6])
  np.testing.assert_array_equal(b["loss_mask"], [[0, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0], [0] * 6])
  np.testing.assert_array_equal(b["attention_mask"], [[1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0], [1] * 6])
  # A different pad id fills the padding.
  assert (pad_batch(examples[1:2], 4, pad_id=7)["tokens"] == [[9, 2, 7, 7]]).all()
  with pytest.raises(ValueError, match="example 1 has 7 tokens > seq_len 6"):
    pad_batch([examples[0], Encoded([1] * 7, [True] * 7)], seq_len=6, pad_id=0)


def test_pack(tok, records):
  encoded = [encode_dialogue(tok, d, assistant_only=True) for d in _dialogues(records[:30])]
  stream = [t for e in encoded for t in e.tokens]
  mask = [m for e in encoded for m in e.loss_mask]
  for seq_len in (7, 64, 256):
    rows = pack(encoded, seq_len)
    assert len(rows) == len(stream) // seq_len
    assert all(len(r.tokens) == seq_len == len(r.loss_mask) for r in rows)
    assert [t for r in rows for t in r.tokens] == stream[:len(rows) * seq_len]
    assert [m for r in rows for m in r.loss_mask] == mask[:len(rows) * seq_len]
  # Exact fit keeps everything; a stream shorter than a row gives nothing.
  exact = [Encoded([5, 2], [True, True]), Encoded([6, 7, 2], [False, True, True]), Encoded([8], [True])]
  assert pack(exact, 3) == [Encoded([5, 2, 6], [True, True, False]), Encoded([7, 2, 8], [True, True, True])]
  assert pack(exact, 7) == []


# --- Batcher --------------------------------------------------------------------------------------

N = 23  # examples; not a multiple of the batch size, so batches straddle epochs
B = 5
SEQ = 8


def _examples(n=N):
  # Example i: token 100 + i repeated (1 + i % 6) times, then EOS; every 7th has 9 tokens of
  # leading context (token 50) in front, which fit_to_length must cut.
  out = []
  for i in range(n):
    context = 9 if i % 7 == 3 else 0
    out.append(Encoded([50] * context + [100 + i] * (1 + i % 6) + [2],
                       [False] * context + [i % 2 == 0] * (1 + i % 6) + [True]))
  return out


def _ids(batch):
  """Example id of each row, read from its tokens (-1 for an all-padding row)."""
  ids = []
  for row in batch["tokens"]:
    real = [t for t in row if t >= 100]
    assert len(set(real)) <= 1
    ids.append(int(real[0]) - 100 if real else -1)
  return ids


def _batcher(seed=0, examples=None):
  return Batcher(examples or _examples(), batch_size=B, seq_len=SEQ, seed=seed, pad_id=0)


def _assert_batches_equal(a, b):
  assert sorted(a) == sorted(b)
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])


def test_batch_at_is_a_pure_function_of_position():
  b = _batcher()
  first = {p: b.batch_at(p) for p in (0, 5, 20, 23, 46, 71)}
  for p in (71, 0, 46, 5, 23, 20):  # revisited out of order, across epochs
    _assert_batches_equal(b.batch_at(p), first[p])
  fresh = _batcher()
  for p in (46, 0, 20):
    _assert_batches_equal(fresh.batch_at(p), first[p])
  # Row r of the batch at p is the example at position p + r (resuming mid-batch is exact).
  for p in (0, 3, 21, 44):
    batch = b.batch_at(p)
    for r in range(B):
      one = b.batch_at(p + r)
      for k in batch:
        np.testing.assert_array_equal(batch[k][r], one[k][0])


def test_positions_cover_each_example_once_per_epoch():
  b = _batcher()
  epochs = 4
  order = []
  for p in range(0, epochs * N + B, B):
    order += _ids(b.batch_at(p))
  perms = [order[e * N:(e + 1) * N] for e in range(epochs)]
  for perm in perms:
    assert sorted(perm) == list(range(N))
  assert perms[0] != list(range(N))  # shuffled
  assert len({tuple(p) for p in perms}) == epochs  # a new order each epoch


def test_rows_hold_the_fitted_examples():
  examples = _examples()
  b = _batcher(examples=examples)
  batch = b.batch_at(0)
  for r, i in enumerate(_ids(batch)):
    fit = fit_to_length(examples[i], SEQ)
    n = len(fit.tokens)
    assert n == min(SEQ, len(examples[i].tokens))
    assert batch["tokens"][r, :n].tolist() == fit.tokens and (batch["tokens"][r, n:] == 0).all()
    assert batch["loss_mask"][r, :n].tolist() == [float(m) for m in fit.loss_mask]
    assert batch["attention_mask"][r].tolist() == [True] * n + [False] * (SEQ - n)


def test_different_seeds_give_different_orders():
  orders = []
  for seed in (0, 1, 2):
    b = _batcher(seed)
    order = [i for p in range(0, N, B) for i in _ids(b.batch_at(p))][:N]
    assert sorted(order) == list(range(N))
    orders.append(order)
  assert orders[0] != orders[1] != orders[2] != orders[0]


def test_in_order_covers_every_example_once():
  examples = _examples()
  b = _batcher(examples=examples)
  batches = b.in_order()
  assert len(batches) == -(-N // B)
  ids = [i for batch in batches for i in _ids(batch)]
  assert ids[:N] == list(range(N))
  assert ids[N:] == [-1] * (len(batches) * B - N)
  assert [int(batch["num_valid"]) for batch in batches] == [B] * (N // B) + [N % B]
  last = batches[-1]
  for k in ("tokens", "loss_mask", "attention_mask"):
    assert last[k].shape == (B, SEQ), k
  pad_rows = slice(N % B, B)
  assert (last["tokens"][pad_rows] == 0).all()
  assert (last["loss_mask"][pad_rows] == 0).all()
  # Padding rows carry no loss weight (lm.py weighs by loss_mask * attention_mask).
  assert (last["loss_mask"][pad_rows] * last["attention_mask"][pad_rows] == 0).all()
  # Real rows of the eval batches are those examples, fitted and padded.
  expected = pad_batch([fit_to_length(e, SEQ) for e in examples[B:2 * B]], SEQ, 0)
  _assert_batches_equal({k: batches[1][k] for k in expected}, expected)


def test_batcher_without_examples_fails_at_once():
  # Not at the first batch_at, as a ZeroDivisionError from the epoch arithmetic.
  with pytest.raises(ValueError, match="Batcher: no examples to batch"):
    Batcher([], batch_size=B, seq_len=SEQ, seed=0, pad_id=0)
