"""The training methods, one module each, and METHODS: the one explicit list of them.

Each `Method` record names what a command is made of: its recipe `Config`, `check` (read and
validate the data; no model loads), `setup` (its parts for the run skeleton, tunekit.training.execute)
and the optional parts (`prepare` for `tunekit data prepare`, `eval_run` / `predict_run` for a
finished run's own task). Every other list of methods is derived from METHODS: the CLI's training
commands, the `method:` key's check, the run kinds that score data files, `data prepare`'s.
Adding a method is its module, its recipes, and one record here.
"""

from __future__ import annotations

import difflib
from typing import TYPE_CHECKING, Any

from tunekit.errors import UserError
from tunekit.method import Method
from tunekit.methods import classify, dpo, pretrain, qa, reward, rlhf, sft

if TYPE_CHECKING:
    from tunekit.config import Recipe
    from tunekit.data.prepare import Prepared


METHODS = (classify.METHOD, qa.METHOD, pretrain.METHOD, sft.METHOD, reward.METHOD, dpo.METHOD, rlhf.METHOD)
NAMES = tuple(m.name for m in METHODS)


def method_named(name: str) -> Method:
    """The method of a command, or one line naming the ones there are."""
    for method in METHODS:
        if method.name == name:
            return method
    raise UserError(f"unknown method {name!r}; one of: {', '.join(NAMES)}")


def check_method_key(named: Any, command: str, source: str) -> None:
    """A recipe's `method:` must be the command it was given to (before its keys, which differ per method)."""
    if named is None or named == command:
        return
    if not (isinstance(named, str) and named.isidentifier()):
        raise UserError(f"{source}: method: expected {command!r} (the command it was given to), got {named!r}")
    if named not in NAMES:
        close = difflib.get_close_matches(named, NAMES, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise UserError(f"{source}: method: {named!r} is not a tunekit command; {hint}"
                        f"for `tunekit {command}` write method: {command} (commands: {', '.join(NAMES)})")
    raise UserError(f"{source}: recipe is for `tunekit {named}` (method: {named}), not `tunekit {command}`; "
                    f"run `tunekit {named} {source}` (`tunekit lora` runs any method's recipe with an adapter)")


def load_recipe(method: Method, recipe: str, overrides: list[str] = ()) -> Recipe:
    """A recipe read for `method`: its `method:` key checked first, then every key."""
    from tunekit.config import read_recipe, validate_config

    path, data = read_recipe(recipe, overrides)
    check_method_key(data.get("method"), method.name, str(path))
    config = validate_config(method.Config, data, str(path))
    config.args  # noqa: B018 - built now, so that a value the arguments refuse is reported before any model loads
    return config


def with_own_task(command: str, method_name: str | None, what: str, causal: bool) -> Method:
    """The method of a run whose data files `command` scores (eval --data, predict), or one line."""
    method = next((m for m in METHODS if m.name == method_name), None)
    if method is None or method.eval_run is None or method.predict_run is None:
        kinds = ", ".join(m.name for m in METHODS if m.eval_run is not None)
        hint = "; for a causal LM use `tunekit eval --task` or `tunekit generate`" if causal else ""
        raise UserError(f"{what}; `tunekit {command}` reads data files of {kinds} runs{hint}")
    return method


def data_prepare(recipe: str, overrides: list[str]) -> list[tuple[str, Prepared]]:
    """`tunekit data prepare`: the recipe's data checked, tokenised and cached, nothing trained."""
    from tunekit.config import find_recipe, read_yaml_mapping

    path = find_recipe(recipe)
    name = read_yaml_mapping(path).get("method") or path.parent.name
    method = next((m for m in METHODS if m.name == name), None)
    if method is None or method.prepare is None:
        covered = " and ".join(m.name for m in METHODS if m.prepare is not None)
        raise UserError(f"{path}: data prepare covers {covered} recipes (this one is {name!r}); "
                        "the other methods prepare their data when they train")
    config = load_recipe(method, str(path), overrides)
    return method.prepare(config, method.check(config))


def prepare_summary(prepared: list[tuple[str, Prepared]]) -> str:
    """One line per split: rows, tokens, trained tokens, and the cached file."""
    return "\n".join(f"{name}: {p.rows:,} rows, {p.tokens:,} tokens, {p.trained_tokens:,} trained tokens; "
                     f"cache {p.path}" for name, p in prepared)
