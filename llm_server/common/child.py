"""What every spawned child does first, before its real work.

Children are built in the supervisor and started with the spawn method, so this runs in a fresh
interpreter: name the process for ``ps``, leave signals to the supervisor (Ctrl+C reaches the
whole process group, and the supervisor turns it into an ordered shutdown), and route logging
and raw output to the supervisor's single log file.

Signals are left alone with a handler that does nothing, not with ``SIG_IGN``: an ignored signal
stays ignored through ``exec``, so every MCP server the worker starts would ignore SIGTERM too
and could only be SIGKILLed; a handler is reset to the default on ``exec``.

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
    """Set the process title, leave SIGINT/SIGTERM to the supervisor, connect logging and stderr."""
    setproctitle(f"llm-server: {role}")
    leave_stop_signals()
    setup_child_logging(log_queue, log_level, output)


def leave_stop_signals() -> None:
    """Let SIGINT/SIGTERM pass this process by (the supervisor stops it with a message), while the
    programs it starts (MCP servers) get them with their default meaning."""
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _pass_by)


def _pass_by(signum: int, frame: Any) -> None:
    """Not ``SIG_IGN``, which ``exec`` would hand on; see the module docstring."""


def run_child(entry: str, *args: Any) -> None:
    """Import ``"package.module:function"`` here, in the child, and call it with ``args``."""
    module, _, function = entry.partition(":")
    getattr(importlib.import_module(module), function)(*args)
