"""The HTTP process's end of the worker: the table of pending requests, the link, the drain.

Each request the routes forward is sent to the model worker over the data pipe as a ``Generate``;
what comes back for it (``Delta`` pieces when it streams, then one ``Reply`` or ``Failure``) is
routed by request id to the handler waiting for it, any number at once. When the worker
restarts, the pipe to it closes: requests it had taken fail (500), new ones are answered 503
until the supervisor sends a ``Link`` to the new worker. A ``Shutdown`` on the control pipe
starts the drain (README, "Lifecycle").
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from multiprocessing.connection import Connection
from typing import Any, AsyncIterator

from sanic import Sanic

from ..common.channel import LinkedChannel, PipeChannel
from .metrics_route import WORKER_RESTARTS
from ..common.protocol import (
    Cancel,
    Delta,
    Failure,
    FailureCategory,
    Generate,
    Link,
    Linked,
    ListenerClosed,
    Options,
    Reply,
    Shutdown,
)

log = logging.getLogger("llm_server.http")

DRAIN_QUIET_S = 0.2  # at shutdown, no new request for this long means every sent one was read
DRAIN_SETTLE_MAX_S = 2.0  # ... but stop accepting after this long regardless
RESTARTING = "the model worker is restarting; retry shortly"
FULL = "too many requests pending (max_pending_requests); retry shortly"


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
        self.worker = LinkedChannel(self._on_reply, self._on_worker_gone, "worker")
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
        self.worker.link(self._first_link, loop)
        self._first_link = None
        self.control.start()

    def arrived(self) -> float:
        """Note a request's arrival (the drain waits for a quiet moment); its start time."""
        self.last_request = time.monotonic()
        return self.last_request

    async def ask(
        self, request_id: str, messages: list[dict[str, Any]], options: Options
    ) -> AsyncIterator[Delta | Reply | Failure]:
        """Forward one conversation; yield what comes back for it, ending with its ``Reply`` or
        ``Failure``. Left early (the client went away, or request_timeout_s passed), it tells the
        worker to stop."""
        channel = self.worker.current
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

    def _on_reply(self, message: Any, channel: PipeChannel) -> None:
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
            assert self._loop is not None
            self.worker.link(message.conn, self._loop)
            WORKER_RESTARTS.inc()
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
