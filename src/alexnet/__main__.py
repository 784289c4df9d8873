"""The `alexnet` command (and `python -m alexnet`). Ctrl-C and SIGTERM get their one line from the
first instant: importing PyTorch takes ~2 s, in which Ctrl-C would otherwise print a traceback and
SIGTERM end the process without a word."""

import signal
import sys

from .stopping import Terminated, sigterm_unwinds


def main() -> int:
    try:
        with sigterm_unwinds():
            from .cli import main as run_command
    except Terminated:
        print("alexnet: stopped by SIGTERM", file=sys.stderr)
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        print("alexnet: interrupted", file=sys.stderr)
        return 128 + signal.SIGINT
    return run_command()


if __name__ == "__main__":
    sys.exit(main())
