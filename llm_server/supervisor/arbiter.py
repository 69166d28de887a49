"""The supervisor's process lifecycle: spawn, watch, restart and stop the two children.

The arbiter owns both child processes, the listening socket and the order of things. Start: the
port is bound at once (a busy port is exit 4 before anything loads, and nobody can take it while
the model loads); then the model worker (it starts the MCP servers and loads the model), and only
after its ``Ready`` the HTTP process, which is handed the socket and starts listening on it. Stop:
the HTTP process stops accepting and drains; the connections still in the kernel's backlog get a
503 here; then the worker frees the model and stops the MCP servers, each step with a deadline
after which the child is killed.

The children are restarted one at a time, each with a fresh data pipe to the other (sent over
the other's control pipe as ``Link``): a dead or stuck worker is replaced while the HTTP process
stays up and answers 503 with ``Retry-After``; a dead HTTP process is replaced while the worker
keeps its loaded model, and connections wait in the backlog of the socket, which never closes.

It is an explicit state machine (``State``: starting, serving, restarting, stopping). Signal
handlers only record the signal and wake the loop; at every wake-up the loop takes *all* pending
signals, in order, and what each means depends on the state: the first SIGTERM/SIGINT in any
state asks for the ordered stop (while starting or restarting too: whatever was being started is
stopped, exit 0); one more while stopping kills the children at once. Restarts (of either child)
are budgeted: ``worker_restarts`` within any ``worker_restart_window_s``, then the daemon gives
up (exit 5 for the worker, 6 for the HTTP process). A child that dies while the other is being
started (the HTTP process while a new worker loads, say) is restarted too, from the same budget,
once the other is up. An unexpected exception here still runs the ordered stop (exit 1).

Liveness: while serving, the worker is pinged over its control pipe. A worker whose event loop
does not answer for ``worker_stall_timeout_s``, or whose MLX thread reports work pending without
progress for that long, is stuck though alive: it is asked for its threads' stacks (SIGUSR1,
``faulthandler``, into the log), killed and restarted like a dead one. Both readings start afresh
whenever serving (re)starts. ``LLM_SERVER_FAULT`` (tests only): ``supervisor-bug`` raises in the
watch loop, ``signal-at-spawn`` sends the process group a SIGINT from inside every spawn.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import multiprocessing
import os
import signal
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from typing import Any

from ..common.child import run_child
from ..common.config import Config
from ..common.protocol import (
    Link,
    Linked,
    ListenerClosed,
    Listening,
    Notice,
    Ping,
    Pong,
    Ready,
    Shutdown,
    StartupFailed,
    StartupFailure,
    Stopped,
)
from .console import Console
from .group import CONNECT_TIMEOUT_S, accept, close_all, hand_over, start_group
from .listen import answer_unavailable, bind_socket, take_backlog
from .log_file import LogHub, StreamPump

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
    StartupFailure.INTERNAL: ExitCode.INTERNAL,
}
# A child that said ``Stopped`` has this long to exit before what is left of it is killed.
STOPPED_EXIT_GRACE_S = 3.0
WORKER_ENTRY = "llm_server.model_worker.process:run_worker"
HTTP_ENTRY = "llm_server.http.process:run_http"


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


@dataclass
class Child:
    """One spawned child and the supervisor's ends of its pipes."""

    role: str
    process: BaseProcess
    control: Connection
    control_open: bool = True  # False once the child closed its end (EOF is always "readable")
    started: float = field(default_factory=time.monotonic)
    up: bool = False  # said Ready / Listening: from then on its death is a restart, not a failed start

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

    def __init__(self, config: Config, hub: LogHub, console: Console | None = None) -> None:
        self.config = config
        self.hub = hub
        self.console = console if console is not None else Console(quiet=True)
        self.tools = 0  # as the worker last reported it
        self.ctx = multiprocessing.get_context("spawn")
        self.worker: Child | None = None
        self.http: Child | None = None
        self.sock: socket.socket | None = None  # bound at start, open until the very end
        self._backlog_answers: threading.Thread | None = None
        self.signals: list[int] = []
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        self.state = State.STARTING
        self.stop_reason: str | None = None  # set by the first SIGTERM/SIGINT
        self.kill_now = False  # set by a signal after that
        self.restart_times: deque[float] = deque()  # monotonic times of restarts in the window
        self.pings = 0
        self.engine_stalled_s = 0.0  # from the worker's last Pong
        self.last_pong = time.monotonic()  # when the serving worker last answered a ping
        self._fault = os.environ.get("LLM_SERVER_FAULT", "")  # test-only faults, read once

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

    def take_signals(self) -> None:
        """Act on every signal recorded since the last wake-up, in order (never just one)."""
        try:
            while os.read(self._wake_r, 1024):
                pass
        except BlockingIOError:
            pass
        while self.signals:
            name = signal.Signals(self.signals.pop(0)).name
            if self.stop_reason is None:
                self.stop_reason = f"received {name}"
                log.info("received %s while %s: stopping", name, self.state.value)
            elif not self.kill_now:
                self.kill_now = True
                log.warning("received %s while %s: killing the children now", name, self.state.value)

    def _enter(self, state: State) -> None:
        log.debug("state: %s -> %s", self.state.value, state.value)
        self.state = state

    # --- the main sequence --------------------------------------------------------------------

    def run(self) -> int:
        """Start, serve until a signal or a fatal error, stop; return the exit code."""
        self.install_signal_handlers()
        os.set_blocking(self._wake_r, False)
        try:
            self.bind()
            if not self.start_worker():
                return self.shutdown(ExitCode.OK, self.stop_reason or "stopped during start-up")
            return self.watch()
        except Fatal as exc:
            log.error("%s", exc)
            return self.shutdown(exc.code, str(exc))
        except Exception:  # a bug here still stops the children in order and flushes the log
            log.exception("internal error in the supervisor")
            return self.shutdown(ExitCode.INTERNAL, "internal error in the supervisor")

    def bind(self) -> None:
        """Take the port for the daemon's whole life, before anything loads: a busy port fails in
        milliseconds, and nobody can take it while the model loads. (Bound, not yet listening:
        connections are refused until the HTTP process listens, after the model is loaded.)"""
        try:
            self.sock = bind_socket(self.config.listening_host, self.config.listening_port)
        except OSError as exc:
            raise Fatal(
                ExitCode.PORT,
                f"cannot listen on {self.config.listening_host}:{self.config.listening_port}: {exc.strerror or exc}",
            ) from None

    def start_worker(self) -> bool:
        """Spawn the worker and wait for ``Ready``; then link it to the HTTP process (started
        here the first time). False if a signal came first."""
        http_end, worker_end = self.ctx.Pipe(duplex=True)
        try:
            if self.config.distributed is None:
                self.worker = self._spawn("model-worker", WORKER_ENTRY, worker_end, self.config)
            else:
                self.worker = self._launch_group(worker_end)
            ready = self.await_message(self.worker, Ready)
            if ready is None:
                return False
            self.worker.up = True
            log.info(
                "model worker ready (pid %s): model %s, context window %s, %d tool(s)",
                self.worker.pid, ready.model_name, ready.context_window, ready.tools,
            )  # fmt: skip
            self.tools = ready.tools
            self.console.say(f"model loaded: {ready.model_name} (context window {ready.context_window} tokens)")
            if self.http is not None:
                self._send(self.http, Link(http_end))
                # Serving only once the HTTP process uses the new pipe (503 until then).
                if self.await_message(self.http, Linked) is None:
                    return self.stop_reason is None  # a stop, or the HTTP process died (started anew)
                log.info("http process linked to the new model worker")
                return True
            return self.start_http(http_end)
        finally:
            http_end.close()

    def start_http(self, worker_link: Connection | None = None) -> bool:
        """Spawn the HTTP process on the listening socket and wait for ``Listening``. Without
        ``worker_link`` (a restart), a fresh pipe is made and its other end sent to the worker."""
        worker_end = None
        if worker_link is None:
            worker_link, worker_end = self.ctx.Pipe(duplex=True)
        try:
            if worker_end is not None:
                assert self.worker is not None
                self._send(self.worker, Link(worker_end))
            # The HTTP process needs no MCP server settings (and so never holds their secrets).
            config = dataclasses.replace(self.config, servers={})
            self.http = self._spawn("http", HTTP_ENTRY, worker_link, config, self.sock)
            listening = self.await_message(self.http, Listening)
        finally:
            if worker_end is not None:
                worker_end.close()
        if listening is None:
            return False
        self.http.up = True
        return True

    def _restore(self) -> None:
        """Start whichever child is missing, then serve. The other may die meanwhile: it takes its
        own restart from the budget (``_lost``) and is started in turn."""
        while self.worker is None or self.http is None:
            if not (self.start_worker() if self.worker is None else self.start_http()):
                raise Fatal(ExitCode.OK, self.stop_reason or "stopped during restart")
        self._serving()

    def _serving(self) -> None:
        address = f"http://{self.config.listening_host}:{self.config.listening_port}"
        log.info("serving on %s", address)
        self.console.say(f"listening on {address} (model {self.config.model_name}, {self.tools} tool(s))")
        self._enter(State.SERVING)
        # Liveness starts fresh: no ping went out while (re)starting, and a stall reading of a
        # worker that is gone says nothing about its successor.
        self.last_pong = time.monotonic()
        self.engine_stalled_s = 0.0

    def _send(self, child: Child, message: Any) -> None:
        try:
            child.control.send(message)
        except (OSError, ValueError):
            pass  # a dead child is seen through its sentinel

    def _spawn(self, role: str, entry: str, data_end: Connection, config: Config, *extra: Any) -> Child:
        """Start ``entry`` ("module:function", imported in the child only) as a spawned child;
        ``data_end`` (and the ``extra`` arguments, e.g. a socket) are handed over at spawn."""
        control_parent, control_child = self.ctx.Pipe(duplex=True)
        output_r, output_w = self.ctx.Pipe(duplex=False)
        process = self.ctx.Process(
            target=_child_main,
            name=role,
            args=(entry, config, data_end, control_child, self.hub.queue, output_w, *extra),
        )
        # A Ctrl+C while the child is still importing would kill it with a traceback, so the
        # child starts with the stop signals blocked (a mask survives fork and exec) and drops
        # them itself (``_child_main``). Blocked here, not ignored: this thread only, and a
        # signal that comes meanwhile stays pending for this process instead of being lost.
        signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
        try:
            process.start()
            if self._fault == "signal-at-spawn":  # test-only: Ctrl+C while a child is spawned
                os.kill(0, signal.SIGINT)
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
        for conn in (data_end, control_child, output_w):  # the child's now; a copy here would hide its EOF
            conn.close()
        StreamPump(output_r, f"{role}[{process.pid}]").start()
        log.info("spawned %s (pid %s)", role, process.pid)
        return Child(role, process, control_parent)

    def _launch_group(self, data_end: Connection) -> Child:
        """Start the worker as a distributed group through ``mlx.launch`` (``group``); rank 0
        connects back for its control pipe and its log records, and gets the config and the
        pipe to the HTTP process over the first."""
        group, listener = start_group(self.config, bytes(multiprocessing.current_process().authkey))
        # The ranks log their own levels into these lines; they are not warnings.
        StreamPump(group.output, f"model-worker-group[{group.pid}]", logging.INFO).start()  # type: ignore[arg-type]
        log.info("launched the model worker group (pid %s, %s)", group.pid, self.config.distributed)
        conns: list[Connection] = []
        accepting = threading.Thread(target=accept, args=(listener, 2, conns), name="group-accept", daemon=True)
        accepting.start()
        deadline = time.monotonic() + CONNECT_TIMEOUT_S
        while accepting.is_alive() and group.is_alive() and not self.signals and time.monotonic() < deadline:
            accepting.join(0.2)
        listener.close()
        accepting.join(5)
        if len(conns) < 2:
            group.kill()
            group.join()
            close_all(data_end, *conns)
            if self.signals:
                self.take_signals()
                raise Fatal(ExitCode.OK, self.stop_reason or "stopped during start-up")
            raise Fatal(
                ExitCode.WORKER_DIED,
                f"the model worker group (pid {group.pid}) did not connect (launcher exit code {group.exitcode})",
            )
        control, records = conns
        threading.Thread(target=self.hub.relay, args=(records,), name="group-logs", daemon=True).start()
        hand_over(control, self.config)
        control.send(Link(data_end))
        data_end.close()
        return Child("model-worker", group, control)  # type: ignore[arg-type]

    def await_message(self, child: Child, expected: type) -> Any:
        """Wait for ``expected`` from ``child``; None if a signal came first, or if ``child`` was
        already up and died meanwhile. A child that is up and dies during the wait (this one, or
        the other while this one starts) is ``_lost``: a restart, not the end of the daemon."""
        while True:
            others = [c for c in (self.worker, self.http) if c is not None and c is not child and c.up]
            ready = wait([self._wake_r, *child.readables(), *(c.process.sentinel for c in others)])
            if self._wake_r in ready:
                self.take_signals()
                if self.stop_reason is not None:
                    return None
            for other in others:
                if other.process.sentinel in ready:
                    self._lost(other)
            message = None
            if child.control in ready:
                message = child.receive()
                if isinstance(message, expected):
                    return message
                if isinstance(message, Notice):
                    self.console.say(message.text, message.key, message.fraction)
                    continue
                if isinstance(message, StartupFailed):
                    raise Fatal(_STARTUP_EXIT[message.kind], f"{child.role} failed to start: {message.reason}")
                if message is not None:
                    log.warning("unexpected %r from %s during start-up", message, child.role)
                    continue
            if child.up:
                if child.process.sentinel in ready:
                    self._lost(child)
                    return None
            elif child.process.sentinel in ready or not child.control_open:
                child.process.join(5)
                code = ExitCode.WORKER_DIED if child.role == "model-worker" else ExitCode.HTTP_DIED
                raise Fatal(
                    code, f"{child.role} (pid {child.pid}) exited during start-up with code {child.process.exitcode}"
                )

    def watch(self) -> int:
        """Serve until a signal; restart a child that dies (or a worker that is stuck), alone."""
        self._restore()  # a child already up may have died while the other started
        stall_s = self.config.worker_stall_timeout_s
        ping_every = min(5.0, stall_s / 4)
        next_ping = time.monotonic()
        while True:
            assert self.worker is not None and self.http is not None
            if time.monotonic() >= next_ping:
                self.pings += 1
                try:
                    self.worker.control.send(Ping(self.pings))
                except (OSError, ValueError):
                    pass  # a dead worker is seen through its sentinel
                next_ping = time.monotonic() + ping_every
            timeout = max(0.0, next_ping - time.monotonic())
            ready = wait([self._wake_r, *self.worker.readables(), *self.http.readables()], timeout=timeout)
            if self._wake_r in ready:
                self.take_signals()
                if self.stop_reason is not None:
                    return self.shutdown(ExitCode.OK, self.stop_reason)
            for child in (self.worker, self.http):
                if child.control in ready:
                    self._drain_control(child)
            if self.worker.process.sentinel in ready:
                self.worker.process.join()
                self.restart_worker(
                    f"model worker (pid {self.worker.pid}) died with exit code {self.worker.process.exitcode}"
                )
            elif self.http.process.sentinel in ready:
                self.http.process.join()
                self.restart_http(
                    f"http process (pid {self.http.pid}) died with exit code {self.http.process.exitcode}"
                )
            elif (stuck := self._stuck(stall_s)) is not None:
                self.kill_stuck_worker(stuck)
                self.restart_worker(f"model worker (pid {self.worker.pid}) was stuck and killed")

    def _drain_control(self, child: Child) -> None:
        message = child.receive()
        if isinstance(message, Pong):
            if self._fault == "supervisor-bug":  # test-only: a bug in the supervisor's loop
                raise RuntimeError("injected fault (LLM_SERVER_FAULT=supervisor-bug)")
            self.last_pong = time.monotonic()
            self.engine_stalled_s = message.engine_stalled_s
        elif message is not None:
            log.info("%s says %r", child.role, message)

    def _stuck(self, stall_s: float) -> str | None:
        """Why the serving worker counts as stuck, or None."""
        silent = time.monotonic() - self.last_pong
        if silent > stall_s:
            return f"its event loop has not answered a ping for {silent:.0f} s"
        if self.engine_stalled_s > stall_s:
            return f"its MLX thread has had work without progress for {self.engine_stalled_s:.0f} s"
        return None

    def kill_stuck_worker(self, why: str) -> None:
        """Log the stacks of every thread of the stuck worker, then kill it."""
        assert self.worker is not None
        pid = self.worker.pid
        log.error(
            "model worker (pid %s) is stuck: %s (worker_stall_timeout_s=%g); its threads:",
            pid, why, self.config.worker_stall_timeout_s,
        )  # fmt: skip
        if pid is not None:
            try:
                os.kill(pid, signal.SIGUSR1)  # faulthandler writes every stack to fd 2 -> the log
            except ProcessLookupError:
                pass
            self.worker.process.join(1.0)
        self.worker.process.kill()
        self.worker.process.join()

    def restart_worker(self, what: str) -> None:
        """The worker is gone: start a new one; the HTTP process stays (and answers 503 meanwhile)."""
        self._spend_restart(what, ExitCode.WORKER_DIED)
        log.warning("restarting the model worker; the http process answers 503 until it is ready")
        self.console.say(f"{what}: restarting it")
        assert self.worker is not None
        self.worker.control.close()
        self.worker = None
        self._restore()

    def restart_http(self, what: str) -> None:
        """The HTTP process is gone: start a new one on the same socket; the worker (and its
        loaded model) stays, and new connections wait in the backlog meanwhile."""
        self._spend_restart(what, ExitCode.HTTP_DIED)
        log.warning("restarting the http process; the model worker keeps running")
        self.console.say(f"{what}: restarting it")
        assert self.http is not None
        self.http.control.close()
        self.http = None
        self._restore()

    def _lost(self, child: Child) -> None:
        """``child``, up, died while the other child was being started: take a restart from the
        budget for it (or give up), and leave it to ``_restore`` to start once the other is up."""
        child.process.join()
        worker = child is self.worker
        role = "model worker" if worker else "http process"
        what = f"{role} (pid {child.pid}) died with exit code {child.process.exitcode}"
        self._spend_restart(what, ExitCode.WORKER_DIED if worker else ExitCode.HTTP_DIED)
        log.warning("restarting the %s once the %s is up", role, "http process" if worker else "model worker")
        self.console.say(f"{what}: restarting it")
        child.control.close()
        if worker:
            self.worker = None
        else:
            self.http = None

    def _spend_restart(self, what: str, code: ExitCode) -> None:
        """Log the death and take one restart from the window's budget, or give up with ``code``."""
        log.error("%s", what)
        now = time.monotonic()
        window = self.config.worker_restart_window_s
        while self.restart_times and now - self.restart_times[0] > window:
            self.restart_times.popleft()
        if len(self.restart_times) >= self.config.worker_restarts:
            raise Fatal(
                code,
                f"{what}; no restarts left ({self.config.worker_restarts} in the last {window:g} s, "
                "worker_restarts / worker_restart_window_s)",
            )
        self.restart_times.append(now)
        self._enter(State.RESTARTING)
        left = self.config.worker_restarts - len(self.restart_times)
        log.info("%d more restart(s) allowed within %g s", left, window)

    # --- stopping -----------------------------------------------------------------------------

    def shutdown(self, code: ExitCode, why: str) -> int:
        """The ordered stop: HTTP drains, the backlog is answered, then the worker unloads."""
        self._enter(State.STOPPING)
        log.info("shutdown (%s): step 1/3: closing the listener and draining in-flight requests", why)
        self.console.say(f"stopping ({why}): closing the listener, finishing requests in flight")
        self.stop_http()
        self.close_listener()
        log.info("shutdown: step 2/3: stopping the model worker (unload model, stop MCP servers)")
        self.console.say("stopping the model worker: unloading the model, stopping MCP servers")
        self.stop_worker()
        if self._backlog_answers is not None:
            self._backlog_answers.join(5.0)
        log.info("shutdown: step 3/3: all children exited; exiting with code %d", int(code))
        self.console.say(f"stopped (exit code {int(code)})")
        return int(code)

    def close_listener(self) -> None:
        """Close the socket for good; connections the kernel already accepted into its backlog
        are taken first and answered 503 (on a thread: a slow client must not hold up the stop)."""
        if self.sock is None:
            return
        sock, self.sock = self.sock, None
        waiting = take_backlog(sock)
        log.info("listener closed: %d waiting connection(s) answered 503", len(waiting))
        if waiting:
            self._backlog_answers = threading.Thread(
                target=answer_unavailable, args=(waiting,), name="backlog-503", daemon=True
            )
            self._backlog_answers.start()

    def stop_http(self) -> None:
        if self.http is not None:
            self._stop_child(self.http, self.config.shutdown_timeout_s + 5)
            self.http = None

    def stop_worker(self) -> None:
        if self.worker is not None:
            self._stop_child(self.worker, self.config.shutdown_timeout_s + 30)
            self.worker = None

    def _stop_child(self, child: Child, deadline_s: float) -> None:
        """Ask politely, wait up to the deadline, then SIGKILL; at once after a second signal."""
        process = child.process
        if process.is_alive():
            try:
                child.control.send(Shutdown())
            except (OSError, ValueError):
                pass
            deadline = time.monotonic() + deadline_s
            said_stopped = False
            while process.is_alive():
                if self.kill_now:
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
                ready = wait([self._wake_r, *child.readables()], timeout=left)
                if self._wake_r in ready:
                    self.take_signals()  # a first signal (while restarting) lets this stop go on
                if child.control in ready:
                    message = child.receive()
                    if isinstance(message, Stopped):
                        log.info("%s (pid %s) stopped: %s", child.role, child.pid, message.detail)
                        # It has let go of what it owns (the MCP servers too); only its exit is left,
                        # which may wait on what it abandoned (a distributed group's other ranks
                        # still loading their shards when a stop cut the start-up short).
                        said_stopped = True
                        deadline = min(deadline, time.monotonic() + STOPPED_EXIT_GRACE_S)
                    elif isinstance(message, ListenerClosed) and self.state is State.STOPPING:
                        self.hub.flush(1.0)  # the child's "stopped accepting" goes first in the log
                        self.close_listener()  # the drain goes on; what queues meanwhile gets 503
        process.join()
        self.hub.flush()  # the child's last records first, then ours
        log.info("%s (pid %s) exited with code %s", child.role, child.pid, process.exitcode)
        child.control.close()


_STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}


def _child_main(*args: Any) -> None:
    """A spawned child's first act: drop the stop signals that came while it started (they were
    blocked, see ``_spawn``) and unblock them; ``run_child`` then decides what they mean here."""
    for signum in _STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)  # a pending one is discarded here
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
    run_child(*args)
