"""One module per training command. `method_of` maps a command to its module (an explicit list, no
registry) and imports only that one, so a command never pays for the others' imports."""

from __future__ import annotations

from types import ModuleType
from typing import TYPE_CHECKING

from tunekit.errors import UserError

if TYPE_CHECKING:
    from tunekit.data.prepare import Prepared


def method_of(command: str) -> ModuleType:
    """The module of a training command."""
    from tunekit.config import METHODS

    if command not in METHODS:
        raise UserError(f"unknown method {command!r}; one of: {', '.join(METHODS)}")
    if command == "classify":
        from tunekit.methods import classify as module
    elif command == "qa":
        from tunekit.methods import qa as module
    elif command == "pretrain":
        from tunekit.methods import pretrain as module
    elif command == "sft":
        from tunekit.methods import sft as module
    elif command == "reward":
        from tunekit.methods import reward as module
    elif command == "dpo":
        from tunekit.methods import dpo as module
    else:
        from tunekit.methods import rlhf as module
    return module


def data_prepare(recipe: str, overrides: list[str]) -> list[tuple[str, Prepared]]:
    """`tunekit data prepare`: the recipe's data checked, tokenised and cached, nothing trained."""
    from tunekit.config import find_recipe, load_config, read_yaml_mapping

    path = find_recipe(recipe)
    method = read_yaml_mapping(path).get("method") or path.parent.name
    if method not in ("sft", "pretrain"):
        raise UserError(f"{path}: data prepare covers sft and pretrain recipes (this one is {method!r}); "
                        "the other methods prepare their data when they train")
    module = method_of(method)
    config = load_config(module.Config, str(path), overrides)
    return module.prepare(config, module.check(config))


def prepare_summary(prepared: list[tuple[str, Prepared]]) -> str:
    """One line per split: rows, tokens, trained tokens, and the cached file."""
    return "\n".join(f"{name}: {p.rows:,} rows, {p.tokens:,} tokens, {p.trained_tokens:,} trained tokens; "
                     f"cache {p.path}" for name, p in prepared)
