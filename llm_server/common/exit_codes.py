"""Every exit status the daemon and its children use, in one place (the README documents them).

The daemon's own statuses (``ExitCode``) are what a service manager or a person sees; a child's
status (``ENGINE_DIED``) never leaves the daemon: the supervisor logs it and restarts the worker.
``STARTUP_EXIT`` says which daemon status a child's reported start-up failure becomes, so the
arbiter and the children agree on it here.
"""

from __future__ import annotations

import enum

from .protocol import StartupFailure


class ExitCode(enum.IntEnum):
    """The daemon's exit statuses."""

    OK = 0
    INTERNAL = 1
    CONFIG = 2
    MODEL = 3
    PORT = 4
    WORKER_DIED = 5
    HTTP_DIED = 6


# The model worker's exit status when its MLX thread died (EX_SOFTWARE): a restart, not a stop.
ENGINE_DIED = 70

STARTUP_EXIT = {
    StartupFailure.MODEL: ExitCode.MODEL,
    StartupFailure.INTERNAL: ExitCode.INTERNAL,
}
