"""The one exception type that means "the user gave us something we cannot use".

The CLI turns it into a single line on stderr and exit code 2; everything else is a bug or a
training failure (exit code 1).
"""


class UserError(Exception):
    """Bad input: a recipe key, a data file, a command-line argument. The message is shown as is."""


class TrainingFailure(RuntimeError):
    """Training went wrong in a way the user must hear about: one line, exit code 1."""
