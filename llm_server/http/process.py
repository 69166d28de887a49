"""The HTTP process: serves the supervisor's listening socket and owns the table of pending requests.

Each request (``routes``) is checked, turned into a conversation and forwarded to the model
worker over the data pipe as a ``Generate``; what comes back for it (``Delta`` pieces when it
streams, then one ``Reply`` or ``Failure``) is routed by request id to the handler waiting for it,
any number at once. The socket is the supervisor's (bound once,
kept open across restarts); this process listens and accepts on it. When the worker restarts,
the pipe to it closes: requests it had taken fail (500), new ones are answered 503 with
``Retry-After`` until the supervisor sends a ``Link`` to the new worker. Signals are the
supervisor's: a ``Shutdown`` on the control pipe stops accepting and lets every in-flight
request finish.
"""

from __future__ import annotations

import asyncio
import json
import logging
import resource
import socket
import time
from multiprocessing.connection import Connection
from typing import Any, AsyncIterator

from sanic import Request, Sanic
from sanic.exceptions import SanicException
from sanic.response import HTTPResponse

from ..common.channel import PipeChannel
from ..common.child import prepare_child
from ..common.config import Config
from ..common.protocol import (
    Cancel,
    Delta,
    Failure,
    FailureCategory,
    Generate,
    Link,
    Linked,
    ListenerClosed,
    Listening,
    Options,
    Reply,
    Shutdown,
    Stopped,
)
from . import browser, routes
from .wire import WireProtocol

log = logging.getLogger("llm_server.http")

MAX_BODY_BYTES = 10_000_000  # "10 MB": larger bodies get 413, with or without Content-Length
BACKLOG = 1024  # the kernel's accept queue: what waits while the HTTP process restarts
DRAIN_QUIET_S = 0.2  # at shutdown, no new request for this long means every sent one was read
DRAIN_SETTLE_MAX_S = 2.0  # ... but stop accepting after this long regardless
RESTARTING = "the model worker is restarting; retry shortly"
FULL = "too many requests pending (max_pending_requests); retry shortly"
RESPONSE_TIMEOUT_SLACK_S = 10.0  # Sanic's own timeout only backs up ours (request_timeout_s, routes)


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


class Gateway:
    """Owns the pending-request table: one future per request id, resolved by pipe messages.

    Each entry is the request's inbox and the worker link it was sent on, so the end of one
    worker fails only the requests that worker had taken, never those already sent to its
    successor.
    """

    def __init__(
        self, worker_conn: Connection, control_conn: Connection, sock: socket.socket, max_pending: int | None
    ) -> None:
        self.max_pending = max_pending
        self._first_link: Connection | None = worker_conn
        self._control_conn = control_conn
        self._sock = sock
        self.last_request = 0.0  # monotonic time the newest request arrived
        self.pending: dict[str, tuple[asyncio.Queue[Delta | Reply | Failure], PipeChannel]] = {}
        self.worker: PipeChannel | None = None
        self.control: PipeChannel | None = None
        self.draining = False
        self.answered_while_draining = 0
        self._app: Sanic | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain_task: asyncio.Task[None] | None = None

    def attach(self, app: Sanic, loop: asyncio.AbstractEventLoop) -> None:
        """Start the pipe readers on the server's loop (called once Sanic has one)."""
        self._app, self._loop = app, loop
        self.control = PipeChannel(self._control_conn, loop, self._on_control, self.begin_drain, "control")
        assert self._first_link is not None
        self._link(self._first_link)
        self._first_link = None
        self.control.start()

    def _link(self, conn: Connection) -> None:
        """Send requests to the worker at the other end of ``conn``; a worker linked before is
        gone (were its pipe still open, e.g. a copy held elsewhere, its requests fail now)."""
        assert self._loop is not None
        previous = self.worker
        channel = PipeChannel(conn, self._loop, self._on_reply, lambda: self._on_worker_gone(channel), "worker")
        self.worker = channel
        channel.start()
        if previous is not None and not previous.closed:
            self._on_worker_gone(previous)

    async def ask(
        self, request_id: str, messages: list[dict[str, Any]], options: Options
    ) -> AsyncIterator[Delta | Reply | Failure]:
        """Forward one conversation; yield what comes back for it, ending with its ``Reply`` or
        ``Failure``. Left early (the client went away, or request_timeout_s passed: ``routes``), it
        tells the worker to stop."""
        channel = self.worker
        if channel is None or channel.closed:
            yield Failure(request_id, FailureCategory.UNAVAILABLE, RESTARTING)
            return
        if self.max_pending is not None and len(self.pending) >= self.max_pending:  # opt-in push-back
            log.warning("%d requests pending (max_pending_requests): answering 503", len(self.pending))
            yield Failure(request_id, FailureCategory.UNAVAILABLE, FULL)
            return
        inbox: asyncio.Queue[Delta | Reply | Failure] = asyncio.Queue()
        self.pending[request_id] = (inbox, channel)
        finished = False
        try:
            if not await channel.send(Generate(request_id, messages, options)):
                finished = True
                yield Failure(request_id, FailureCategory.UNAVAILABLE, RESTARTING)  # never taken
                return
            while not finished:
                message = await inbox.get()
                finished = not isinstance(message, Delta)
                yield message
        finally:
            self.pending.pop(request_id, None)
            if not finished:
                channel.send_soon(Cancel(request_id))

    def _on_reply(self, message: Any) -> None:
        entry = self.pending.get(getattr(message, "request_id", ""))
        if entry is not None:
            entry[0].put_nowait(message)

    def _on_worker_gone(self, channel: PipeChannel) -> None:
        lost = [(rid, inbox) for rid, (inbox, sent_on) in self.pending.items() if sent_on is channel]
        for request_id, inbox in lost:
            inbox.put_nowait(Failure(request_id, FailureCategory.INTERNAL, "the model worker stopped unexpectedly"))
        if not self.draining:
            log.warning(
                "the model worker went away: %d request(s) failed; new requests get 503 until a new one is linked",
                len(lost),
            )

    def _on_control(self, message: Any) -> None:
        if isinstance(message, Shutdown):
            self.begin_drain()
        elif isinstance(message, Link):
            self._link(message.conn)
            log.info("linked to a new model worker")
            assert self.control is not None
            self.control.send_soon(Linked())

    def begin_drain(self) -> None:
        """Stop accepting; Sanic then waits for in-flight requests before returning."""
        if self.draining or self._app is None:
            return
        self.draining = True
        self._drain_task = asyncio.get_running_loop().create_task(self._drain())

    def end_drain(self) -> None:
        """At the server's stop: with nothing in flight Sanic may stop before ``_drain`` has run
        to its end; it is not left pending (the supervisor answers the backlog either way)."""
        if self._drain_task is not None and not self._drain_task.done():
            self._drain_task.cancel()

    async def _drain(self) -> None:
        """Stop accepting without dropping anything already sent to us.

        Connections Sanic has accepted but whose request it has not read yet count as idle, and
        Sanic closes idle connections when it stops (the client then sees a reset). So the loop
        first runs until no new request has come for a moment (those that come get 503); then
        Sanic stops accepting and closes its handle on the socket, and the supervisor is told to
        answer what is left in the kernel's backlog (503) and close the socket for good.
        """
        deadline = time.monotonic() + DRAIN_SETTLE_MAX_S
        while time.monotonic() < deadline and time.monotonic() - self.last_request < DRAIN_QUIET_S:
            await asyncio.sleep(0.02)
        assert self._app is not None and self.control is not None
        in_flight = len(self.pending)
        self._app.stop(terminate=False)
        while self._sock.fileno() != -1:
            await asyncio.sleep(0.01)
        log.info("http draining: stopped accepting, %d request(s) in flight", in_flight)
        await self.control.send(ListenerClosed())


def build_app(config: Config, gateway: Gateway) -> Sanic:
    """The Sanic application: JSON everywhere, errors as ``{"Error": ...}`` (the OpenAI error
    object on ``/v1``)."""
    app = Sanic("llm_server", configure_logging=False, dumps=_dumps)
    app.config.REQUEST_MAX_SIZE = MAX_BODY_BYTES
    # A stuck worker is the supervisor's to detect (worker_stall_timeout_s); the client's own bound
    # on one request, request_timeout_s, is the routes' (Sanic's restarts at every write, so it
    # cannot end a stream): Sanic's is only a backstop behind it.
    app.config.RESPONSE_TIMEOUT = config.request_timeout_s + RESPONSE_TIMEOUT_SLACK_S
    app.config.GRACEFUL_SHUTDOWN_TIMEOUT = config.shutdown_timeout_s
    app.config.MOTD = False

    @app.before_server_start
    async def _attach(app: Sanic) -> None:
        gateway.attach(app, asyncio.get_running_loop())

    @app.after_server_stop
    async def _end_drain(app: Sanic) -> None:
        gateway.end_drain()

    @app.after_server_start
    async def _announce(app: Sanic) -> None:
        log.info("listening on http://%s:%d", config.listening_host, config.listening_port)
        assert gateway.control is not None
        await gateway.control.send(Listening(config.listening_host, config.listening_port))

    @app.on_response
    async def _no_keep_alive_while_draining(request: Request, response: HTTPResponse) -> None:
        # A kept-alive connection would let a client slip new requests into the drain.
        if gateway.draining:
            request.stream.keep_alive = False
            gateway.answered_while_draining += 1

    browser.register(app, config)
    routes.register(app, config, gateway)

    @app.exception(SanicException)
    async def _sanic_error(request: Request, exc: SanicException) -> HTTPResponse:
        request_id = routes.name_request(request)  # first seen here when routing or the size check failed
        log.info("rejected %s %s: %d %s", request.method, request.path, exc.status_code, exc)
        response = routes.error_response(request, request_id, exc.status_code, str(exc))
        response.headers.update(exc.headers or {})
        return response

    @app.exception(Exception)
    async def _unexpected(request: Request, exc: Exception) -> HTTPResponse:
        request_id = routes.name_request(request)
        log.exception("unexpected error while handling %s %s", request.method, request.path)
        return routes.error_response(request, request_id, 500, "internal server error")

    return app


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


def _dumps(value: Any, **kwargs: Any) -> str:
    """Standard-library JSON (ujson mishandles some Unicode edge cases). A lone surrogate (what
    Sanic makes of a header's undecodable byte, which an error message may quote) is written as
    its ``\\u`` escape: as a raw character it cannot be encoded, and the answer would be a 500."""
    return json.dumps(value, ensure_ascii=False, **kwargs).encode("utf-8", "backslashreplace").decode("utf-8")
