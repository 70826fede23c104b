"""The exceptions the CLI turns into one line and an exit code: bad input (2), a training
failure (1), a run stopped by Ctrl-C after its checkpoint was saved (130). Anything else is a bug.
"""


class UserError(Exception):
    """Bad input: a recipe key, a data file, a command-line argument. The message is shown as is."""


class TrainingFailure(RuntimeError):
    """Training went wrong in a way the user must hear about: one line, exit code 1."""


class Interrupted(Exception):
    """Training stopped on Ctrl-C (or SIGTERM) after saving a checkpoint; the message says where."""


def shown_key(key: object) -> str:
    """A recipe key as an error line shows it: as written, or quoted when it is empty or holds a
    line break or other unprintable or surrounding space (a line break would split the one line)."""
    text = str(key)
    return text if text and text.isprintable() and text.strip() == text else repr(text)
