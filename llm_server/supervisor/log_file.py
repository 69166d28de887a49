"""The daemon's one log file, owned by the supervisor.

A ``QueueListener`` drains the children's multiprocessing queue into a
``TimedRotatingFileHandler`` that rolls over at midnight to ``<log_filename>-YYYYMMDD`` and never
deletes anything; ``StreamPump`` turns each child's raw output pipe into log records.
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import threading
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from ..common.logs import FORMAT, install, stamped


STOP_TIMEOUT_S = 5.0


def rotated_name(default_name: str) -> str:
    """``TimedRotatingFileHandler`` names backups ``<file>.<suffix>``; we want ``<file>-<suffix>``."""
    base, _, suffix = default_name.rpartition(".")
    return f"{base}-{suffix}"


def make_file_handler(path: Path) -> logging.handlers.TimedRotatingFileHandler:
    """A handler that rolls over at local midnight to ``NAME-YYYYMMDD`` and keeps every file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.handlers.TimedRotatingFileHandler(path, when="midnight", backupCount=0, encoding="utf-8")
    handler.suffix = "%Y%m%d"
    handler.namer = rotated_name
    handler.setFormatter(logging.Formatter(FORMAT))
    return stamped(handler)


class LogHub:
    """The supervisor's side: the queue children write to and the listener that writes the file.

    The supervisor's own records go straight to the file handler (its lock orders them with the
    listener's writes), so a line it logs before telling a child to act is in the file before
    anything the child logs in answer. The other direction is ``flush``: once a child has
    exited, its records are in the queue's pipe, and ``flush`` waits until the listener has
    written them, so "http stopped" comes before the supervisor's next step.
    """

    def __init__(self, path: Path, level: str, queue: Any) -> None:
        self.queue = queue
        self.file_handler = make_file_handler(path)
        self.listener = _FlushingListener(queue, self.file_handler)
        self.level = level

    def start(self) -> None:
        self.listener.start()
        install(self.file_handler, self.level)

    def flush(self, timeout: float = 2.0) -> bool:
        """Wait until every record already in the queue's pipe is in the file."""
        return self.listener.flush(timeout)

    def relay(self, conn: Connection) -> None:
        """Write the records a distributed worker's rank 0 sends over ``conn`` until it closes
        (it is no spawned child, so it has no share in the queue)."""
        while True:
            try:
                record = conn.recv()
            except (EOFError, OSError):
                return
            self.file_handler.handle(record)

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """Flush everything still queued (waiting at most ``timeout``), then close the file.

        Bounded because a child killed (SIGKILL) while its feeder thread wrote to the queue leaves
        the queue's cross-process write lock held for good: the listener's stop marker can then
        never be sent, and neither can anything else. The supervisor must still exit, so the wait
        ends, and the queue's own feeder thread is not waited for at exit either."""
        self.queue.cancel_join_thread()
        if not self.listener.stop_within(timeout):
            logging.getLogger("llm_server.supervisor").warning(
                "the log queue did not drain in %.0f s (a child killed while it wrote to it)", timeout
            )
        logging.getLogger().removeHandler(self.file_handler)
        self.file_handler.close()


class _FlushingListener(logging.handlers.QueueListener):
    """A ``QueueListener`` that also answers flush markers sent through the queue itself."""

    def __init__(self, queue: Any, handler: logging.Handler) -> None:
        super().__init__(queue, handler, respect_handler_level=False)
        self._markers: dict[int, threading.Event] = {}
        self._next_marker = 0
        self._lock = threading.Lock()

    def flush(self, timeout: float) -> bool:
        with self._lock:
            self._next_marker += 1
            marker = self._next_marker
            done = self._markers[marker] = threading.Event()
        try:
            self.queue.put_nowait(logging.makeLogRecord({"flush_marker": marker}))
            return done.wait(timeout)
        finally:
            with self._lock:
                self._markers.pop(marker, None)

    def stop_within(self, timeout: float) -> bool:
        """``QueueListener.stop`` with a bounded wait for its thread (a daemon thread: one left
        blocked on the queue does not hold up the exit); whether it stopped."""
        self.enqueue_sentinel()
        thread = self._thread  # QueueListener's own, started by ``start``
        if thread is None:
            return True
        thread.join(timeout)
        self._thread = None
        return not thread.is_alive()

    def handle(self, record: logging.LogRecord) -> None:
        marker = getattr(record, "flush_marker", None)
        if marker is None:
            super().handle(record)
            return
        with self._lock:
            done = self._markers.get(marker)
        if done is not None:  # marker 0, from a child starting its queue (``setup_child_logging``), has none
            done.set()


class StreamPump(threading.Thread):
    """Reads a child's output pipe and logs one record per line, naming the source."""

    def __init__(self, conn: Connection, source: str, level: int = logging.WARNING) -> None:
        super().__init__(name=f"pump-{source}", daemon=True)
        self._fd = os.dup(conn.fileno())
        conn.close()
        self.source = source
        self.level = level
        self._log = logging.getLogger("llm_server.output")

    def run(self) -> None:
        with open(self._fd, "rb", closefd=True) as stream:
            for raw in stream:
                line = raw.rstrip(b"\r\n").decode("utf-8", errors="backslashreplace")
                if line.strip():
                    self._log.log(self.level, "%s: %s", self.source, line)
