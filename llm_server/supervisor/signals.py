"""The supervisor's signals: a queue and a wake pipe (gunicorn's arbiter), and the stop signals
blocked while a child is spawned.

A handler does nothing but append the signal and write one byte to the pipe ("no logging in a
handler"); the arbiter's loop waits on ``wake_fd`` with its children and, at every wake-up,
takes *all* queued signals in order (``drain``), so two signals in one wake-up are two signals.

A Ctrl+C while a child is still importing would kill it with a traceback, so a child starts with
SIGINT/SIGTERM blocked (``blocked_for_spawn``; a mask survives fork and exec) and drops what came
meanwhile itself (``child_main``). Blocked, not ignored: only the spawning thread, and a signal
that comes meanwhile stays pending for the supervisor instead of being lost.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator
from typing import Any

from ..common.child import run_child

STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}


class SignalQueue:
    """Signals recorded by the handler, for the loop to take."""

    def __init__(self) -> None:
        self._queue: list[int] = []
        self.wake_fd, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)

    def install(self) -> None:
        """Record SIGTERM and SIGINT from now on."""
        os.set_blocking(self.wake_fd, False)
        for signum in STOP_SIGNALS:
            signal.signal(signum, self._record)

    def _record(self, signum: int, frame: Any) -> None:
        self._queue.append(signum)
        try:
            os.write(self._wake_w, b"\0")
        except OSError:
            pass

    @property
    def pending(self) -> bool:
        return bool(self._queue)

    def drain(self) -> list[int]:
        """Every signal recorded since the last call, in order; the wake pipe emptied."""
        try:
            while os.read(self.wake_fd, 1024):
                pass
        except BlockingIOError:
            pass
        taken = []
        while self._queue:
            taken.append(self._queue.pop(0))
        return taken


@contextlib.contextmanager
def blocked_for_spawn() -> Iterator[None]:
    """Block the stop signals in this thread while a child process is started."""
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


def child_main(*args: Any) -> None:
    """A spawned child's first act: drop the stop signals that came while it started (they were
    blocked, see ``blocked_for_spawn``) and unblock them; ``run_child`` then decides what they mean."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)  # a pending one is discarded here
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    run_child(*args)
