"""hh-rlhf dialogues in a model's chat template (data.chat_template): ids against the tokenizers
library's encoding of the hand-written ChatML text, targets on the assistant's words only, one
end of turn, prompts ending at the assistant's header, DPO's shared prefix, and refusals."""
import json
import os
import shutil

import ml_collections
import pytest
import tokenizers

from rlhf_jax.data.batching import encode_dialogue
from rlhf_jax.data.chat import ChatTokenizer, with_chat_format
from rlhf_jax.data.json_tokenizer import CHAT_TEMPLATE_FILE, SPECIALS_FILE
from rlhf_jax.data.pm_data import encode_pair
from rlhf_jax.data.tokenizer import load_tokenizer
from rlhf_jax.errors import ConfigError

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "hf", "smollm2")  # ChatML, as SmolLM2 ships it
DIALOGUE = "\n\nHuman: Is the sky blue?\n\nAssistant: Yes, mostly.\n\nHuman: Why?\n\nAssistant: Scattering."
CHATML = ("<|im_start|>user\nIs the sky blue?<|im_end|>\n<|im_start|>assistant\nYes, mostly.<|im_end|>\n"
          "<|im_start|>user\nWhy?<|im_end|>\n<|im_start|>assistant\nScattering.<|im_end|>\n")
ON = ml_collections.ConfigDict({"data": {"chat_template": True}})


def _tokenizer(tmp_path, eos_token="<|im_end|>", template=None):
  """The fixture's tokenizer.json with its ids as an import writes them; EOS the end of turn, as
  in SmolLM2-Instruct, unless told otherwise."""
  d = tmp_path / "tok"
  d.mkdir()
  for name in ("tokenizer.json", CHAT_TEMPLATE_FILE):
    shutil.copyfile(os.path.join(FIXTURE, name), d / name)
  if template is not None:
    (d / CHAT_TEMPLATE_FILE).write_text(template)
  lib = tokenizers.Tokenizer.from_file(str(d / "tokenizer.json"))
  eos = lib.token_to_id(eos_token)
  (d / SPECIALS_FILE).write_text(json.dumps({"pad_id": eos, "unk_id": eos, "eos_id": eos, "eoc_id": eos,
                                             "bos_id": lib.token_to_id("<|endoftext|>"), "add_bos": False}))
  return with_chat_format(load_tokenizer(str(d)), ON), lib


def test_a_dialogue_is_the_models_chat_text_with_one_end_of_turn_and_targets_on_the_answers(tmp_path):
  tok, lib = _tokenizer(tmp_path)
  whole = lib.encode(CHATML, add_special_tokens=False).ids
  ex = encode_dialogue(tok, DIALOGUE, assistant_only=True)
  assert ex.tokens == whole[:-1]  # the closing "\n" after the last <|im_end|> (= EOS) is dropped
  assert ex.tokens[-1] == tok.eos_id and ex.tokens.count(tok.eos_id) == 4
  targets = [t for t, m in zip(ex.tokens, ex.loss_mask) if m]
  assert lib.decode(targets, skip_special_tokens=False) == "Yes, mostly.<|im_end|>\nScattering.<|im_end|>"
  assert all(encode_dialogue(tok, DIALOGUE, assistant_only=False).loss_mask)


def test_eos_is_appended_when_the_templates_end_of_turn_is_not_eos(tmp_path):
  tok, lib = _tokenizer(tmp_path, eos_token="<|endoftext|>")  # a base model's EOS
  ex = encode_dialogue(tok, DIALOGUE, assistant_only=True)
  assert ex.tokens == lib.encode(CHATML, add_special_tokens=False).ids + [tok.eos_id] and ex.loss_mask[-1]


def test_a_prompt_ends_with_the_assistants_header(tmp_path):
  tok, lib = _tokenizer(tmp_path)
  expected = "<|im_start|>user\nIs the sky blue?<|im_end|>\n<|im_start|>assistant\n"
  assert tok.encode_prompt("\n\nHuman: Is the sky blue?\n\nAssistant:") == lib.encode(expected).ids
  assert tok.encode_prompt("\n\nHuman: Is the sky blue?") == lib.encode(expected).ids  # a prompts-file prompt


def test_dpo_pairs_share_the_rendered_prompt_and_score_only_the_responses(tmp_path):
  tok, lib = _tokenizer(tmp_path)
  record = {"prompt": "\n\nHuman: Why?\n\nAssistant:", "chosen_response": " Scattering.",
            "rejected_response": " No idea."}
  chosen, rejected = encode_pair(tok, record)
  prompt = lib.encode("<|im_start|>user\nWhy?<|im_end|>\n<|im_start|>assistant\n").ids
  for ex, answer in ((chosen, "Scattering."), (rejected, "No idea.")):
    assert ex.tokens[:len(prompt)] == prompt and not any(ex.loss_mask[:len(prompt)])
    assert lib.decode(ex.tokens[len(prompt):], skip_special_tokens=False) == answer + "<|im_end|>"


def test_bos_written_by_the_template_is_not_doubled(tmp_path):
  template = ("{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
              "{% if add_generation_prompt %}[assistant]{% endif %}")
  tok, lib = _tokenizer(tmp_path, template=template)
  tok.base.add_bos = True
  ids = tok.encode_prompt("\n\nHuman: hi\n\nAssistant:")
  assert ids == lib.encode("<|endoftext|>[user] hi\n[assistant]").ids and ids.count(tok.bos_id) == 1


def test_templates_it_cannot_split_and_missing_templates_are_refused(tmp_path):
  reversed_order = "{% for m in messages|reverse %}{{ m['content'] }}|{% endfor %}"
  tok, _ = _tokenizer(tmp_path, template=reversed_order)
  with pytest.raises(ConfigError, match="renders a dialogue's prefix differently"):
    encode_dialogue(tok, DIALOGUE, assistant_only=True)
  os.remove(tmp_path / "tok" / CHAT_TEMPLATE_FILE)
  with pytest.raises(ConfigError, match="data.chat_template=True but .* comes with no chat template"):
    ChatTokenizer(load_tokenizer(str(tmp_path / "tok")))
  plain = load_tokenizer(str(tmp_path / "tok"))
  assert with_chat_format(plain, ml_collections.ConfigDict({"data": {}})) is plain


def test_the_setting_reaches_a_trainers_data(tmp_path):
  from configs import lm
  from rlhf_jax.data.inputs import trainer_data
  from rlhf_jax.hf import runs as hf_runs
  from rlhf_jax.trainers import config_checks
  c = lm.get_config("tiny")
  c.objective, c.init_from, c.data.max_examples = "sft", f"hf:{FIXTURE}", 20
  c.tokenizer.path = ""
  workdir = str(tmp_path / "run")
  c = config_checks.inherit_model_config(hf_runs.resolve(c, workdir, ("init_from",)))
  for chat in (True, False):
    c.data.chat_template = chat
    data = trainer_data(c, workdir, "lm")
    text = tokenizers.Tokenizer.from_file(os.path.join(workdir, "tokenizer.json")).decode(
        data.train.examples[0].tokens, skip_special_tokens=False)
    assert ("<|im_start|>assistant\n" in text) == chat and ("\n\nAssistant:" in text) != chat
