"""The supervisor's children one at a time: spawning one, launching the worker as a group, reaping
one, and stopping one within a deadline. Which child runs when is the arbiter's state machine."""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from multiprocessing.context import SpawnContext
from multiprocessing.process import BaseProcess
from typing import Any, Protocol

from ..common import faults
from ..common.config import Config
from ..common.exit_codes import ExitCode
from ..common.faults import Faults
from ..common.protocol import Link, ListenerClosed, Shutdown, Stopped
from .group import CONNECT_TIMEOUT_S, accept, close_all, hand_over, start_group
from .log_file import LogHub, StreamPump
from .signals import SignalQueue, blocked_for_spawn, child_main
from .states import Fatal

log = logging.getLogger("llm_server.supervisor")

# A child that said ``Stopped`` has this long to exit before what is left of it is killed.
STOPPED_EXIT_GRACE_S = 3.0
WORKER = "model-worker"


@dataclass
class Child:
    """One spawned child and the supervisor's ends of its pipes."""

    role: str
    process: BaseProcess
    control: Connection
    control_open: bool = True  # False once the child closed its end (EOF is always "readable")
    started: float = field(default_factory=time.monotonic)
    up: bool = False  # said Ready / Listening: from then on its death is a restart, not a failed start

    @property
    def pid(self) -> int | None:
        return self.process.pid

    @property
    def title(self) -> str:
        return "model worker" if self.role == WORKER else "http process"

    @property
    def death_code(self) -> ExitCode:
        """The daemon's exit status when this child dies for good."""
        return ExitCode.WORKER_DIED if self.role == WORKER else ExitCode.HTTP_DIED

    def readables(self) -> list[Any]:
        """What to wait on for this child: its exit, and its messages while the pipe is open."""
        return [self.process.sentinel] + ([self.control] if self.control_open else [])

    def receive(self) -> Any:
        """The next control message, or None (and stop listening) at EOF."""
        try:
            return self.control.recv()
        except (EOFError, OSError):
            self.control_open = False
            return None

    def send(self, message: Any) -> None:
        try:
            self.control.send(message)
        except (OSError, ValueError):
            pass  # a dead child is seen through its sentinel

    def reap(self) -> str:
        """Join the dead child; say how it died."""
        self.process.join()
        return f"{self.title} (pid {self.pid}) died with exit code {self.process.exitcode}"

    def kill_with_stacks(self) -> None:
        """Have the child log every thread's stack (SIGUSR1: faulthandler, fd 2 -> the log), then kill it."""
        if self.pid is not None:
            try:
                os.kill(self.pid, signal.SIGUSR1)
            except ProcessLookupError:
                pass
            self.process.join(1.0)
        self.process.kill()
        self.process.join()


class Spawner:
    """Starts children: each gets its pipes, the log queue and an output pump."""

    def __init__(self, config: Config, hub: LogHub, signals: SignalQueue) -> None:
        self.config = config
        self.hub = hub
        self.signals = signals
        self.ctx: SpawnContext = multiprocessing.get_context("spawn")
        self._faults = Faults()

    def spawn(self, role: str, entry: str, data_end: Connection, config: Config, *extra: Any) -> Child:
        """Start ``entry`` ("module:function", imported in the child only) as a spawned child;
        ``data_end`` (and the ``extra`` arguments, e.g. a socket) are handed over at spawn."""
        control_parent, control_child = self.ctx.Pipe(duplex=True)
        output_r, output_w = self.ctx.Pipe(duplex=False)
        process = self.ctx.Process(
            target=child_main,
            name=role,
            args=(entry, config, data_end, control_child, self.hub.queue, output_w, *extra),
        )
        with blocked_for_spawn():
            process.start()
            if self._faults.active(faults.SIGNAL_AT_SPAWN):  # Ctrl+C while a child is spawned
                os.kill(0, signal.SIGINT)
        for conn in (data_end, control_child, output_w):  # the child's now; a copy here would hide its EOF
            conn.close()
        StreamPump(output_r, f"{role}[{process.pid}]").start()
        log.info("spawned %s (pid %s)", role, process.pid)
        return Child(role, process, control_parent)

    def launch_group(self, data_end: Connection) -> Child | None:
        """Start the worker as a distributed group through ``mlx.launch`` (``group``); rank 0
        connects back for its control pipe and its log records, and gets the config and the
        pipe to the HTTP process over the first. None if a signal came first."""
        group, listener = start_group(self.config, bytes(multiprocessing.current_process().authkey))
        # The ranks log their own levels into these lines; they are not warnings.
        StreamPump(group.output, f"model-worker-group[{group.pid}]", logging.INFO).start()  # type: ignore[arg-type]
        log.info("launched the model worker group (pid %s, %s)", group.pid, self.config.distributed)
        conns: list[Connection] = []
        accepting = threading.Thread(target=accept, args=(listener, 2, conns), name="group-accept", daemon=True)
        accepting.start()
        deadline = time.monotonic() + CONNECT_TIMEOUT_S
        while accepting.is_alive() and group.is_alive() and not self.signals.pending and time.monotonic() < deadline:
            accepting.join(0.2)
        listener.close()
        accepting.join(5)
        if len(conns) < 2:
            group.kill()
            group.join()
            close_all(data_end, *conns)
            if self.signals.pending:
                return None
            raise Fatal(
                ExitCode.WORKER_DIED,
                f"the model worker group (pid {group.pid}) did not connect (launcher exit code {group.exitcode})",
            )
        control, records = conns
        threading.Thread(target=self.hub.relay, args=(records,), name="group-logs", daemon=True).start()
        hand_over(control, self.config)
        control.send(Link(data_end))
        data_end.close()
        return Child(WORKER, group, control)  # type: ignore[arg-type]


class Stopping(Protocol):
    """What ``stop_child`` asks of the arbiter while it waits."""

    kill_now: bool

    def take_signals(self) -> None: ...

    def listener_closed(self) -> None: ...


def stop_child(child: Child, deadline_s: float, wake_fd: int, arbiter: Stopping, hub: LogHub) -> None:
    """Ask politely, wait up to the deadline, then SIGKILL; at once after a second signal."""
    process = child.process
    if process.is_alive():
        child.send(Shutdown())
        deadline = time.monotonic() + deadline_s
        said_stopped = False
        while process.is_alive():
            if arbiter.kill_now:
                log.warning("killing %s (pid %s) now", child.role, child.pid)
                process.kill()
                break
            left = deadline - time.monotonic()
            if left <= 0 and said_stopped:
                log.warning(
                    "%s (pid %s) still running %g s after it stopped: killing what is left of it",
                    child.role, child.pid, STOPPED_EXIT_GRACE_S,
                )  # fmt: skip
                process.kill()
                break
            if left <= 0:
                log.error("%s (pid %s) did not stop within %.0f s: killing it", child.role, child.pid, deadline_s)
                process.kill()
                break
            ready = wait([wake_fd, *child.readables()], timeout=left)
            if wake_fd in ready:
                arbiter.take_signals()  # a first signal (while restarting) lets this stop go on
            if child.control in ready:
                message = child.receive()
                if isinstance(message, Stopped):
                    log.info("%s (pid %s) stopped: %s", child.role, child.pid, message.detail)
                    # It has let go of what it owns (the MCP servers too); only its exit is left,
                    # which may wait on what it abandoned (a distributed group's other ranks
                    # still loading their shards when a stop cut the start-up short).
                    said_stopped = True
                    deadline = min(deadline, time.monotonic() + STOPPED_EXIT_GRACE_S)
                elif isinstance(message, ListenerClosed):
                    arbiter.listener_closed()
    process.join()
    hub.flush()  # the child's last records first, then ours
    log.info("%s (pid %s) exited with code %s", child.role, child.pid, process.exitcode)
    child.control.close()
