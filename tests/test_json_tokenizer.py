"""A pretrained model's tokenizer.json behind our tokenizer interface: the ids of real dialogues,
encoded turn by turn as the data pipeline does, equal the tokenizers library's encoding of the
whole text; decoding round-trips; special ids, BOS and the chat template come from the model's
files as the import reads them; a run directory holds one kind of tokenizer at a time."""
import json
import os

import pytest
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from rlhf_jax.data.batching import encode_dialogue
from rlhf_jax.data.hh_rlhf import catalog
from rlhf_jax.data.hh_rlhf.records import read_comparisons
from rlhf_jax.data.json_tokenizer import SPECIALS_FILE, JsonTokenizer
from rlhf_jax.data.tokenizer import MODEL_FILE, load_tokenizer, same_tokenizer, train_tokenizer
from rlhf_jax.errors import ConfigError
from rlhf_jax.hf import tokens as hf_tokens

SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|pad|>"]


@pytest.fixture(scope="module")
def dialogues():
  records = read_comparisons(os.path.join(catalog.SAMPLE_DIR, "harmless-base", "test.jsonl.gz"))[0]
  return [r[k] for r in records for k in ("chosen", "rejected")]


@pytest.fixture(scope="module")
def library(dialogues, tmp_path_factory):
  """A byte-level BPE as Llama 3 / Qwen / SmolLM2 ship it (GPT-2 pre-tokenizer, no unknown token),
  trained on the first 100 dialogues; Llama 3's post-processor puts BOS before a single text."""
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator(dialogues[:100], trainers.BpeTrainer(
      vocab_size=600, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
      show_progress=False))
  tok.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                                     special_tokens=[("<|begin_of_text|>", 0)])
  directory = tmp_path_factory.mktemp("llama3_like")
  tok.save(str(directory / "tokenizer.json"))
  return tok, directory


def _model_dir(library, tmp_path, config: dict, tokenizer_config: dict):
  tok, source = library
  tmp_path.mkdir(parents=True, exist_ok=True)
  (tmp_path / "tokenizer.json").write_bytes((source / "tokenizer.json").read_bytes())
  (tmp_path / "config.json").write_text(json.dumps(config))
  (tmp_path / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
  return tmp_path


def _imported(library, tmp_path, config=None, tokenizer_config=None):
  """The tokenizer as the import leaves it in a run directory: tokenizer.json + its special ids."""
  d = _model_dir(library, tmp_path, config or {"bos_token_id": 0, "eos_token_id": 1},
                 tokenizer_config or {"eos_token": "<|end_of_text|>"})
  ids = hf_tokens.special_ids(str(d), str(d / "tokenizer.json"))
  (d / SPECIALS_FILE).write_text(json.dumps(ids))
  return load_tokenizer(str(d)), ids


def test_turn_by_turn_ids_equal_the_librarys_whole_text_ids_and_decode_back(library, dialogues, tmp_path):
  ours, _ = _imported(library, tmp_path)
  lib, _ = library
  assert isinstance(ours, JsonTokenizer) and ours.add_bos and ours.bos_id == 0 and ours.eos_id == 1
  checked = dialogues[100:400]  # a few hundred the tokenizer never saw
  for text in checked:
    whole = lib.encode(text).ids  # BOS by the post-processor, as the model was pretrained
    ex = encode_dialogue(ours, text, assistant_only=False)
    assert ex.tokens[:-1] == whole, text[:80]
    assert ex.tokens[-1] == ours.eos_id and ours.decode(ex.tokens) == text
  assert ours.encode_batch(checked[:5]) == [lib.encode(t, add_special_tokens=False).ids for t in checked[:5]]


def test_special_ids_from_the_model_files(library, tmp_path):
  _, source = library
  # Llama 3.1 instruct: a list of EOS ids; the tokenizer config's EOS is the one kept.
  ids = hf_tokens.special_ids(str(_model_dir(library, tmp_path / "a", {"bos_token_id": 0, "eos_token_id": [2, 1]},
                                             {"eos_token": "<|end_of_text|>"})), str(source / "tokenizer.json"))
  assert (ids["bos_id"], ids["eos_id"], ids["pad_id"], ids["unk_id"], ids["eoc_id"], ids["add_bos"]) == (0, 1, 1, 1, 1,
                                                                                                        True)
  # Qwen: no BOS in config.json, tokens named in the tokenizer config, explicit add_bos_token False.
  ids = hf_tokens.special_ids(str(_model_dir(library, tmp_path / "b", {}, {
      "eos_token": "<|end_of_text|>", "pad_token": {"content": "<|pad|>"}, "bos_token": None,
      "add_bos_token": False})), str(source / "tokenizer.json"))
  assert (ids["bos_id"], ids["eos_id"], ids["pad_id"], ids["add_bos"]) == (None, 1, 2, False)
  with pytest.raises(ConfigError, match=r"config.json: eos_token_id=5000 is not an id of .*tokenizer.json"):
    hf_tokens.special_ids(str(_model_dir(library, tmp_path / "c", {"eos_token_id": 5000}, {})),
                          str(source / "tokenizer.json"))
  with pytest.raises(ConfigError, match="no eos_token_id"):
    hf_tokens.special_ids(str(_model_dir(library, tmp_path / "d", {}, {})), str(source / "tokenizer.json"))


def test_chat_template_from_the_tokenizer_config_or_its_own_file(library, tmp_path):
  d = _model_dir(library, tmp_path, {}, {"chat_template": "{{ messages }}"})
  assert hf_tokens.chat_template(str(d)) == "{{ messages }}"
  (d / "chat_template.jinja").write_text("{% for m in messages %}{{ m }}{% endfor %}")
  assert hf_tokens.chat_template(str(d)) == "{% for m in messages %}{{ m }}{% endfor %}"


def test_without_its_ids_or_with_bad_ones_a_tokenizer_json_is_refused(library, tmp_path):
  _, source = library
  (tmp_path / "tokenizer.json").write_bytes((source / "tokenizer.json").read_bytes())
  with pytest.raises(ConfigError, match=f"no {SPECIALS_FILE} beside it"):
    load_tokenizer(str(tmp_path))
  (tmp_path / SPECIALS_FILE).write_text(json.dumps({"pad_id": 2, "unk_id": 2, "eos_id": 9999, "eoc_id": 1}))
  with pytest.raises(ConfigError, match="eos_id=9999 is not a token id"):
    load_tokenizer(str(tmp_path))
  (tmp_path / "tokenizer.json").write_text("{not json")
  with pytest.raises(ConfigError, match="not a tokenizer.json the tokenizers library reads"):
    load_tokenizer(str(tmp_path))


def test_a_run_directory_holds_one_kind_of_tokenizer(library, dialogues, tmp_path):
  ours, _ = _imported(library, tmp_path / "model")
  run = tmp_path / "run"
  run.mkdir()
  spm_tok = train_tokenizer(dialogues[:50], 512, str(run))  # an earlier run's own tokenizer
  ours.copy_to(str(run))
  assert not (run / MODEL_FILE).exists() and isinstance(load_tokenizer(str(run)), JsonTokenizer)
  assert same_tokenizer(str(tmp_path / "model"), str(run)).encode("Hello") == ours.encode("Hello")
  spm_tok2 = train_tokenizer(dialogues[:50], 512, str(tmp_path / "own"))
  spm_tok2.copy_to(str(run))
  assert not (run / "tokenizer.json").exists() and load_tokenizer(str(run)).encode("Hi") == spm_tok.encode("Hi")
  with pytest.raises(ConfigError, match="differs"):
    same_tokenizer(str(tmp_path / "model"), str(run))


def test_prompts_and_scored_contexts_open_with_bos_where_the_model_expects_one(library, tmp_path):
  import ml_collections

  from rlhf_jax.data.prompts import prompt_batcher
  from rlhf_jax.evals.loglik import encode_requests
  ours, _ = _imported(library, tmp_path)
  config = ml_collections.ConfigDict({"sampling": {"prompt_len": 16}, "train": {"seed": 0}})
  batch = prompt_batcher(config, ours, ["\n\nHuman: hi\n\nAssistant:", "\n\nHuman: a longer question here?"], 2)
  for row, mask in zip(batch.batch_at(0)["tokens"], batch.batch_at(0)["attention_mask"]):
    assert row[mask][0] == ours.bos_id and list(row[mask][1:]) == ours.encode(ours.decode(row[mask]))
  (ctx, cont), (empty_ctx, _) = encode_requests(ours, ["The cat", ""], [" sat", "Hi"])
  assert ctx[0] == ours.bos_id and ctx[1:] == ours.encode("The cat") and cont == ours.encode(" sat")
  assert empty_ctx == [ours.bos_id]
