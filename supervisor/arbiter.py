"""The supervisor's process lifecycle: spawn, watch, restart and stop the two children.

The arbiter owns both child processes and the order of things. Start: model worker first (it
starts the MCP servers and loads the model), and only after its ``Ready`` the HTTP process,
which binds the port. Stop: the HTTP process closes its listener and drains, then the worker
frees the model and stops the MCP servers, each step with a deadline after which the child is
killed; a second signal takes that fast path at once. Signal handlers only record the signal;
the loop below acts on it.
"""

from __future__ import annotations

import enum
import logging
import multiprocessing
import os
import signal
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from typing import Any, Callable

from model_worker.worker import run_worker

from .config import Config
from .http_process import bind_socket, run_http
from .logs import LogHub, StreamPump
from .protocol import Listening, Ready, Shutdown, StartupFailed, StartupFailure, Stopped

log = logging.getLogger("llm_server.supervisor")


class ExitCode(enum.IntEnum):
    """The daemon's exit statuses (documented in the README)."""

    OK = 0
    INTERNAL = 1
    CONFIG = 2
    MODEL = 3
    PORT = 4
    WORKER_DIED = 5
    HTTP_DIED = 6


_STARTUP_EXIT = {
    StartupFailure.MODEL: ExitCode.MODEL,
    StartupFailure.BIND: ExitCode.PORT,
    StartupFailure.INTERNAL: ExitCode.INTERNAL,
}


class Fatal(Exception):
    """Stop everything and exit with ``code``."""

    def __init__(self, code: ExitCode, reason: str) -> None:
        super().__init__(reason)
        self.code = code


@dataclass
class Child:
    """One spawned child and the supervisor's ends of its pipes."""

    role: str
    process: BaseProcess
    control: Connection
    control_open: bool = True  # False once the child closed its end (EOF is always "readable")
    started: float = field(default_factory=time.monotonic)

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

    @property
    def pid(self) -> int | None:
        return self.process.pid


class Arbiter:
    """Runs the daemon: start in order, watch the children, stop in order."""

    def __init__(self, config: Config, hub: LogHub) -> None:
        self.config = config
        self.hub = hub
        self.ctx = multiprocessing.get_context("spawn")
        self.worker: Child | None = None
        self.http: Child | None = None
        self.http_pipe_end: Connection | None = None
        self.signals: list[int] = []
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        self.restarts_left = config.worker_restarts

    # --- signals ------------------------------------------------------------------------------

    def install_signal_handlers(self) -> None:
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._record_signal)

    def _record_signal(self, signum: int, frame: Any) -> None:
        # No logging in a handler: record it and wake the loop.
        self.signals.append(signum)
        try:
            os.write(self._wake_w, b"\0")
        except OSError:
            pass

    def _take_signal(self) -> int | None:
        try:
            os.read(self._wake_r, 1024)
        except BlockingIOError:
            pass
        return self.signals.pop(0) if self.signals else None

    # --- the main sequence --------------------------------------------------------------------

    def run(self) -> int:
        """Start, serve until a signal or a fatal error, stop; return the exit code."""
        self.install_signal_handlers()
        os.set_blocking(self._wake_r, False)
        try:
            self.check_port_free()
            if not self.start_children():
                return self.shutdown(ExitCode.OK, "signal during start-up")
            return self.watch()
        except Fatal as exc:
            log.error("%s", exc)
            return self.shutdown(exc.code, str(exc))

    def check_port_free(self) -> None:
        """Fail in milliseconds, not after a long model load, when the port is taken."""
        try:
            bind_socket(self.config.listening_host, self.config.listening_port).close()
        except OSError as exc:
            raise Fatal(
                ExitCode.PORT,
                f"cannot listen on {self.config.listening_host}:{self.config.listening_port}: {exc.strerror or exc}",
            ) from None

    def start_children(self) -> bool:
        """Worker, wait for ``Ready``, then HTTP, wait for ``Listening``. False on a signal."""
        self.spawn_worker()
        ready = self.await_message(self.worker, Ready)
        if ready is None:
            return False
        log.info(
            "model worker ready (pid %s): model %s, context window %s, %d tool(s)",
            self.worker.pid,
            ready.model_name,
            ready.context_window,
            ready.tools,
        )
        self.spawn_http()
        listening = self.await_message(self.http, Listening)
        if listening is None:
            return False
        log.info("serving on http://%s:%d", listening.host, listening.port)
        return True

    def spawn_worker(self) -> None:
        http_end, worker_end = self.ctx.Pipe(duplex=True)
        self.http_pipe_end = http_end
        self.worker = self._spawn("model-worker", run_worker, worker_end)

    def spawn_http(self) -> None:
        assert self.http_pipe_end is not None
        self.http = self._spawn("http", run_http, self.http_pipe_end)
        self.http_pipe_end = None

    def _spawn(self, role: str, target: Callable[..., None], data_end: Connection) -> Child:
        control_parent, control_child = self.ctx.Pipe(duplex=True)
        output_r, output_w = self.ctx.Pipe(duplex=False)
        process = self.ctx.Process(
            target=target,
            name=role,
            args=(self.config, data_end, control_child, self.hub.queue, output_w),
        )
        # A Ctrl+C while the child is still importing would kill it with a traceback; the
        # child inherits "ignore" and keeps it (signals are the supervisor's business).
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            process.start()
        finally:
            signal.signal(signal.SIGINT, previous)
        for conn in (data_end, control_child, output_w):
            conn.close()
        StreamPump(output_r, f"{role}[{process.pid}]").start()
        log.info("spawned %s (pid %s)", role, process.pid)
        return Child(role, process, control_parent)

    def await_message(self, child: Child, expected: type) -> Any:
        """Wait for ``expected`` from a starting child; None if a signal came first."""
        while True:
            ready = wait([self._wake_r, *child.readables()])
            if self._wake_r in ready and (signum := self._take_signal()) is not None:
                log.info("received %s during start-up", signal.Signals(signum).name)
                return None
            message = None
            if child.control in ready:
                message = child.receive()
                if isinstance(message, expected):
                    return message
                if isinstance(message, StartupFailed):
                    raise Fatal(_STARTUP_EXIT[message.kind], f"{child.role} failed to start: {message.reason}")
                if message is not None:
                    log.warning("unexpected %r from %s during start-up", message, child.role)
                    continue
            if child.process.sentinel in ready or not child.control_open:
                child.process.join(5)
                code = ExitCode.WORKER_DIED if child.role == "model-worker" else ExitCode.HTTP_DIED
                raise Fatal(
                    code, f"{child.role} (pid {child.pid}) exited during start-up with code {child.process.exitcode}"
                )

    def watch(self) -> int:
        """Serve until a signal; restart the worker (and HTTP with it) if it dies."""
        while True:
            assert self.worker is not None and self.http is not None
            ready = wait([self._wake_r, *self.worker.readables(), *self.http.readables()])
            if self._wake_r in ready and (signum := self._take_signal()) is not None:
                return self.shutdown(ExitCode.OK, f"received {signal.Signals(signum).name}")
            for child in (self.worker, self.http):
                if child.control in ready:
                    self._drain_control(child)
            if self.worker.process.sentinel in ready:
                self.worker.process.join()
                self.recover(
                    f"model worker (pid {self.worker.pid}) died with exit code {self.worker.process.exitcode}",
                    ExitCode.WORKER_DIED,
                )
            elif self.http.process.sentinel in ready:
                self.http.process.join()
                self.recover(
                    f"http process (pid {self.http.pid}) died with exit code {self.http.process.exitcode}",
                    ExitCode.HTTP_DIED,
                )

    def _drain_control(self, child: Child) -> None:
        message = child.receive()
        if message is not None:
            log.info("%s says %r", child.role, message)

    def recover(self, what: str, code: ExitCode) -> None:
        """A child died: restart both (the port closes briefly) or give up if out of restarts."""
        log.error("%s", what)
        if self.restarts_left <= 0:
            raise Fatal(code, f"{what}; no restarts left (worker_restarts={self.config.worker_restarts})")
        self.restarts_left -= 1
        log.warning("restarting children (%d restart(s) left)", self.restarts_left)
        self.stop_http("restart")
        self.stop_worker("restart")
        if not self.start_children():
            raise Fatal(ExitCode.OK, "signal during restart")

    # --- stopping -----------------------------------------------------------------------------

    def shutdown(self, code: ExitCode, why: str) -> int:
        """The ordered stop: HTTP drains, then the worker unloads; every step logged."""
        log.info("shutdown (%s): step 1/3: closing the listener and draining in-flight requests", why)
        self.stop_http(why)
        log.info("shutdown: step 2/3: stopping the model worker (unload model, stop MCP servers)")
        self.stop_worker(why)
        log.info("shutdown: step 3/3: all children exited; exiting with code %d", int(code))
        return int(code)

    def stop_http(self, why: str) -> None:
        if self.http is not None:
            self._stop_child(self.http, self.config.shutdown_timeout_s + 5)
            self.http = None

    def stop_worker(self, why: str) -> None:
        if self.worker is not None:
            self._stop_child(self.worker, self.config.shutdown_timeout_s + 30)
            self.worker = None
        if self.http_pipe_end is not None:
            self.http_pipe_end.close()
            self.http_pipe_end = None

    def _stop_child(self, child: Child, deadline_s: float) -> None:
        """Ask politely, wait up to the deadline, then SIGKILL. A signal meanwhile kills now."""
        process = child.process
        if process.is_alive():
            try:
                child.control.send(Shutdown())
            except (OSError, ValueError):
                pass
            deadline = time.monotonic() + deadline_s
            while process.is_alive():
                left = deadline - time.monotonic()
                if left <= 0:
                    log.error("%s (pid %s) did not stop within %.0f s: killing it", child.role, child.pid, deadline_s)
                    process.kill()
                    break
                ready = wait([self._wake_r, *child.readables()], timeout=left)
                if self._wake_r in ready and self._take_signal() is not None:
                    log.warning("second signal: killing %s (pid %s) now", child.role, child.pid)
                    process.kill()
                    break
                if child.control in ready:
                    message = child.receive()
                    if isinstance(message, Stopped):
                        log.info("%s (pid %s) stopped: %s", child.role, child.pid, message.detail)
        process.join()
        self.hub.flush()  # the child's last records first, then ours
        log.info("%s (pid %s) exited with code %s", child.role, child.pid, process.exitcode)
        child.control.close()
