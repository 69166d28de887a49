"""Log plumbing every process shares: the format, the TRACE level, the request id stamped on
each record, and how a child hands its records and raw output to the supervisor.

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


def _queue_handler(queue: Any) -> logging.Handler:
    handler = logging.handlers.QueueHandler(queue)
    handler.addFilter(RequestIdFilter())
    return handler


def setup_child_logging(queue: Any, level: str, output: Connection | None) -> None:
    """Route this child's records to the supervisor, and its fds 1 and 2 into ``output``."""
    root = logging.getLogger()
    root.handlers[:] = [_queue_handler(queue)]
    root.setLevel(LEVELS[level])
    logging.captureWarnings(True)
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
