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

Liveness and the restart budget are ``liveness.py``; the signal queue is ``signals.py``; spawning,
reaping and stopping one child are ``children.py``. ``LLM_SERVER_FAULT`` (tests only):
``supervisor-bug`` raises in the watch loop (``signal-at-spawn``: see ``children.py``).
"""

from __future__ import annotations

import dataclasses
import logging
import signal
import time
from multiprocessing.connection import Connection, wait
from typing import Any

from ..common import faults
from ..common.config import Config
from ..common.exit_codes import STARTUP_EXIT, ExitCode
from ..common.faults import Faults
from ..common.protocol import Link, Linked, Listening, Notice, Ping, Pong, Ready, StartupFailed
from .children import Child, Spawner, stop_child
from .console import Console
from .listen import Listener
from .liveness import Liveness, RestartBudget
from .log_file import LogHub
from .signals import SignalQueue
from .states import Fatal, State

log = logging.getLogger("llm_server.supervisor")

WORKER_ENTRY = "llm_server.model_worker.process:run_worker"
HTTP_ENTRY = "llm_server.http.process:run_http"


class Arbiter:
    """Runs the daemon: start in order, watch the children, stop in order."""

    def __init__(self, config: Config, hub: LogHub, console: Console | None = None) -> None:
        self.config = config
        self.hub = hub
        self.console = console if console is not None else Console(quiet=True)
        self.tools = 0  # as the worker last reported it
        self.signals = SignalQueue()
        self.spawner = Spawner(config, hub, self.signals)
        self.worker: Child | None = None
        self.http: Child | None = None
        self.listener = Listener(config.listening_host, config.listening_port)  # bound at start, open to the end
        self.state = State.STARTING
        self.stop_reason: str | None = None  # set by the first SIGTERM/SIGINT
        self.kill_now = False  # set by a signal after that
        self.budget = RestartBudget(config.worker_restarts, config.worker_restart_window_s)
        self.liveness = Liveness()
        self.pings = 0
        self._faults = Faults()

    def take_signals(self) -> None:
        """Act on every signal recorded since the last wake-up, in order (never just one)."""
        for signum in self.signals.drain():
            name = signal.Signals(signum).name
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
        self.signals.install()
        try:
            self.listener.bind()
            if not self.start_worker():
                return self.shutdown(ExitCode.OK, self.stop_reason or "stopped during start-up")
            return self.watch()
        except Fatal as exc:
            log.error("%s", exc)
            return self.shutdown(exc.code, str(exc))
        except Exception:  # a bug here still stops the children in order and flushes the log
            log.exception("internal error in the supervisor")
            return self.shutdown(ExitCode.INTERNAL, "internal error in the supervisor")

    def start_worker(self) -> bool:
        """Spawn the worker and wait for ``Ready``; then link it to the HTTP process (started
        here the first time). False if a signal came first."""
        http_end, worker_end = self.spawner.ctx.Pipe(duplex=True)
        try:
            if self.config.distributed is None:
                self.worker = self.spawner.spawn("model-worker", WORKER_ENTRY, worker_end, self.config)
            elif (group := self.spawner.launch_group(worker_end)) is not None:
                self.worker = group
            else:
                self.take_signals()
                raise Fatal(ExitCode.OK, self.stop_reason or "stopped during start-up")
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
                self.http.send(Link(http_end))
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
            worker_link, worker_end = self.spawner.ctx.Pipe(duplex=True)
        try:
            if worker_end is not None:
                assert self.worker is not None
                self.worker.send(Link(worker_end))
            # The HTTP process needs no MCP server settings (and so never holds their secrets); it
            # is told the bound port (the config may say 0, any free port).
            config = dataclasses.replace(self.config, servers={}, listening_port=self.listener.port)
            self.http = self.spawner.spawn("http", HTTP_ENTRY, worker_link, config, self.listener.sock)
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
        address = f"http://{self.config.listening_host}:{self.listener.port}"
        log.info("serving on %s", address)
        self.console.say(f"listening on {address} (model {self.config.model_name}, {self.tools} tool(s))")
        self._enter(State.SERVING)
        self.liveness.reset()  # no ping went out while (re)starting

    def await_message(self, child: Child, expected: type) -> Any:
        """Wait for ``expected`` from ``child``; None if a signal came first, or if ``child`` was
        already up and died meanwhile. A child that is up and dies during the wait (this one, or
        the other while this one starts) is ``_lost``: a restart, not the end of the daemon."""
        while True:
            others = [c for c in (self.worker, self.http) if c is not None and c is not child and c.up]
            ready = wait([self.signals.wake_fd, *child.readables(), *(c.process.sentinel for c in others)])
            if self.signals.wake_fd in ready:
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
                    raise Fatal(STARTUP_EXIT[message.kind], f"{child.role} failed to start: {message.reason}")
                if message is not None:
                    log.warning("unexpected %r from %s during start-up", message, child.role)
                    continue
            if child.up:
                if child.process.sentinel in ready:
                    self._lost(child)
                    return None
            elif child.process.sentinel in ready or not child.control_open:
                child.process.join(5)
                raise Fatal(
                    child.death_code,
                    f"{child.role} (pid {child.pid}) exited during start-up with code {child.process.exitcode}",
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
                self.worker.send(Ping(self.pings))
                next_ping = time.monotonic() + ping_every
            timeout = max(0.0, next_ping - time.monotonic())
            ready = wait([self.signals.wake_fd, *self.worker.readables(), *self.http.readables()], timeout=timeout)
            if self.signals.wake_fd in ready:
                self.take_signals()
                if self.stop_reason is not None:
                    return self.shutdown(ExitCode.OK, self.stop_reason)
            for child in (self.worker, self.http):
                if child.control in ready:
                    self._drain_control(child)
            if self.worker.process.sentinel in ready:
                self.restart_worker(self.worker.reap())
            elif self.http.process.sentinel in ready:
                self.restart_http(self.http.reap())
            elif (stuck := self.liveness.stuck(stall_s)) is not None:
                log.error(
                    "model worker (pid %s) is stuck: %s (worker_stall_timeout_s=%g); its threads:",
                    self.worker.pid, stuck, stall_s,
                )  # fmt: skip
                self.worker.kill_with_stacks()
                self.restart_worker(f"model worker (pid {self.worker.pid}) was stuck and killed")

    def _drain_control(self, child: Child) -> None:
        message = child.receive()
        if isinstance(message, Pong):
            if self._faults.active(faults.SUPERVISOR_BUG):  # a bug in the supervisor's loop
                raise faults.injected(faults.SUPERVISOR_BUG)
            self.liveness.pong(message.engine_stalled_s)
        elif message is not None:
            log.info("%s says %r", child.role, message)

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
        what = child.reap()
        worker = child is self.worker
        self._spend_restart(what, child.death_code)
        log.warning("restarting the %s once the %s is up", child.title, "http process" if worker else "model worker")
        self.console.say(f"{what}: restarting it")
        child.control.close()
        if worker:
            self.worker = None
        else:
            self.http = None

    def _spend_restart(self, what: str, code: ExitCode) -> None:
        """Log the death and take one restart from the window's budget, or give up with ``code``."""
        log.error("%s", what)
        if not self.budget.take():
            raise Fatal(
                code,
                f"{what}; no restarts left ({self.budget.limit} in the last {self.budget.window_s:g} s, "
                "worker_restarts / worker_restart_window_s)",
            )
        self._enter(State.RESTARTING)
        log.info("%d more restart(s) allowed within %g s", self.budget.left, self.budget.window_s)

    # --- stopping -----------------------------------------------------------------------------

    def shutdown(self, code: ExitCode, why: str) -> int:
        """The ordered stop: HTTP drains, the backlog is answered, then the worker unloads."""
        self._enter(State.STOPPING)
        log.info("shutdown (%s): step 1/3: closing the listener and draining in-flight requests", why)
        self.console.say(f"stopping ({why}): closing the listener, finishing requests in flight")
        if self.http is not None:
            stop_child(self.http, self.config.shutdown_timeout_s + 5, self.signals.wake_fd, self, self.hub)
            self.http = None
        self.listener.close()
        log.info("shutdown: step 2/3: stopping the model worker (unload model, stop MCP servers)")
        self.console.say("stopping the model worker: unloading the model, stopping MCP servers")
        if self.worker is not None:
            stop_child(self.worker, self.config.shutdown_timeout_s + 30, self.signals.wake_fd, self, self.hub)
            self.worker = None
        self.listener.join(5.0)
        log.info("shutdown: step 3/3: all children exited; exiting with code %d", int(code))
        self.console.say(f"stopped (exit code {int(code)})")
        return int(code)

    def listener_closed(self) -> None:
        """The HTTP process stopped accepting: while stopping, the drain goes on and what queues
        meanwhile gets 503 (its "stopped accepting" goes first in the log)."""
        if self.state is State.STOPPING:
            self.hub.flush(1.0)
            self.listener.close()
