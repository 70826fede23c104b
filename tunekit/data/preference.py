"""Preference data: pairs of a preferred (`chosen`) and a dispreferred (`rejected`) response, for
`tunekit reward` and `tunekit dpo`.

Every supported layout becomes a `Pair` of prompt, chosen and rejected (texts, or lists of messages
for conversations):

- `pairs`: {chosen, rejected} texts, no shared prompt;
- `prompt_pairs`: {prompt, chosen, rejected} texts;
- `conversation`: {chosen, rejected} lists of messages (the shared first messages are the prompt), or
  {prompt, chosen, rejected} lists;
- `hh`: Anthropic HH-RLHF dialogues ("\\n\\nHuman: ... \\n\\nAssistant: ..."), split into the shared
  turns (the prompt) and the final responses;
- `label_pairs`: a labelled classification file; each pair is a sentence with the positive label
  (chosen) against one without (rejected), drawn without replacement with a fixed seed.

A missing or empty side is an error naming the line; a pair whose sides are identical teaches
nothing (its loss gradient is zero), so it is dropped with a warning that counts them.
"""

from __future__ import annotations

import random
import sys
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import Field

from tunekit.config import Section
from tunekit.data.halves import SPLIT_HALF_HELP, SplitHalf, half_of
from tunekit.data.masking import check_messages, is_hh_dialogue, parse_hh
from tunekit.data.tables import Table, pick_column, read_table
from tunekit.errors import UserError
from tunekit.jsontypes import Row

FORMATS = ("pairs", "prompt_pairs", "conversation", "hh", "label_pairs")
# How a conversation reads as plain text for a model without a chat template (an encoder): the
# HH-RLHF layout, so that HH dialogues are scored as they were written.
SPEAKERS = {"user": "Human", "assistant": "Assistant", "system": "System", "tool": "Tool"}
TEXT_COLUMNS = ("sentence", "text")

Side = str | list[dict[str, str]]


# tokens a reward model or DPO reads per text, unless the recipe's data.max_length says otherwise
DEFAULT_MAX_LENGTH = 512


class PreferenceData(Section):
    train: str = Field(description="training file (jsonl/json/csv/tsv/parquet, .gz too) or Hub dataset")
    eval: str | None = Field(None, description="held-out file; default: the last data.eval_size rows of data.train")
    eval_size: int = Field(0, ge=0, description="rows held out from the end of data.train when there is no eval file")
    format: Literal["pairs", "prompt_pairs", "conversation", "hh", "label_pairs"] | None = Field(
        None, description="data layout; default: detected from the columns (label_pairs must be named)")
    train_limit: int | None = Field(None, gt=0, description="use the first N training pairs")
    split_half: SplitHalf | None = Field(None, description=SPLIT_HALF_HELP + " (label_pairs: the text column's)")
    eval_limit: int | None = Field(None, gt=0, description="use the first N held-out pairs")
    text_column: str | None = Field(None, description=f"label_pairs: the text; default: the first of {', '.join(TEXT_COLUMNS)}")
    label_column: str = Field("label", description="label_pairs: the label column")
    positive_label: str | int = Field(1, description="label_pairs: the label of the preferred texts")
    negative_label: str | int | None = Field(None, description="label_pairs: the label of the rejected texts; default: any other")
    pairs_seed: int = Field(0, description="label_pairs: seed of the random pairing")
    max_length: int = Field(DEFAULT_MAX_LENGTH, gt=0, description="tokens per side of a pair; a longer text keeps its end "
                                                                   "(the final turn, the response to judge)")


@dataclass
class Pair:
    prompt: Side  # "" or [] when there is none
    chosen: Side
    rejected: Side

    @property
    def conversational(self) -> bool:
        return isinstance(self.chosen, list)


@dataclass
class Pairs:
    """The pairs of one split, each with where it came from (for messages)."""

    kind: str
    pairs: list[Pair]
    where: list[str]


@dataclass
class Preferences:
    train: Pairs
    eval: Pairs | None


def load_preferences(section: PreferenceData, source: str) -> Preferences:
    """Read, split, normalise and check the training and held-out pairs (no model needed)."""
    table = read_table(section.train, "data.train")
    if section.split_half:
        text = pick_column(table, section.text_column, TEXT_COLUMNS, "data.text_column") if section.format == "label_pairs" else None
        table = half_of(table, section.split_half, text)
    held_out = read_table(section.eval, "data.eval", split="test") if section.eval else None
    if held_out is None and section.eval_size:
        if section.eval_size >= len(table.rows):
            raise UserError(f"{source}: data.eval_size: {section.eval_size} leaves no training rows ({len(table.rows)} in all)")
        cut = len(table.rows) - section.eval_size
        held_out = table.select(range(cut, len(table)))
        table = table.select(range(cut))
    kind = detect_format(table, section.format)
    train = read_pairs(table, kind, section, section.train_limit)
    evaluation = read_pairs(held_out, kind, section, section.eval_limit) if held_out is not None else None
    return Preferences(train, evaluation)


def detect_format(table: Table, wanted: str | None) -> str:
    if wanted is not None:
        return wanted
    columns = table.columns
    if "chosen" not in columns or "rejected" not in columns:
        raise UserError(
            f"{table.source}: preference data needs 'chosen' and 'rejected' columns (columns: {', '.join(columns)}); "
            "for a labelled file set data.format: label_pairs"
        )
    first = table.rows[0]["chosen"]
    if isinstance(first, list):
        return "conversation"
    if is_hh_dialogue(first):
        return "hh"
    return "prompt_pairs" if "prompt" in columns else "pairs"


def read_pairs(table: Table, kind: str, section: PreferenceData, limit: int | None) -> Pairs:
    if kind == "label_pairs":
        pairs = label_pairs(table, section)
    else:
        rows = table.head(limit)
        pairs = Pairs(kind, [to_pair(row, kind, rows.where(i)) for i, row in enumerate(rows.rows)],
                      [rows.where(i) for i in range(len(rows.rows))])
    if limit is not None:
        pairs = Pairs(kind, pairs.pairs[:limit], pairs.where[:limit])
    return drop_identical(pairs, table.source)


def to_pair(row: Row, kind: str, where: str) -> Pair:
    """One row of a row-per-pair layout as a Pair; bad rows are one error line naming the row."""
    if kind == "hh":
        chosen = parse_hh(text_side(row, "chosen", where), "chosen", where)
        rejected = parse_hh(text_side(row, "rejected", where), "rejected", where)
        return split_shared_prompt(chosen, rejected)
    if kind == "conversation":
        chosen = message_side(row, "chosen", where)
        rejected = message_side(row, "rejected", where)
        if row.get("prompt") is None:
            return split_shared_prompt(chosen, rejected)
        prompt = message_side(row, "prompt", where, need_answer=False)
        return Pair(prompt, chosen, rejected)
    if kind == "prompt_pairs":
        prompt = row.get("prompt")
        if not isinstance(prompt, str):
            raise UserError(f"{where}: 'prompt' is missing or not text")
        return Pair(prompt, text_side(row, "chosen", where), text_side(row, "rejected", where))
    if kind == "pairs":
        return Pair("", text_side(row, "chosen", where), text_side(row, "rejected", where))
    raise UserError(f"{where}: data.format {kind!r} is not a row-per-pair layout")


def text_side(row: Row, name: str, where: str) -> str:
    value = row.get(name)
    if value is None:
        raise UserError(f"{where}: {name!r} is missing")
    if not isinstance(value, str):
        raise UserError(f"{where}: {name!r} must be text, got {type(value).__name__} (lists of messages: data.format: conversation)")
    if not value.strip():
        raise UserError(f"{where}: {name!r} is empty")
    return value


def message_side(row: Row, name: str, where: str, need_answer: bool = True) -> list[dict[str, str]]:
    value = row.get(name)
    if value is None:
        raise UserError(f"{where}: {name!r} is missing")
    if not isinstance(value, list):
        raise UserError(f"{where}: {name!r} must be a list of {{role, content}} messages, got {type(value).__name__}")
    if not value:
        raise UserError(f"{where}: {name!r} is empty")
    if not need_answer:  # a prompt: checked together with a made-up answer, which needs no assistant turn
        return check_messages([*value, {"role": "assistant", "content": ""}], f"{where}: {name!r}")[:-1]
    messages = check_messages(value, f"{where}: {name!r}")
    if not any(m["content"].strip() for m in messages):
        raise UserError(f"{where}: {name!r} is empty")
    return messages


def split_shared_prompt(chosen: list[dict[str, str]], rejected: list[dict[str, str]]) -> Pair:
    """The messages both sides share are the prompt; each side keeps at least its last message.
    (In HH-RLHF nine pairs diverge before the last turn: their responses are several messages.)"""
    shared = 0
    while shared < min(len(chosen), len(rejected)) - 1 and chosen[shared] == rejected[shared]:
        shared += 1
    return Pair(chosen[:shared], chosen[shared:], rejected[shared:])


def label_pairs(table: Table, section: PreferenceData) -> Pairs:
    """Pairs from a labelled file: every positive text is matched with one negative text (each
    used at most once), in an order fixed by data.pairs_seed; no prompt (the text is scored alone)."""
    text = pick_column(table, section.text_column, TEXT_COLUMNS, "data.text_column")
    table.require(text, section.label_column)
    positive, negative = [], []
    for i, row in enumerate(table.rows):
        if not isinstance(row[text], str) or not row[text].strip():
            raise UserError(f"{table.where(i)}: {text!r} is empty or not text")
        label = str(row[section.label_column]).strip()
        if label == str(section.positive_label):
            positive.append(i)
        elif section.negative_label is None or label == str(section.negative_label):
            negative.append(i)
    for name, group, label in (("positive", positive, section.positive_label), ("negative", negative, section.negative_label)):
        if not group:
            what = f"label {label!r}" if label is not None else f"a label other than {section.positive_label!r}"
            raise UserError(f"{table.source}: data.{name}_label: no row has {what} in column {section.label_column!r}")
    rng = random.Random(section.pairs_seed)
    rng.shuffle(positive)
    rng.shuffle(negative)
    texts = table.column(text)
    pairs = [Pair("", texts[p], texts[n]) for p, n in zip(positive, negative)]
    where = [f"{table.where(p)} vs {table.where(n).rsplit(': ', 1)[-1]}" for p, n in zip(positive, negative)]
    return Pairs("label_pairs", pairs, where)


def drop_identical(pairs: Pairs, source: str) -> Pairs:
    keep = [i for i, p in enumerate(pairs.pairs) if p.chosen != p.rejected]
    dropped = len(pairs.pairs) - len(keep)
    if dropped:
        kept = set(keep)
        lines = ", ".join(pairs.where[i].rsplit(": ", 1)[-1] for i in range(len(pairs.pairs)) if i not in kept)
        print(f"tunekit: warning: {source}: dropped {dropped} pair(s) whose chosen and rejected are identical ({lines})",
              file=sys.stderr, flush=True)
    if not keep:
        raise UserError(f"{source}: no pairs left (every pair has identical chosen and rejected)")
    return Pairs(pairs.kind, [pairs.pairs[i] for i in keep], [pairs.where[i] for i in keep])


# ---------------------------------------------------------------------------------------------
# Pairs as text


def dialogue_text(messages: list[dict[str, str]]) -> str:
    """A conversation as plain text, HH-RLHF style ("Human: ...\\n\\nAssistant: ...")."""
    return "\n\n".join(f"{SPEAKERS.get(m['role'], m['role'].title())}: {m['content']}" for m in messages)


def full_text(tokenizer: Any, prompt: Side, response: Side) -> str:
    """Prompt and response as the one text a reward model scores: a conversation through the
    tokenizer's chat template when it has one, else as an HH-style dialogue (encoders)."""
    if isinstance(response, str):
        return f"{prompt}{response}"
    messages = [*prompt, *response]
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False).rstrip()
    return dialogue_text(messages)


def response_length(side: Side) -> int:
    return len(side) if isinstance(side, str) else sum(len(m["content"]) for m in side)


def longer_wins(pairs: Pairs) -> float:
    """The trivial baseline: the share of pairs whose chosen response is the longer (ties half)."""
    score = 0.0
    for pair in pairs.pairs:
        chosen, rejected = response_length(pair.chosen), response_length(pair.rejected)
        score += 1.0 if chosen > rejected else 0.5 if chosen == rejected else 0.0
    return score / len(pairs.pairs)
