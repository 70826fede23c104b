"""One module per training command. `method_of` maps a command to its module (an explicit list, no
registry) and imports only that one, so a command never pays for the others' imports."""

from __future__ import annotations

from types import ModuleType

from tunekit.errors import UserError

METHODS = ("classify", "qa", "pretrain", "sft", "reward", "dpo", "rlhf")


def method_of(command: str) -> ModuleType:
    """The module of a training command."""
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
