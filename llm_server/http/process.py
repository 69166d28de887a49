"""The HTTP process: serves the supervisor's listening socket and owns the table of pending requests.

It validates each ``POST /``, forwards the prompt to the model worker over the data pipe as a
``Generate`` and answers when the matching ``Reply`` or ``Failure`` comes back; any number of
requests wait at once, told apart by request id. The socket is the supervisor's (bound once,
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
import socket
import time
import uuid
from multiprocessing.connection import Connection
from typing import Any

from sanic import Request, Sanic
from sanic.exceptions import NotFound, SanicException
from sanic.response import HTTPResponse
from sanic.response import json as json_response

from ..common.channel import PipeChannel
from ..common.child import prepare_child
from ..common.config import Config
from ..common.logs import TRACE, current_request
from ..common.protocol import (
    Cancel,
    Failure,
    FailureCategory,
    Generate,
    Link,
    ListenerClosed,
    Listening,
    Reply,
    Shutdown,
    Stopped,
    http_status,
)
from .validation import BadRequest, parse_prompt

log = logging.getLogger("llm_server.http")

MAX_BODY_BYTES = 10_000_000  # "10 MB": larger bodies get 413, with or without Content-Length
BACKLOG = 1024  # the kernel's accept queue: what waits while the HTTP process restarts
DRAIN_QUIET_S = 0.2  # at shutdown, no new request for this long means every sent one was read
DRAIN_SETTLE_MAX_S = 2.0  # ... but stop accepting after this long regardless
RETRY_AFTER_S = "1"
RESTARTING = "the model worker is restarting; retry shortly"


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
    gateway = Gateway(worker_conn, control_conn, sock)
    app = build_app(config, gateway)
    app.run(
        sock=sock,
        backlog=BACKLOG,
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

    Each entry remembers the worker link it was sent on, so the end of one worker fails only the
    requests that worker had taken, never those already sent to its successor.
    """

    def __init__(self, worker_conn: Connection, control_conn: Connection, sock: socket.socket) -> None:
        self._first_link: Connection | None = worker_conn
        self._control_conn = control_conn
        self._sock = sock
        self.last_request = 0.0  # monotonic time the newest request arrived
        self.pending: dict[str, tuple[asyncio.Future[Reply | Failure], PipeChannel]] = {}
        self.worker: PipeChannel | None = None
        self.control: PipeChannel | None = None
        self.draining = False
        self.answered_while_draining = 0
        self._app: Sanic | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

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

    async def ask(self, request_id: str, prompt: str) -> Reply | Failure:
        """Forward one prompt and wait for its answer; cancelling tells the worker to stop."""
        channel = self.worker
        if channel is None or channel.closed:
            return Failure(request_id, FailureCategory.UNAVAILABLE, RESTARTING)
        future: asyncio.Future[Reply | Failure] = asyncio.get_running_loop().create_future()
        self.pending[request_id] = (future, channel)
        try:
            if not await channel.send(Generate(request_id, prompt)):
                return Failure(request_id, FailureCategory.UNAVAILABLE, RESTARTING)  # never taken
            return await future
        except asyncio.CancelledError:
            channel.send_soon(Cancel(request_id))
            raise
        finally:
            self.pending.pop(request_id, None)

    def _on_reply(self, message: Any) -> None:
        entry = self.pending.get(getattr(message, "request_id", ""))
        if entry is not None and not entry[0].done():
            entry[0].set_result(message)

    def _on_worker_gone(self, channel: PipeChannel) -> None:
        lost = [(rid, future) for rid, (future, sent_on) in self.pending.items() if sent_on is channel]
        for request_id, future in lost:
            if not future.done():
                future.set_result(
                    Failure(request_id, FailureCategory.INTERNAL, "the model worker stopped unexpectedly")
                )
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

    def begin_drain(self) -> None:
        """Stop accepting; Sanic then waits for in-flight requests before returning."""
        if self.draining or self._app is None:
            return
        self.draining = True
        asyncio.get_running_loop().create_task(self._drain())

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
    """The Sanic application: one route, JSON everywhere, errors as ``{"Error": ...}``."""
    app = Sanic("llm_server", configure_logging=False, dumps=_dumps)
    app.config.REQUEST_MAX_SIZE = MAX_BODY_BYTES
    # A stuck worker is the supervisor's to detect (worker_stall_timeout_s); this is the client's
    # own bound on one request, answered 503 when it passes (and the generation is cancelled).
    app.config.RESPONSE_TIMEOUT = config.request_timeout_s
    app.config.GRACEFUL_SHUTDOWN_TIMEOUT = config.shutdown_timeout_s
    app.config.MOTD = False

    @app.before_server_start
    async def _attach(app: Sanic) -> None:
        gateway.attach(app, asyncio.get_running_loop())

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

    @app.post("/")
    async def generate(request: Request) -> HTTPResponse:
        if request.path != "/":  # Sanic's router also matches "//" here; the contract names "/" only
            raise NotFound(f"Requested URL {request.path} not found")
        request_id = uuid.uuid4().hex[:16]
        current_request.set(request_id)
        started = gateway.last_request = time.monotonic()
        log.info("request from %s, %d bytes", request.remote_addr or request.ip, len(request.body))
        if gateway.draining:  # came in after the drain began: not taken, answered at once
            return _answer(request_id, 503, {"Error": "the server is shutting down; retry shortly"}, started)
        try:
            prompt = parse_prompt(request.body)
        except BadRequest as exc:
            return _answer(request_id, 400, {"Error": str(exc)}, started)
        log.log(TRACE, "prompt: %s", prompt)
        result = await gateway.ask(request_id, prompt)
        if isinstance(result, Reply):
            stats = result.stats
            log.log(TRACE, "response text: %s", result.text)
            return _answer(
                request_id,
                200,
                {"response": result.text},
                started,
                f"prompt_tokens={stats.prompt_tokens} completion_tokens={stats.completion_tokens} "
                f"tool_calls={stats.tool_calls} cached_tokens={stats.cached_tokens}",
            )
        return _answer(request_id, http_status(result.category), {"Error": result.message}, started)

    @app.exception(SanicException)
    async def _sanic_error(request: Request, exc: SanicException) -> HTTPResponse:
        log.info("rejected %s %s: %d %s", request.method, request.path, exc.status_code, exc)
        return json_response({"Error": str(exc)}, status=exc.status_code, headers=exc.headers)

    @app.exception(Exception)
    async def _unexpected(request: Request, exc: Exception) -> HTTPResponse:
        log.exception("unexpected error while handling %s %s", request.method, request.path)
        return json_response({"Error": "internal server error"}, status=500)

    return app


def _answer(request_id: str, status: int, body: dict[str, str], started: float, detail: str = "") -> HTTPResponse:
    """The JSON response, logged with its latency; a 503 says when to retry."""
    latency_ms = (time.monotonic() - started) * 1000
    level = logging.ERROR if status >= 500 else logging.INFO
    log.log(
        level,
        "response %d in %.0f ms %s%s",
        status,
        latency_ms,
        detail,
        "" if status == 200 else f" error={body.get('Error')!r}",
    )
    headers = {"X-Request-Id": request_id}
    if status == 503:
        headers["Retry-After"] = RETRY_AFTER_S
    return json_response(body, status=status, headers=headers)


def _dumps(value: Any, **kwargs: Any) -> str:
    """Standard-library JSON (ujson mishandles some Unicode edge cases)."""
    return json.dumps(value, ensure_ascii=False, **kwargs)
