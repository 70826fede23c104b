"""Whether a value read from YAML fits a dataclass field's annotation (TrainingArguments' fields are
checked this way before the arguments are built), and the annotation in words for the error."""

from __future__ import annotations

import enum
import types
import typing
from typing import Any, Literal


def type_hints(datacls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(datacls)
    except Exception:  # an annotation that does not resolve: check names only
        return {}


def value_fits(value: Any, expected: Any) -> bool:
    if expected is Any:
        return True
    origin = typing.get_origin(expected)
    if origin in (typing.Union, types.UnionType):
        return any(value_fits(value, arg) for arg in typing.get_args(expected))
    if origin is Literal:
        return value in typing.get_args(expected)
    if expected is type(None):
        return value is None
    if expected is bool:
        return isinstance(value, bool)
    if expected is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if expected is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if expected is str:
        return isinstance(value, str)
    if isinstance(expected, type) and issubclass(expected, enum.Enum):
        return value in [m.value for m in expected] or value in [m.name for m in expected]
    if origin in (list, tuple) or expected in (list, tuple):
        return isinstance(value, (list, tuple))
    if origin is dict or expected is dict:
        return isinstance(value, dict)
    return True  # a type we do not model (callables, objects): TrainingArguments checks it


def type_name(expected: Any) -> str:
    origin = typing.get_origin(expected)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(type_name(a) for a in typing.get_args(expected))
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(expected))
    if isinstance(expected, type) and issubclass(expected, enum.Enum):
        return "one of " + ", ".join(repr(m.value) for m in expected)
    if expected is type(None):
        return "null"
    return getattr(expected, "__name__", str(expected))
