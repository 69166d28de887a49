"""Whether the serving model worker is alive and making progress, and how many restarts are left.

While serving, the arbiter pings the worker over its control pipe. A worker whose event loop does
not answer for ``worker_stall_timeout_s``, or whose MLX thread reports work pending without
progress for that long, is stuck though alive (``Liveness.stuck``); the arbiter then dumps its
stacks, kills and restarts it. The reading starts afresh whenever serving (re)starts. Restarts of
either child come from one ``RestartBudget``: ``worker_restarts`` within any
``worker_restart_window_s``. Both take a clock, so tests drive them without sleeping.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Callable

Clock = Callable[[], float]


class Liveness:
    """The serving worker's last answer to a ping, and its MLX thread's stall reading."""

    def __init__(self, clock: Clock = time.monotonic) -> None:
        self._clock = clock
        self.last_pong = clock()
        self.engine_stalled_s = 0.0

    def reset(self) -> None:
        """Serving (re)starts: a reading of a worker that is gone says nothing about its successor."""
        self.last_pong = self._clock()
        self.engine_stalled_s = 0.0

    def pong(self, engine_stalled_s: float) -> None:
        self.last_pong = self._clock()
        self.engine_stalled_s = engine_stalled_s

    def stuck(self, stall_s: float) -> str | None:
        """Why the worker counts as stuck, or None."""
        silent = self._clock() - self.last_pong
        if silent > stall_s:
            return f"its event loop has not answered a ping for {silent:.0f} s"
        if self.engine_stalled_s > stall_s:
            return f"its MLX thread has had work without progress for {self.engine_stalled_s:.0f} s"
        return None


class RestartBudget:
    """At most ``limit`` restarts within any ``window_s``: a restart older than that is given back."""

    def __init__(self, limit: int, window_s: float, clock: Clock = time.monotonic) -> None:
        self.limit = limit
        self.window_s = window_s
        self._clock = clock
        self._times: deque[float] = deque()  # when the restarts still in the window were taken

    def take(self) -> bool:
        """Spend one restart; False (and nothing spent) when none is left."""
        now = self._clock()
        while self._times and now - self._times[0] > self.window_s:
            self._times.popleft()
        if len(self._times) >= self.limit:
            return False
        self._times.append(now)
        return True

    @property
    def left(self) -> int:
        """Restarts left, as of the last ``take``."""
        return self.limit - len(self._times)
