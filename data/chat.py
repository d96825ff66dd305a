"""Conversations for chat fine-tuning: rows of a chat file read into messages, and messages rendered into token ids
and a loss mask with the model's chat template.

    messages = conversation(row, "chat.jsonl:3")     # any accepted row format -> [{"role": ..., "content": ...}]
    template = chat_template(tokenizer)              # Gemma's turns where the tokenizer has them, else the plain one
    ids, mask = template.render(messages)            # mask[i]: whether token i counts as a target in the loss
    prompt, _ = template.render(messages, add_generation_prompt=True)   # what sample.py --chat feeds the model

Row formats (one JSON value per line of a .jsonl file, or the items of a .json array): `{"messages": [...]}`, a bare
list of messages, `{"prompt": ..., "completion": ...}` (each a string or a list of messages) and
`{"instruction": ..., "input": ..., "output": ...}`. A message is `{"role": system | user | assistant, "content":
str}` (`model` is read as assistant). After an optional system message the roles alternate, user first, and a
conversation ends with an assistant reply: a trailing question has nothing to learn from.

Design choices:
- Gemma's template is the official model's (its tokenizer_config.json's chat_template, for text): `<bos>`, then per
  turn `<start_of_turn>{user|model}\\n{content, trimmed}<end_of_turn>\\n`, a system message (not trimmed) and a blank
  line put before the first user turn's content, and `<start_of_turn>model\\n` as the generation prompt. The
  special tokens are put in by id, never encoded from their text (which would give ordinary tokens), and the text
  between two of them is encoded in one piece, as transformers' apply_chat_template encodes it.
- A tokenizer without turn tokens (GPT-2's, a model trained here from scratch) gets the plain template: the
  document start (`<|endoftext|>` for GPT-2, as every document of its datasets begins), then per turn
  `{System|User|Assistant}:\\n{content, trimmed}` and the end-of-text id, so a reply ends where a document ends; the
  generation prompt is `Assistant:\\n`.
- The mask is 1 on each assistant reply's tokens, its end-of-turn token and (Gemma) the newline after it, so the
  model learns to answer and to stop; 0 on everything else. A token that merges the end of `model\\n` with the
  reply's first characters counts as the reply's. `loss_on="all"` makes every token a target.
- Each template has a jinja twin (`jinja`), which exports write next to the model so that transformers and
  llama.cpp render conversations as this module does; tests check that both give the same ids.
"""

import json
from dataclasses import dataclass

from data.errors import DataError
from data.tokenizer import Tokenizer, document_start

ROLES = {"system": "system", "user": "user", "assistant": "assistant", "model": "assistant"}
LOSS_ON = ("assistant", "all")
ROW_FORMATS = '{"messages": [...]}, a list of messages, {"prompt", "completion"} or {"instruction", "input", "output"}'


def is_chat_row(row: object) -> bool:
    """Whether a parsed JSON row is a conversation in one of the accepted formats (rather than a `{"text"}`
    document)."""
    if isinstance(row, list):
        return True
    return isinstance(row, dict) and any(key in row for key in ("messages", "prompt", "instruction"))


def conversation(row: object, where: str) -> list[dict]:
    """The messages of a chat row, roles normalised (`model` -> assistant) and checked; a DataError naming `where`
    and what is wrong otherwise."""
    if isinstance(row, list):
        messages = row
    elif isinstance(row, dict) and "messages" in row:
        messages = row["messages"]
    elif isinstance(row, dict) and "prompt" in row:
        if "completion" not in row:
            raise DataError(f"{where}: a prompt without a completion")
        messages = _turns(row["prompt"], "user", where) + _turns(row["completion"], "assistant", where)
    elif isinstance(row, dict) and "instruction" in row:
        if "output" not in row:
            raise DataError(f"{where}: an instruction without an output")
        given = row.get("input") or ""
        if not all(isinstance(row[k], str) for k in ("instruction", "output")) or not isinstance(given, str):
            raise DataError(f"{where}: instruction, input and output must be strings")
        user = row["instruction"] + (f"\n\n{given}" if given.strip() else "")
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": row["output"]}]
    else:
        raise DataError(f"{where}: not a conversation; a row is one of {ROW_FORMATS}")
    return _checked(messages, where)


def _turns(value: object, role: str, where: str) -> list[dict]:
    """A prompt or completion: a string is one message of `role`, a list is messages as they are."""
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if isinstance(value, list):
        return value
    raise DataError(f"{where}: a {role} prompt or completion must be a string or a list of messages")


def prompt_conversation(value: object, where: str) -> list[dict]:
    """The messages of a conversation to answer (sample.py --messages): a list of messages or {"messages": [...]},
    roles alternating as in a row, ending with the user's turn."""
    messages = value["messages"] if isinstance(value, dict) and "messages" in value else value
    return _checked(messages, where, last="user")


def _checked(messages: object, where: str, last: str = "assistant") -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty list of {{'role', 'content'}} objects")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            raise DataError(f"{where}: message {i + 1} is not a {{'role', 'content'}} object with string content")
        role = ROLES.get(message.get("role"))
        if role is None:
            raise DataError(f"{where}: message {i + 1} has role {message.get('role')!r}; use system, user or assistant")
        out.append({"role": role, "content": message["content"]})
    turns = out[1:] if out[0]["role"] == "system" else out
    for i, message in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if message["role"] != expected:
            first = " (a system message may only come first)" if message["role"] == "system" else ""
            raise DataError(
                f"{where}: roles must alternate user, assistant, user, ... after an optional system message; "
                f"message {i + 1 + len(out) - len(turns)} is {message['role']}, expected {expected}{first}"
            )
    if not turns or turns[-1]["role"] != last:
        what = "an assistant reply, so it has nothing to learn" if last == "assistant" else "a user turn to answer"
        raise DataError(f"{where}: the conversation does not end with {what}")
    return out


def read_rows(path, text: str) -> list[tuple[object, str]]:
    """(row, where) of a .json file holding one array of rows."""
    try:
        rows = json.loads(text)
    except ValueError as e:
        raise DataError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(rows, list):
        raise DataError(f"{path}: a .json chat file holds one array of rows, got {type(rows).__name__}")
    return [(row, f"{path}: row {i + 1}") for i, row in enumerate(rows)]


@dataclass(frozen=True)
class ChatTemplate:
    """How a conversation becomes ids for one tokenizer. `name` is "gemma" or "plain"; `turn_end` is the id that
    closes every turn (`<end_of_turn>`, or the end-of-text id of the plain template)."""

    name: str
    tokenizer: Tokenizer
    start: int  # the first id of every conversation: <bos>, or the plain template's document start
    turn_end: int
    turn_start: int | None = None  # Gemma's <start_of_turn>

    @property
    def stop_ids(self) -> frozenset[int]:
        """Where a chat reply ends: the turn end and every stop id of the tokenizer (Gemma's <eos> too)."""
        return self.tokenizer.stop_ids | {self.turn_end}

    def render(
        self, messages: list[dict], add_generation_prompt: bool = False, loss_on: str = "assistant"
    ) -> tuple[list[int], list[int]]:
        """(ids, mask) of checked messages (see `conversation`); with `add_generation_prompt`, the ids end with the
        prompt of the model's reply (the mask is then of no use)."""
        parts = self._gemma_parts(messages) if self.name == "gemma" else self._plain_parts(messages)
        if add_generation_prompt:
            parts += [(self.turn_start, False), ("model\n", "")] if self.name == "gemma" else [("Assistant:\n", "")]
        ids, mask = self._tokenize(parts)
        if loss_on == "all":
            mask = [1] * len(ids)
        return ids, mask

    def _gemma_parts(self, messages: list[dict]) -> list:
        """Special ids as (id, supervised), text between them as (context, supervised text)."""
        prefix, turns = "", messages
        if messages[0]["role"] == "system":
            prefix, turns = messages[0]["content"] + "\n\n", messages[1:]
        parts: list = [(self.start, False)]
        for i, message in enumerate(turns):
            content, reply = message["content"].strip(), message["role"] == "assistant"
            parts.append((self.turn_start, False))
            if reply:
                parts += [("model\n", content), (self.turn_end, True), ("", "\n")]
            else:
                parts += [(f"user\n{prefix if i == 0 else ''}{content}", ""), (self.turn_end, False), ("\n", "")]
        return parts

    def _plain_parts(self, messages: list[dict]) -> list:
        parts: list = [(self.start, False)]
        for message in messages:
            content, reply = message["content"].strip(), message["role"] == "assistant"
            heading = f"{message['role'].capitalize()}:\n"
            parts += [(heading, content) if reply else (heading + content, ""), (self.turn_end, reply)]
        return parts

    def _tokenize(self, parts: list) -> tuple[list[int], list[int]]:
        ids: list[int] = []
        mask: list[int] = []
        for value, supervised in parts:
            if isinstance(value, int):
                ids.append(value)
                mask.append(int(supervised))
                continue
            context, reply = value, supervised
            whole = self.tokenizer.encode(context + reply)
            # The reply's tokens are those after the longest prefix the context alone tokenizes to: a token that
            # straddles the boundary is the reply's.
            alone = self.tokenizer.encode(context) if reply else whole
            shared = 0
            while shared < min(len(alone), len(whole)) and alone[shared] == whole[shared]:
                shared += 1
            ids += whole
            mask += [0] * shared + [1] * (len(whole) - shared)
        return ids, mask

    @property
    def jinja(self) -> str:
        """The template in jinja, as transformers' apply_chat_template and llama.cpp read it."""
        return GEMMA_JINJA if self.name == "gemma" else PLAIN_JINJA

    def describe(self) -> dict:
        """What meta.json records of the template."""
        ids = {"start": self.start, "turn_end": self.turn_end, "turn_start": self.turn_start}
        return {"name": self.name, **{k: v for k, v in ids.items() if v is not None}}


def chat_template(tokenizer: Tokenizer) -> ChatTemplate:
    """Gemma's template where the tokenizer has `<start_of_turn>`, `<end_of_turn>` and a bos; the plain one
    otherwise."""
    turn_start, turn_end = tokenizer.special_id("<start_of_turn>"), tokenizer.special_id("<end_of_turn>")
    if turn_start is not None and turn_end is not None and tokenizer.bos_id is not None:
        return ChatTemplate("gemma", tokenizer, tokenizer.bos_id, turn_end, turn_start)
    return ChatTemplate("plain", tokenizer, document_start(tokenizer.bos_id, tokenizer.eos_id), tokenizer.eos_id)


# The jinja twins of the two templates. Gemma's renders text conversations exactly as the official model's template
# does (tests/test_chat.py checks both against `ChatTemplate.render`).
GEMMA_JINJA = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set first_user_prefix = '' -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{%- endif -%}"
    "{{ '<start_of_turn>' + ('model' if message['role'] == 'assistant' else message['role']) + '\\n' }}"
    "{{ (first_user_prefix if loop.first else '') + message['content'] | trim }}{{ '<end_of_turn>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\\n' }}{%- endif -%}"
)
PLAIN_JINJA = (
    "{{ bos_token }}"
    "{%- for message in messages -%}"
    "{{ message['role'] | capitalize + ':\\n' + message['content'] | trim + eos_token }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'Assistant:\\n' }}{%- endif -%}"
)
