"""Ctrl-C (SIGINT) and SIGTERM (preemption) as a long command's orderly stop: the work in hand
finishes, what it made is recorded, and the command ends in one line that says how to carry on."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}


class Interrupted(Exception):
    """SIGINT or SIGTERM arrived `where` ('at epoch 3, step 7': a checkpoint of that step has been
    written; 'before the first step', 'in the final evaluation': nothing a checkpoint would keep was lost).
    `then`: what to do next, where the command line cannot tell it from `run_dir`."""

    def __init__(self, run_dir: Path, signum: int, where: str, then: str | None = None) -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name} {where}")
        self.run_dir, self.signum, self.then = run_dir, signum, then


class StopSignals:
    """SIGINT and SIGTERM while a command runs.

    Inside `deferred()` (the loop whose steps must finish whole) the first is remembered in `signum`:
    the loop looks at it between steps, records its work and raises Interrupted. Elsewhere (nothing
    that a record would keep is in hand) it stops at once, raising Interrupted `where`.
    A second signal: the default action, at once.
    """

    def __init__(self, run_dir: Path, then: str | None = None) -> None:
        self.run_dir, self.then, self.signum, self.where = run_dir, then, 0, "before the first step"
        self._deferred = False
        self._old: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():  # the only thread Python gives signals to
            for s in STOP_SIGNALS:
                self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.signum = signum
        for s in self._old:
            signal.signal(s, signal.SIG_DFL)
        if not self._deferred:
            raise self.interrupted(self.where)

    def interrupted(self, where: str) -> Interrupted:
        return Interrupted(self.run_dir, self.signum or signal.SIGTERM, where, self.then)

    @contextlib.contextmanager
    def deferred(self, after: str) -> Iterator[None]:
        """Signals are remembered, not raised; one that came after the loop's last look raises `after`."""
        self._deferred = True
        try:
            yield
        finally:
            self._deferred = False
        if self.signum:
            raise self.interrupted(after)

    def __exit__(self, *exc: object) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)


class Terminated(KeyboardInterrupt):
    """SIGTERM where no orderly stop is set up (evaluate, predict, features, ...): it unwinds as Ctrl-C
    does, so that a file being written atomically is left whole, and the command line says it in one line."""


def _raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated


@contextlib.contextmanager
def sigterm_unwinds() -> Iterator[None]:
    """SIGTERM raises Terminated in here (StopSignals, inside, takes over for a while); outside, as before."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


@contextlib.contextmanager
def held() -> Iterator[None]:
    """SIGINT and SIGTERM that come in here are noted, and sent again as it ends, to the handlers of
    before. Processes forked in here start with them blocked: each unblocks them once it has set its
    own handlers (a signal it ignores by then is dropped)."""
    if threading.current_thread() is not threading.main_thread() or None in map(signal.getsignal, STOP_SIGNALS):
        yield  # only the main thread sets handlers, and one set outside Python cannot be put back
        return
    came: list[int] = []
    old = {s: signal.signal(s, lambda signum, frame: came.append(signum)) for s in STOP_SIGNALS}
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS) if hasattr(signal, "pthread_sigmask") else None
    try:
        yield
    finally:
        if mask is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        for s, handler in old.items():
            signal.signal(s, handler)
        for s in came:
            signal.raise_signal(s)
