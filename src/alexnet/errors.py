"""The one exception type the command line turns into a one-line message instead of a traceback."""


class UserError(Exception):
    """Bad input from the person running alexnet: a wrong path, an unknown preset, an invalid number."""


def first_line(error: BaseException) -> str:
    """An exception's message cut to its first line (its type's name if it has none), for a warning."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0]
