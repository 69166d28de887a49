"""The HTTP process's start: it serves the supervisor's listening socket until the drain ends.

The socket is the supervisor's (bound once, kept open across restarts); this process listens
and accepts on it, with the app of ``app`` and the pending requests of ``gateway``. Signals are
the supervisor's: a ``Shutdown`` on the control pipe stops accepting and lets every in-flight
request finish (README, "Lifecycle").
"""

from __future__ import annotations

import logging
import resource
import socket
from multiprocessing.connection import Connection
from typing import Any

from ..common.child import prepare_child
from ..common.config import Config
from ..common.protocol import Stopped
from .app import build_app
from .gateway import Gateway
from .wire import WireProtocol

log = logging.getLogger("llm_server.http")

BACKLOG = 1024  # the kernel's accept queue: what waits while the HTTP process restarts


def run_http(
    config: Config,
    worker_conn: Connection,
    control_conn: Connection,
    log_queue: Any,
    output: Connection | None,
    sock: socket.socket,
) -> None:
    """Entry point of the spawned HTTP child."""
    prepare_child("http", log_queue, config.log_level, output)
    _raise_open_files_limit()
    gateway = Gateway(worker_conn, control_conn, sock, config.max_pending_requests)
    app = build_app(config, gateway)
    app.run(
        sock=sock,
        backlog=BACKLOG,
        protocol=WireProtocol,  # request heads checked first: malformed ones get 400, not silence
        single_process=True,
        register_sys_signals=False,
        motd=False,
        access_log=False,
        verbosity=0,
    )
    left = len(gateway.pending)
    log.info(
        "http stopped: %d request(s) answered while draining, %d left unanswered", gateway.answered_while_draining, left
    )
    try:
        control_conn.send(Stopped(f"answered {gateway.answered_while_draining} while draining"))
    except OSError:
        pass  # the supervisor is gone


def _raise_open_files_limit() -> None:
    """Each client holds a socket: lift the soft limit on open files towards the hard one (macOS
    starts processes at 256, many Linux systems at 1024; requests queue, so thousands may wait)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    ceiling = 65536 if hard == resource.RLIM_INFINITY else hard
    for wanted in (ceiling, 10240):  # macOS refuses more than kern.maxfilesperproc (10240: OPEN_MAX)
        if soft == resource.RLIM_INFINITY or soft >= wanted:
            return
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
        except (ValueError, OSError):
            continue
        log.debug("open files limit raised from %d to %d", soft, wanted)
        return
