"""The one exception type the command line turns into a one-line message instead of a traceback, the
line it prints for a failed write, and the one-line warning given where fast kernels cannot run and
slower ones stand in."""

import warnings


class UserError(Exception):
    """Bad input from the person running alexnet: a wrong path, an unknown preset, an invalid number."""


def one_line(error: UserError | OSError) -> str:
    """What to tell of `error`: a full disk, a permission, a file that vanished say which file."""
    if isinstance(error, OSError):
        return f"{error.strerror or error}{f': {error.filename}' if error.filename else ''}"
    return str(error)


def first_line(error: BaseException) -> str:
    """The first line of `error`'s message, or its type where it has none."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def warn_slower(what: str, error: BaseException, stacklevel: int = 3) -> str:
    """Say in one line that `what` cannot run here (the first line of `error`'s message, or its type)
    and that something slower runs instead; returns that reason, for the caller to remember so that it
    says so once."""
    why = first_line(error)
    warnings.warn(f"{what} cannot run here, so it is slower: {why}", stacklevel=stacklevel)
    return why
