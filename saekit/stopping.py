"""Stopping a run on request (Ctrl-C, SIGTERM from a scheduler): a flag the training loop checks between steps.

The library only reads a `StopFlag`; installing signal handlers is the CLI's business (`stop_on_signals`), so
importing or calling saekit from a notebook changes nothing process-wide.
"""

from __future__ import annotations

import contextvars
import signal
import threading
from contextlib import contextmanager
from typing import Iterator, Optional

EXIT_CODES = {"SIGINT": 130, "SIGTERM": 143}
"""The shell's convention: 128 + the signal number."""


class StopFlag:
    """Set to ask training to stop at the next step boundary (after writing a checkpoint).

    `armed` is true while a training loop is watching the flag; a signal outside training (cache build,
    evaluation) has nothing to stop cleanly, so the CLI's handler interrupts at once instead.
    """

    def __init__(self) -> None:
        self._event = threading.Event()
        self.reason: Optional[str] = None
        self.armed = 0

    def set(self, reason: str = "stop") -> None:
        self.reason = self.reason or reason
        self._event.set()

    def is_set(self) -> bool:
        return self._event.is_set()

    @contextmanager
    def watching(self) -> Iterator["StopFlag"]:
        self.armed += 1
        try:
            yield self
        finally:
            self.armed -= 1


class TrainingInterrupted(Exception):
    """Training stopped on request at `step`, with a checkpoint of that step on disk."""

    def __init__(self, step: int, reason: Optional[str]):
        super().__init__(f"interrupted at step {step}; run the same command to resume")
        self.step, self.reason = step, reason

    @property
    def exit_code(self) -> int:
        return EXIT_CODES.get(self.reason or "", 130)


class Interrupted(KeyboardInterrupt):
    """A signal outside the training loop (nothing to checkpoint): stops the command at once."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason

    @property
    def exit_code(self) -> int:
        return EXIT_CODES.get(self.reason, 130)


_current: contextvars.ContextVar[Optional[StopFlag]] = contextvars.ContextVar("saekit_stop_flag", default=None)


def current_stop_flag() -> Optional[StopFlag]:
    """The flag of the command running in this context (set by `stop_on_signals`), or None."""
    return _current.get()


@contextmanager
def stop_on_signals(flag: Optional[StopFlag] = None) -> Iterator[StopFlag]:
    """For the CLI's process only: SIGINT and SIGTERM set the flag while training watches it, else interrupt at once;
    the previous handlers are restored on exit. A second signal while a stop is pending interrupts at once too."""
    flag = flag or StopFlag()
    if threading.current_thread() is not threading.main_thread():  # signal handlers can only be set there
        yield flag
        return

    def handler(signum, frame) -> None:
        name = signal.Signals(signum).name
        if flag.armed and not flag.is_set():
            flag.set(name)
            return
        raise Interrupted(name)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    token = _current.set(flag)
    try:
        yield flag
    finally:
        _current.reset(token)
        for sig, old in previous.items():
            signal.signal(sig, old)
