"""Log plumbing every process shares: the format, the TRACE level, the request id stamped on
each record, and how a child hands its records and raw output to the supervisor.

Every process sets up its root logger here (``install``), with one handler: the supervisor its
file, a child the queue, a distributed rank 0 its connection, another rank stderr.
The supervisor alone writes the log file (``llm_server.supervisor.log_file``). Children put
records on its multiprocessing queue (``setup_child_logging``), and whatever a child writes to its
file descriptors 1 and 2 (Python tracebacks, native libraries, MCP servers) goes into a pipe the
supervisor reads line by line, so even a child that dies hard leaves its last words in the log.
"""

from __future__ import annotations

import contextvars
import logging
import logging.handlers
import os
import sys
from multiprocessing.connection import Connection
from typing import Any

TRACE = 5
logging.addLevelName(TRACE, "TRACE")

LEVELS = {
    "trace": TRACE,
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}
FORMAT = "%(asctime)s %(levelname)s %(processName)s[%(process)d] %(request_id)s %(message)s"

# The request a task is working on, stamped on every record it logs.
current_request: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")


class RequestIdFilter(logging.Filter):
    """Give every record a ``request_id`` (explicit ``extra`` wins over the context)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not getattr(record, "request_id", None):
            record.request_id = current_request.get()
        return True


def stamped(handler: logging.Handler) -> logging.Handler:
    """``handler``, giving every record it handles a request id."""
    handler.addFilter(RequestIdFilter())
    return handler


def queue_handler(queue: Any) -> logging.Handler:
    return stamped(logging.handlers.QueueHandler(queue))


def install(handler: logging.Handler, level: str) -> None:
    """Set up this process's root logger: the one place any process of the daemon does it."""
    root = logging.getLogger()
    root.handlers[:] = [handler]
    set_level(level)
    logging.captureWarnings(True)


def set_level(level: str) -> None:
    logging.getLogger().setLevel(LEVELS[level])


class ConnectionQueue:
    """A ``QueueHandler`` queue that sends each record over a connection: the log records of a
    distributed worker's rank 0, which is no spawned child and has no share in the queue."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn

    def put_nowait(self, record: logging.LogRecord) -> None:
        try:
            self.conn.send(record)
        except (OSError, ValueError):
            pass


def stderr_handler(process_name: str) -> logging.Handler:
    """Lines on stderr, for a rank ``mlx.launch`` forwards to the supervisor's log as output."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(FORMAT.replace("%(processName)s", process_name)))
    return stamped(handler)


def setup_child_logging(queue: Any, level: str, output: Connection | None) -> None:
    """Route this child's records to the supervisor, and its fds 1 and 2 into ``output``."""
    install(queue_handler(queue), level)
    # The queue starts its feeder thread at the first put. Started lazily, that could be while
    # the interpreter finalizes (a record logged at exit, e.g. by asyncio's "Task was destroyed"),
    # where starting a thread hangs the process; so it starts now, with a record the supervisor's
    # listener drops (a flush marker nobody waits for: ``log_file._FlushingListener``).
    queue.put_nowait(logging.makeLogRecord({"flush_marker": 0}))
    if output is not None:
        fd = output.fileno()
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        # Line-buffered so a crash loses at most a partial line.
        sys.stdout = open(1, "w", buffering=1, closefd=False, errors="backslashreplace")
        sys.stderr = open(2, "w", buffering=1, closefd=False, errors="backslashreplace")
