"""`tunekit preview`: print tokenised SFT examples with the trained tokens marked, and count them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tunekit.errors import UserError
from tunekit.runs.reading import open_run


def preview_recipe(recipe: str, overrides: list[str], examples: int) -> None:
    """An SFT recipe, or the resolved recipe of an SFT run folder (what that run trained on)."""
    from tunekit.config import load_config
    from tunekit.methods import sft

    if Path(recipe).is_dir():
        recipe = str(open_run(recipe, "preview", "sft").path / "config.yaml")
    config = load_config(sft.Config, recipe, overrides)
    preview_data(config, sft.check(config), examples)


def preview_data(config: Any, data: Any, examples: int) -> None:
    """Tokenise every training row the way training will; show the first few with [[trained]] spans."""
    import typer

    from tunekit.data.masking import tokenize_conversation, tokenize_text
    from tunekit.models import load_chat_tokenizer

    tokenizer = load_chat_tokenizer(config.model)
    max_length = config.data.max_length
    trained = masked = 0
    for index, (row, where) in enumerate(data.train.examples()):
        if data.train.kind == "text":
            item = tokenize_text(tokenizer, row, max_length)
        else:
            item = tokenize_conversation(tokenizer, row, max_length, train_all=not config.sft.completion_only_loss)
        if item.trained == 0:
            raise UserError(f"{where}: no token carries loss (after truncation to {max_length} tokens)")
        trained += item.trained
        masked += len(item.labels) - item.trained
        if index < examples:
            typer.echo(f"--- {where}: {item.trained} trained / {len(item.labels)} tokens")
            typer.echo(marked(tokenizer, item.input_ids, item.labels))
    share = 100 * trained / max(trained + masked, 1)
    typer.echo(f"{len(data.train)} examples: {trained} trained tokens, {masked} masked ({share:.1f}% trained)")


def marked(tokenizer: Any, ids: list[int], labels: list[int]) -> str:
    """The decoded text with every run of trained tokens wrapped in [[ ]]."""
    pieces, run, in_run = [], [], False
    for token, label in zip(ids, labels):
        trained = label != -100
        if trained != in_run and run:
            text = tokenizer.decode(run)
            pieces.append(f"[[{text}]]" if in_run else text)
            run = []
        run.append(token)
        in_run = trained
    if run:
        text = tokenizer.decode(run)
        pieces.append(f"[[{text}]]" if in_run else text)
    return "".join(pieces)
