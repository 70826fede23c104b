"""Rewards that PPO, GRPO and RLOO share: a trained reward model, reward functions (verifiable
rewards), or a weighted sum of both.

A reward function is a Python callable `fn(prompts, responses, rows) -> list[float]`: the prompt
texts, the sampled responses and the prompts' data rows (every column of the prompt file, so a
row's `answer` is at hand), one float per response. Two ship with tunekit:

- `exact_answer`: 1.0 when the response's answer equals the row's `column` (the text after the last
  `marker`, or with no marker the last number in the response), else 0.0;
- `regex`: 1.0 when `pattern` matches the response, else 0.0.

Any other is named `module:function` or `path/to/file.py:function` and is checked when the recipe
is validated, before a model loads. What a function returns is checked on every call: a raise, a
value that is not a number, NaN or infinity, or the wrong count stops the run with one line
(RewardFunctionError, exit 1), and the last complete checkpoint stays as it was.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import io
import math
import numbers
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import Field, model_validator

from tunekit.config import Section
from tunekit.errors import TrainingFailure, UserError
from tunekit.jsontypes import Row

BUILT_INS = ("exact_answer", "regex")
NUMBER = re.compile(r"[-+]?\d[\d,]*(?:\.\d+)?")


class RewardFunctionSection(Section):
    """One entry of `rlhf.reward_fn`: a built-in with its arguments, or a callable of your own."""

    name: str = Field(description="exact_answer, regex, module:function or path/to/file.py:function")
    weight: float = Field(1.0, description="its weight in the summed reward")
    column: str = Field("answer", description="exact_answer: the prompt row's column that holds the answer")
    marker: str | None = Field(
        None, description="exact_answer: the answer is the text after the last marker (e.g. 'The answer is'); "
                          "null: the last number in the response")
    pattern: str | None = Field(None, description="regex: the pattern a response must match (re.search)")
    ignore_case: bool = Field(False, description="regex: match case-insensitively; exact_answer: compare text so")

    @model_validator(mode="after")
    def _arguments_fit(self) -> RewardFunctionSection:
        if self.name not in BUILT_INS and ":" not in self.name:
            raise ValueError(f"{self.name!r} is neither a built-in ({', '.join(BUILT_INS)}) nor module:function "
                             "or path/to/file.py:function")
        if self.name == "regex":
            if not self.pattern:
                raise ValueError("regex needs pattern: the regular expression a response must match")
            try:
                re.compile(self.pattern)
            except re.error as err:
                raise ValueError(f"pattern {self.pattern!r} is not a regular expression ({err})") from None
        elif self.pattern is not None:
            raise ValueError(f"pattern is an argument of regex, not of {self.name}")
        if self.name != "exact_answer" and (self.marker is not None or self.column != "answer"):
            raise ValueError(f"column and marker are arguments of exact_answer, not of {self.name}")
        return self

    @property
    def label(self) -> str:
        """The component's name in metrics.jsonl (`reward/<label>`): the built-in or function name."""
        return self.name if self.name in BUILT_INS else self.name.rsplit(":", 1)[1]


# ---------------------------------------------------------------------------------------------
# The built-ins


def answer_of(response: str, marker: str | None) -> str | None:
    """The text after the last marker (up to the end of its line, without a closing full stop), or
    with no marker the last number; None when there is none."""
    if marker:
        at = response.rfind(marker)
        if at < 0:
            return None
        return response[at + len(marker):].strip().split("\n")[0].strip().rstrip(".").strip()
    numbers_found = NUMBER.findall(response)
    return numbers_found[-1] if numbers_found else None


def same_answer(given: str | None, expected: Any, ignore_case: bool = False) -> bool:
    """Numbers compare as numbers (`1,531` = `1531.0`), anything else as stripped text."""
    if given is None or expected is None:
        return False
    want = str(expected).strip()
    try:
        return float(given.replace(",", "")) == float(want.replace(",", ""))
    except ValueError:
        return given.casefold() == want.casefold() if ignore_case else given == want


def exact_answer(responses: list[str], rows: list[Row], column: str, marker: str | None,
                 ignore_case: bool = False) -> list[float]:
    return [float(same_answer(answer_of(r, marker), row.get(column), ignore_case)) for r, row in zip(responses, rows)]


def regex(responses: list[str], pattern: str, ignore_case: bool = False) -> list[float]:
    compiled = re.compile(pattern, re.IGNORECASE if ignore_case else 0)
    return [float(compiled.search(r) is not None) for r in responses]


# ---------------------------------------------------------------------------------------------
# Loading a user's function


def load_callable(spec: str, where: str) -> Callable[..., Any]:
    """`module:function` (imported) or `path/to/file.py:function` (loaded from the file); a wrong
    name is one line."""
    target, _, attribute = spec.rpartition(":")
    if not target or not attribute:
        raise UserError(f"{where}: {spec!r}: expected module:function or path/to/file.py:function")
    if target.endswith(".py"):
        path = Path(target)
        if not path.is_file():
            raise UserError(f"{where}: {spec!r}: no file {target}")
        name = f"tunekit_reward_{path.stem}_{abs(hash(str(path.resolve())))}"
        module = sys.modules.get(name)
        if module is None:
            loader_spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(loader_spec)
            users_import(lambda: loader_spec.loader.exec_module(module), f"{where}: {spec!r}: loading {target}")
            sys.modules[name] = module
    else:
        if "" not in sys.path and str(Path.cwd()) not in sys.path:
            sys.path.insert(0, str(Path.cwd()))  # as `python -m` does: a module beside the recipe's user
        try:
            module = users_import(lambda: importlib.import_module(target), f"{where}: {spec!r}: importing {target}")
        except ImportError as err:
            raise UserError(f"{where}: {spec!r}: cannot import {target} ({first_line(err)}); put it on PYTHONPATH or "
                            "name a file: path/to/file.py:function") from None
    function = getattr(module, attribute, None)
    if not callable(function):
        found = "not callable" if function is not None else "not found"
        raise UserError(f"{where}: {spec!r}: {attribute} {found} in {target}")
    return function


def users_import(action: Callable[[], Any], what: str) -> Any:
    """Run the import of a user's module; whatever it raises, or a `sys.exit` (a script that parses
    its arguments at import), is one line. What it prints meanwhile is held back, and shown only
    when the import succeeds; on failure the last line it printed (argparse's error) is quoted."""
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(printed):
            result = action()
    except ImportError:
        raise
    except (Exception, SystemExit) as err:  # noqa: BLE001 - the user's code: say what broke, in one line
        said = [line.strip() for line in printed.getvalue().splitlines() if line.strip()]
        shown = f" after printing {said[-1][:200]!r}" if said else ""
        if isinstance(err, SystemExit):
            raise UserError(f"{what} called sys.exit({err.code!r}){shown}; a reward module must not exit at import") from None
        raise UserError(f"{what} raised {type(err).__name__}: {first_line(err)}{shown}") from None
    sys.stdout.write(printed.getvalue())
    return result


def first_line(err: BaseException) -> str:
    return next((line.strip() for line in str(err).splitlines() if line.strip()), "")


def check_reward_functions(sections: list[RewardFunctionSection], source: str) -> None:
    """Load every user function once, so a wrong name fails at validate time (exit 2)."""
    for i, section in enumerate(sections):
        if section.name not in BUILT_INS:
            load_callable(section.name, f"{source}: rlhf.reward_fn.{i}.name")


# ---------------------------------------------------------------------------------------------
# Scoring


class RewardFunctionError(TrainingFailure):
    """A reward function raised or returned something unusable: one line, exit 1."""


class RewardFunction:
    """One configured reward function, its output checked on every call."""

    def __init__(self, section: RewardFunctionSection) -> None:
        self.section = section
        self.label = section.label
        self.function = None if section.name in BUILT_INS else load_callable(section.name, "rlhf.reward_fn")

    def __call__(self, prompts: list[str], responses: list[str], rows: list[Row]) -> list[float]:
        s = self.section
        if s.name == "exact_answer":
            return exact_answer(responses, rows, s.column, s.marker, s.ignore_case)
        if s.name == "regex":
            return regex(responses, s.pattern or "", s.ignore_case)
        try:
            values = self.function(prompts, responses, rows)
        except Exception as err:  # noqa: BLE001 - the user's code: one line that says what it raised
            first = (str(err).splitlines() or [""])[0]
            raise RewardFunctionError(f"rlhf.reward_fn {s.name} raised {type(err).__name__}: {first}") from None
        return self.checked(values, len(responses))

    def checked(self, values: Any, count: int) -> list[float]:
        name = self.section.name
        try:
            if isinstance(values, (str, bytes, dict)):
                raise TypeError
            values = list(values)
        except TypeError:
            raise RewardFunctionError(f"rlhf.reward_fn {name} returned {type(values).__name__}, expected a list of "
                                      f"{count} floats") from None
        if len(values) != count:
            raise RewardFunctionError(f"rlhf.reward_fn {name} returned {len(values)} values for {count} responses; "
                                      "return one float per response")
        out = []
        for i, value in enumerate(values):
            if not isinstance(value, numbers.Real) and hasattr(value, "item"):
                try:
                    value = value.item()  # a one-element tensor or numpy array
                except (ValueError, RuntimeError):
                    pass
            if not isinstance(value, numbers.Real):
                raise RewardFunctionError(f"rlhf.reward_fn {name} returned {repr(value)[:40]} ({type(value).__name__}) for "
                                          f"response {i}; expected a float")
            if not math.isfinite(float(value)):
                raise RewardFunctionError(f"rlhf.reward_fn {name} returned {float(value)} for response {i}; "
                                          "expected a finite float")
            out.append(float(value))
        return out


class Rewards:
    """The reward of a response: `reward_model_weight` x the reward model's score (when there is
    one) plus each function's weight x its value. `parts` holds the components of the last call,
    unweighted, by their metric name (`reward/model`, `reward/exact_answer`, ...), when there are
    reward functions."""

    def __init__(self, model: Any, model_weight: float, functions: list[RewardFunction]) -> None:
        self.model, self.model_weight, self.functions = model, model_weight, functions
        self.parts: dict[str, list[float]] = {}

    def to(self, device: Any) -> Rewards:
        if self.model is not None:
            self.model.to(device)
        return self

    def score(self, prompts: list[Any], responses: list[str]) -> Any:
        """The summed reward as a float tensor; `prompts` are tunekit.rl.rollout.Prompt objects (their
        text and data row)."""
        import torch

        total = torch.zeros(len(responses), dtype=torch.float32)
        parts: dict[str, list[float]] = {}
        if self.model is not None:
            scores = self.model.score(prompts, responses).float()
            parts["reward/model"] = scores.tolist()
            total += self.model_weight * scores
        texts = [p.shown for p in prompts]
        rows = [p.row for p in prompts]
        for function in self.functions:
            values = function(texts, responses, rows)
            parts[f"reward/{function.label}"] = values
            total += function.section.weight * torch.tensor(values, dtype=torch.float32)
        self.parts = parts if self.functions else {}  # a reward model alone: its score is the reward
        return total


def component_means(reward: Any) -> dict[str, float]:
    """The mean of each reward component of the last scoring call (none for a reward model alone)."""
    return {key: sum(values) / max(len(values), 1) for key, values in getattr(reward, "parts", {}).items()}


def build_rewards(reward_model: str | None, model_weight: float, sections: list[RewardFunctionSection],
                  batch_size: int) -> Rewards:
    from tunekit.rl.rollout import RewardModel

    model = RewardModel(reward_model, batch_size) if reward_model else None
    return Rewards(model, model_weight, [RewardFunction(s) for s in sections])


def as_sections(value: Any) -> Any:
    """The shorthands of `rlhf.reward_fn`: a name, or one mapping, stand for a list of one."""
    if value is None:
        return []
    if isinstance(value, str):
        return [{"name": value}]
    if isinstance(value, dict):
        return [value]
    return value
