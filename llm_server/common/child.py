"""What every spawned child does first, before its real work.

Children are built in the supervisor and started with the spawn method, so this runs in a fresh
interpreter: name the process for ``ps``, leave signals to the supervisor (Ctrl+C reaches the
whole process group, and the supervisor turns it into an ordered shutdown), and route logging
and raw output to the supervisor's single log file.

``run_child`` is every child's process target: it imports the child's real entry point by module
path inside the child, so the supervisor itself never imports Sanic, MCP or MLX.
"""

from __future__ import annotations

import importlib
import signal
from multiprocessing.connection import Connection
from typing import Any

from setproctitle import setproctitle

from .logs import setup_child_logging


def prepare_child(role: str, log_queue: Any, log_level: str, output: Connection | None) -> None:
    """Set the process title, ignore SIGINT/SIGTERM, and connect logging and stderr."""
    setproctitle(f"llm-server: {role}")
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    setup_child_logging(log_queue, log_level, output)


def run_child(entry: str, *args: Any) -> None:
    """Import ``"package.module:function"`` here, in the child, and call it with ``args``."""
    module, _, function = entry.partition(":")
    getattr(importlib.import_module(module), function)(*args)
