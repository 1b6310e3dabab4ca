"""The SentencePiece tokenizer: exact round trips on real dialogues, fixed special ids, piecewise
encoding, reloading, and refusal of models not trained by train_tokenizer."""
import io
import os
import re

import numpy as np
import pytest
import sentencepiece as spm

from rlhf_jax.data.hh_rlhf import catalog
from rlhf_jax.data.hh_rlhf.records import read_comparisons
from rlhf_jax.data.tokenizer import EOC_PIECE, MODEL_FILE, Tokenizer, train_tokenizer

VOCAB = 512
NUM_TRAIN = 150  # of the sample's 400 records: the rest are dialogues the tokenizer never saw


@pytest.fixture(scope="module")
def records():
  return read_comparisons(os.path.join(catalog.SAMPLE_DIR, "harmless-base", "test.jsonl.gz"))[0]


@pytest.fixture(scope="module")
def trained(records, tmp_path_factory):
  out = tmp_path_factory.mktemp("tok")
  return train_tokenizer([r["chosen"] for r in records[:NUM_TRAIN]], VOCAB, str(out)), out


def test_model_file_written(trained):
  tok, out = trained
  assert tok.vocab_size == VOCAB
  assert sorted(os.listdir(out)) == [MODEL_FILE]  # no temporary file left behind
  assert tok.path == os.path.join(str(out), MODEL_FILE)


def test_round_trip_every_sample_dialogue(trained, records):
  tok, _ = trained
  texts = [r[k] for r in records for k in ("chosen", "rejected")]
  unseen = [r["rejected"] for r in records[NUM_TRAIN:]]
  assert len(unseen) == 400 - NUM_TRAIN
  for text in texts:
    ids = tok.encode(text)
    assert all(4 <= i < VOCAB for i in ids)  # no special or unknown ids in ordinary text
    assert tok.decode(ids) == text
  assert tok.encode_batch(texts[:20]) == [tok.encode(t) for t in texts[:20]]


@pytest.mark.parametrize("text", [
    "\n\nHuman: 日本語のテキスト 🙂 — «quotes» ĳ\n\nAssistant:  two  spaces\ttab\n",
    "   leading spaces", "trailing newline\n\n\n", "", " ", "\n", "digits 1234567890 3.14159",
    "\x00 control \x7f chars \u200b zero width", "Ｆｕｌｌｗｉｄｔｈ and ﬁ ligature"])
def test_round_trip_unseen_characters(trained, text):
  # Byte fallback plus the identity normaliser: nothing is mapped to unk or normalised away.
  tok, _ = trained
  ids = tok.encode(text)
  assert tok.unk_id not in ids
  assert tok.decode(ids) == text


def test_split_digits(trained):
  tok, _ = trained
  ids = tok.encode("2024")
  assert len(ids) == 4 and [tok.decode([i]) for i in ids] == ["2", "0", "2", "4"]


def test_special_ids(trained):
  tok, _ = trained
  assert (tok.pad_id, tok.unk_id, tok.eos_id, tok.eoc_id) == (0, 1, 2, 3)
  sp = spm.SentencePieceProcessor(model_file=tok.path)
  assert (sp.pad_id(), sp.unk_id(), sp.eos_id(), sp.bos_id()) == (0, 1, 2, -1)
  assert sp.id_to_piece(3) == EOC_PIECE
  assert tok.encode(EOC_PIECE) == [3]
  assert tok.encode("Hi" + EOC_PIECE) == tok.encode("Hi") + [3]
  # The special pieces are not produced from ordinary text that merely looks like them.
  assert 2 not in tok.encode("</s>") and 0 not in tok.encode("<pad>")


def test_decode_drops_special_ids(trained):
  tok, _ = trained
  ids = tok.encode("\n\nHuman: hello there\n\nAssistant: hi")
  noisy = [0, 3] + ids[:3] + [2, 1, 0] + ids[3:] + [3, 2, 0, 0]
  assert tok.decode(noisy) == tok.decode(ids) == "\n\nHuman: hello there\n\nAssistant: hi"
  assert tok.decode([0, 1, 2, 3]) == ""
  assert tok.decode(iter(ids)) == tok.decode(ids)  # any iterable, numpy ints included
  assert tok.decode(np.array(ids, np.int32)) == tok.decode(ids)


def test_piecewise_encoding_concatenates(trained, records):
  # No dummy prefix: the pieces of a text, encoded separately, decode to the whole text.
  tok, _ = trained
  for r in records[::7]:
    text = r["chosen"]
    cuts = [0] + [i for m in re.finditer(r"\n\n(Human|Assistant):", text) for i in m.span()] + [len(text)]
    pieces = [text[a:b] for a, b in zip(cuts, cuts[1:])]  # markers and the turn texts between them
    assert "".join(pieces) == text and len(pieces) >= 4
    ids = [i for p in pieces for i in tok.encode(p)]
    assert tok.decode(ids) == text
    # Each piece's own ids decode to exactly that piece (a leading space included).
    assert [tok.decode(tok.encode(p)) for p in pieces] == pieces
  # Cutting at arbitrary character positions too.
  text = records[3]["chosen"]
  for cut in (1, 2, 9, 10, 11, 17, len(text) // 2):
    assert tok.decode(tok.encode(text[:cut]) + tok.encode(text[cut:])) == text


def test_reload_from_path(trained, records):
  tok, out = trained
  again = Tokenizer(os.path.join(str(out), MODEL_FILE))
  assert again.vocab_size == tok.vocab_size
  texts = [r["rejected"] for r in records[::5]]
  assert again.encode_batch(texts) == tok.encode_batch(texts)
  assert again.decode(again.encode(texts[0])) == texts[0]


def test_training_is_deterministic(records, tmp_path):
  texts = [r["chosen"] for r in records[:NUM_TRAIN]]
  a = train_tokenizer(texts, VOCAB, str(tmp_path / "a"))
  b = train_tokenizer(texts, VOCAB, str(tmp_path / "b"))
  with open(a.path, "rb") as fa, open(b.path, "rb") as fb:
    assert fa.read() == fb.read()


def _spm_model(path, **kwargs):
  model = io.BytesIO()
  sentences = ["hello world", "the quick brown fox jumps over the lazy dog", "Human: hi Assistant: yo"] * 20
  spm.SentencePieceTrainer.train(sentence_iterator=iter(sentences), model_writer=model, vocab_size=60,
                                 minloglevel=2, hard_vocab_limit=False, **kwargs)
  path.write_bytes(model.getvalue())
  return str(path)


def test_foreign_models_rejected(tmp_path):
  # SentencePiece's defaults: unk=0, bos=1, eos=2, no pad, no end-of-context piece.
  default = _spm_model(tmp_path / "default.model")
  assert spm.SentencePieceProcessor(model_file=default).pad_id() == -1
  with pytest.raises(ValueError, match="not trained by rlhf_jax.data.tokenizer.train_tokenizer"):
    Tokenizer(default)
  # Right pad/unk/eos ids but no end-of-context piece at id 3.
  no_eoc = _spm_model(tmp_path / "no_eoc.model", pad_id=0, unk_id=1, eos_id=2, bos_id=-1)
  with pytest.raises(ValueError, match=str(tmp_path / "no_eoc.model")):
    Tokenizer(no_eoc)


def test_too_few_texts_for_the_vocabulary_is_a_config_error(tmp_path):
  from rlhf_jax.errors import ConfigError
  with pytest.raises(ConfigError, match=r"model.vocab_size=1024 is more than .*at most \d+"):
    train_tokenizer(["\n\nHuman: hi\n\nAssistant: hello"] * 5, 1024, str(tmp_path))
