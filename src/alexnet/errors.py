"""The one exception type the command line turns into a one-line message instead of a traceback."""


class UserError(Exception):
    """Bad input from the person running alexnet: a wrong path, an unknown preset, an invalid number."""
