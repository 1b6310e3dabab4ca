"""hh-rlhf dialogues in an instruction-tuned model's chat format (data.chat_template = True).

A dialogue's turns become messages (Human -> user, Assistant -> assistant) rendered by the model's
own Jinja chat template, as transformers' apply_chat_template renders them. To keep exact spans,
the text is rendered once per prefix of the messages: message k's text is what rendering k + 1
messages adds to rendering k, and an assistant message's header is what add_generation_prompt
adds. A template whose renderings are not prefixes of one another is refused. Targets (SFT) are
the assistant messages without their headers. A response ends with the template's end-of-turn
token where that token is EOS (Qwen, SmolLM2: <|im_end|>); otherwise EOS is appended, as for plain
text. A prompt for sampling is the rendering with the generation header, so a sampled response
continues it exactly as the model was tuned.
"""
from __future__ import annotations

from typing import Any, NamedTuple

from rlhf_jax.data.dialogue import parse_turns
from rlhf_jax.errors import ConfigError

ROLES = {"Human": "user", "Assistant": "assistant"}


class Piece(NamedTuple):
  text: str
  target: bool  # an assistant message's content and end-of-turn (what SFT learns)


def _environment():
  from jinja2.exceptions import TemplateError
  from jinja2.sandbox import ImmutableSandboxedEnvironment

  def raise_exception(message):
    raise TemplateError(message)

  env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)  # transformers' settings
  env.globals["raise_exception"] = raise_exception
  return env


class ChatFormat:

  def __init__(self, template: str, bos_token: str, eos_token: str, where: str):
    self.where = where
    try:
      self._template = _environment().from_string(template)
    except Exception as e:  # jinja2's syntax errors
      raise ConfigError(f"{where}: the chat template does not parse ({e})") from None
    self._tokens = {"bos_token": bos_token or "", "eos_token": eos_token or ""}

  def render(self, messages: list[dict[str, Any]], generation_prompt: bool = False) -> str:
    try:
      return self._template.render(messages=messages, add_generation_prompt=generation_prompt, **self._tokens)
    except Exception as e:
      raise ConfigError(f"{self.where}: the chat template fails on an hh-rlhf dialogue ({e})") from None

  def pieces(self, dialogue: str, generation_prompt: bool = False) -> list[Piece]:
    """The rendered dialogue as consecutive pieces; a trailing empty Assistant turn (a prompt) is
    the generation header."""
    turns = parse_turns(dialogue)
    open_turn = turns[-1].role == "Assistant" and not turns[-1].text.strip()
    messages = [{"role": ROLES[t.role], "content": t.text.strip()} for t in (turns[:-1] if open_turn else turns)]
    out, before = [], ""
    for k, message in enumerate(messages):
      if message["role"] == "assistant":
        header = self._added(before, self.render(messages[:k], generation_prompt=True))
        out.append(Piece(header, False))
        before += header
      now = self.render(messages[:k + 1])
      out.append(Piece(self._added(before, now), message["role"] == "assistant"))
      before = now
    if open_turn or generation_prompt:
      out.append(Piece(self._added(before, self.render(messages, generation_prompt=True)), False))
    return [p for p in out if p.text]

  def _added(self, before: str, now: str) -> str:
    if not now.startswith(before):
      raise ConfigError(f"{self.where}: the chat template renders a dialogue's prefix differently from the "
                        f"dialogue's start, so its spans cannot be told apart (data.chat_template=False uses "
                        f"plain text)")
    return now[len(before):]


class ChatTokenizer:
  """A tokenizer whose dialogues and prompts are chat-formatted; every other call is its base's."""

  def __init__(self, base):
    template = base.chat_template()
    if template is None:
      raise ConfigError(f"data.chat_template=True but {base.path} comes with no chat template (a model's "
                        f"chat_template.jinja, imported with it)")
    token = lambda i: base.token_text(i) if i is not None else ""
    self.base = base
    self.chat = ChatFormat(template, token(base.bos_id), token(base.eos_id), where=base.path)

  def __getattr__(self, name):
    return getattr(self.base, name)

  def _encode(self, pieces: list[Piece], target_all: bool) -> tuple[list[int], list[bool]]:
    bos = self.base.bos_id
    tokens, mask = [], []
    for piece in pieces:
      ids = self.base.encode(piece.text)
      tokens += ids
      mask += [piece.target or target_all] * len(ids)
    if self.base.add_bos and (not tokens or tokens[0] != bos):  # the template may write BOS itself
      tokens, mask = [bos] + tokens, [False] + mask
    return tokens, mask

  def encode_chat_dialogue(self, dialogue: str, *, assistant_only: bool) -> tuple[list[int], list[bool]]:
    """(tokens, targets) of a rendered dialogue, ending with EOS: the template's own end of turn
    where that is EOS (what follows it is dropped), else an EOS appended."""
    tokens, mask = self._encode(self.chat.pieces(dialogue), not assistant_only)
    eos = self.base.eos_id
    last = len(tokens) - 1 - tokens[::-1].index(eos) if eos in tokens else -1
    if last >= 0 and not self.base.decode(tokens[last + 1:]).strip():  # only the template's newline after it
      return tokens[:last + 1], mask[:last] + [True]
    return tokens + [eos], mask + [True]

  def encode_prompt(self, text: str) -> list[int]:
    """A prompt rendered up to the assistant's header, where a sampled response begins."""
    return self._encode(self.chat.pieces(text, generation_prompt=True), False)[0]


def with_chat_format(tok, config):
  """tok, chat-formatted when config.data.chat_template is set (see ChatTokenizer)."""
  if not config.data.get("chat_template") or isinstance(tok, ChatTokenizer):
    return tok
  return ChatTokenizer(tok)
