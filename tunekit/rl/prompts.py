"""The prompts of an RLHF recipe (`data:`): the prompt part of any SFT-style file, or a text column,
each with its data row (a reward function may compare against any column)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from tunekit.config import Section
from tunekit.data.masking import prompts_of_table
from tunekit.data.tables import read_table
from tunekit.errors import UserError
from tunekit.jsontypes import Row


class PromptData(Section):
    train: str | list[str] = Field(description="prompt file(s): any SFT-style file (its prompt part), or a text column")
    eval: str | list[str] | None = Field(None, description="held-out prompt file(s); default: the last data.eval_size rows")
    eval_size: int = Field(0, ge=0, description="rows held out from the end of the training prompts when no eval file")
    format: Literal["alpaca", "prompt_completion", "messages", "text"] | None = Field(
        None, description="data format; default: detected (a `prompt` column alone is a prompt per row)")
    columns: dict[str, str] = Field(default_factory=dict, description="standard name -> your column, e.g. {text: sentence}")
    prompt_words: int | None = Field(
        None, gt=0, description="keep the first N words of each prompt; rows of N words or fewer are skipped "
                                "(for continuation demos: a review's first words)")
    train_limit: int | None = Field(None, gt=0, description="use the first N training prompts")


def read_prompts(specs: str | list[str], config: Any, key: str
                 ) -> tuple[list[list[dict[str, str]]], list[dict[str, Any]]]:
    """The prompt conversation of every row: the prompt part of an SFT-style row, a `prompt` column
    alone, or a text column (as a user message), cut to data.prompt_words; and each one's data row
    (all its columns: a reward function may compare against them)."""
    prompts, rows = [], []
    for spec in [specs] if isinstance(specs, str) else specs:
        table = read_table(spec, key).renamed(config.data.columns)
        rows += list(table.rows)  # RL prompt sets are small: each prompt keeps its row for the reward function
        prompts += prompts_of_table(table, config.data.format, key)
    words = config.data.prompt_words
    if words:
        kept = [(p, r) for p, r in zip(prompts, rows) if len(p[-1]["content"].split()) > words]
        prompts = [[*p[:-1], {**p[-1], "content": " ".join(p[-1]["content"].split()[:words])}] for p, _ in kept]
        rows = [r for _, r in kept]
    if not prompts:
        raise UserError(f"{config.source}: {key}: no prompts left" + (f" with more than data.prompt_words={words} words"
                                                                      if words else ""))
    check_columns(config, rows[0], key, spec)
    return prompts, rows


def check_columns(config: Any, row: Row, key: str, spec: str) -> None:
    """Every exact_answer's column is in the prompt rows (checked on the first row)."""
    for i, function in enumerate(config.rlhf.reward_fn):
        if function.name == "exact_answer" and function.column not in row:
            raise UserError(f"{config.source}: rlhf.reward_fn.{i}.column: {key} ({spec}) has no column "
                            f"{function.column!r} (it has {', '.join(row)}); set column to the one with the answers")
