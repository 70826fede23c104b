"""Which tokens carry loss. Every SFT format is first turned into a conversation (a list of
messages); `tokenize_conversation` then renders it with the chat template and returns input ids and
labels, with -100 wherever no loss is taken. `tunekit preview` prints exactly this.

The trained span of an assistant turn is found by rendering the conversation prefix by prefix:
the text that the template adds for that turn (its content and its end-of-turn token) is trained,
everything else is masked. This works with any chat template that renders prefixes consistently,
with or without {% generation %} markers, and refuses (never mislabels) one that does not.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from tunekit.data.chat import ROLES
from tunekit.data.tables import Table, read_table
from tunekit.errors import UserError
from tunekit.jsontypes import Row

FORMATS = ("alpaca", "prompt_completion", "messages", "text")
HH_TURN = re.compile(r"\n\n(Human|Assistant):")
HH_ROLES = {"Human": "user", "Assistant": "assistant"}


@dataclass
class Tokenized:
    input_ids: list[int]
    labels: list[int]

    @property
    def trained(self) -> int:
        return sum(label != -100 for label in self.labels)


def detect_format(table: Table, wanted: str | None) -> str:
    columns = set(table.columns)
    if wanted is not None:
        return wanted
    if "messages" in columns:
        return "messages"
    if "chosen" in columns and table.rows and is_hh_dialogue(table.rows[0]["chosen"]):
        return "hh"  # HH-RLHF preference rows: SFT on the preferred dialogue
    if {"instruction", "output"} <= columns:
        return "alpaca"
    if {"prompt", "completion"} <= columns:
        return "prompt_completion"
    if "text" in columns:
        return "text"
    raise UserError(
        f"{table.source}: cannot tell the data format from the columns ({', '.join(sorted(columns))}); expected "
        "messages, instruction+output (Alpaca), prompt+completion, text or HH-RLHF chosen dialogues; set "
        "data.format or map with data.columns"
    )


def to_messages(row: Row, kind: str, where: str) -> list[dict[str, str]]:
    """One row of any supported format as a conversation."""
    if kind == "alpaca":
        instruction, extra, output = row.get("instruction"), row.get("input") or "", row.get("output")
        _require_text(where, instruction=instruction, output=output)
        user = f"{instruction}\n\n{extra}" if str(extra).strip() else instruction
        return [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
    if kind == "prompt_completion":
        prompt, completion = row.get("prompt"), row.get("completion")
        if isinstance(prompt, list) and isinstance(completion, list):  # conversational prompt/completion
            return check_messages([*prompt, *completion], where)
        _require_text(where, prompt=prompt, completion=completion)
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
    if kind == "messages":
        return check_messages(row.get("messages"), where)
    if kind == "hh":  # "\n\nHuman: ... \n\nAssistant: ..." in `chosen`: every assistant turn is trained
        _require_text(where, chosen=row.get("chosen"))
        return check_messages(parse_hh(row["chosen"], "chosen", where), where)
    raise UserError(f"{where}: format {kind!r} has no conversation")


def _require_text(where: str, **fields: Any) -> None:
    for name, value in fields.items():
        if not isinstance(value, str):
            raise UserError(f"{where}: {name!r} is missing or not text")
        if name in ("output", "completion") and not value.strip():
            raise UserError(f"{where}: empty {name!r}: there is no response to train on")


def check_messages(messages: Any, where: str) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise UserError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise UserError(f"{where}: message {i + 1} must be an object with 'role' and 'content'")
        if message["role"] not in ROLES:
            raise UserError(f"{where}: message {i + 1} has role {message['role']!r}; use one of {', '.join(ROLES)}")
        if not isinstance(message["content"], str):
            raise UserError(f"{where}: message {i + 1} content must be text")
    if not any(m["role"] == "assistant" for m in messages):
        raise UserError(f"{where}: no assistant message: there is no response to train on")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def is_hh_dialogue(value: Any) -> bool:
    """Whether a cell holds an HH-RLHF dialogue ("\\n\\nHuman: ... \\n\\nAssistant: ...")."""
    return isinstance(value, str) and value.lstrip().startswith("Human:")


def parse_hh(text: str, name: str, where: str) -> list[dict[str, str]]:
    """An HH-RLHF dialogue as messages: "\\n\\nHuman: q\\n\\nAssistant: a" -> user q, assistant a.

    A final assistant turn may be empty: four rejected answers of helpful-base are, and "no answer"
    is a legitimate (bad) answer to prefer another over."""
    parts = HH_TURN.split("\n\n" + text.lstrip())
    if parts[0].strip() or len(parts) < 3:
        raise UserError(f"{where}: {name!r} is not an HH-RLHF dialogue (expected '\\n\\nHuman: ... \\n\\nAssistant: ...')")
    turns = [{"role": HH_ROLES[role], "content": content.strip()} for role, content in zip(parts[1::2], parts[2::2])]
    if turns[-1]["role"] != "assistant":
        raise UserError(f"{where}: {name!r} does not end with an Assistant turn, so there is no response to judge")
    return turns


def render(tokenizer: Any, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def trained_spans(tokenizer: Any, messages: list[dict[str, str]], text: str) -> list[tuple[int, int]]:
    """Character spans of `text` that carry loss: each assistant turn and its end-of-turn token."""
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render(tokenizer, messages[:i], add_generation_prompt=True) if i else ""
        through = text if i + 1 == len(messages) else render(tokenizer, messages[: i + 1])  # the same string
        if not (text.startswith(through) and through.startswith(before)):
            raise UserError(
                "the model's chat template does not render a conversation prefix by prefix, so the response "
                "tokens cannot be located; set model.chat_template: tunekit to use tunekit's template"
            )
        spans.append((len(before), len(through.rstrip())))  # the newline after end-of-turn is not the model's
    return spans


def tokenize_conversation(
    tokenizer: Any, messages: list[dict[str, str]], max_length: int | None = None, train_all: bool = False
) -> Tokenized:
    """Input ids and labels of one conversation: -100 except on assistant turns (or all, if train_all)."""
    text = render(tokenizer, messages)
    spans = [(0, len(text))] if train_all else trained_spans(tokenizer, messages, text)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = encoded["input_ids"]
    labels = [
        token if any(start <= begin < end for start, end in spans) else -100
        for token, (begin, _) in zip(ids, encoded["offset_mapping"])
    ]
    if max_length is not None:
        ids, labels = ids[:max_length], labels[:max_length]
    return Tokenized(ids, labels)


def tokenize_text(tokenizer: Any, text: str, max_length: int | None = None) -> Tokenized:
    """Plain text for language modelling: every token is trained, EOS appended."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ids = ids[:max_length] if max_length else ids
    return Tokenized(ids, list(ids))


def prompt_part(messages: list[dict[str, str]]) -> list[dict[str, str]]:
    """The conversation up to (not including) its last assistant turn: what a model is asked."""
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return messages[:last]


def prompts_of_file(path: str) -> list[list[dict[str, str]]]:
    """The prompt of each row of an SFT-style file (`tunekit generate --data`)."""
    return prompts_of_table(read_table(path, "--data"))


def prompts_of_table(table: Table, format: str | None = None, key: str = "--data") -> list[list[dict[str, str]]]:
    """The prompt conversation of every row: the prompt part of an SFT-style row (Alpaca,
    prompt/completion, messages), a `prompt` column alone, or a text column as a user message."""
    if format is None and "prompt" in table.columns and "completion" not in table.columns:
        return [[{"role": "user", "content": str(row["prompt"])}] for row in table.rows]
    kind = detect_format(table, format)
    if kind == "text":
        table.require("text", key=key)
        return [[{"role": "user", "content": str(row["text"])}] for row in table.rows]
    return [prompt_part(to_messages(row, kind, table.where(i))) for i, row in enumerate(table.rows)]
