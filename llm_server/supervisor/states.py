"""What the arbiter's pieces share: its states and ``Fatal``, beneath them so each imports down."""

from __future__ import annotations

import enum

from ..common.exit_codes import ExitCode


class State(enum.Enum):
    """Where the arbiter is; decides what a signal means."""

    STARTING = "starting"
    SERVING = "serving"
    RESTARTING = "restarting"
    STOPPING = "stopping"


class Fatal(Exception):
    """Stop everything and exit with ``code``."""

    def __init__(self, code: ExitCode, reason: str) -> None:
        super().__init__(reason)
        self.code = code
