"""The Sanic application: its routes, the one generation skeleton every dialect runs in, errors.

Every generation goes the same way, whatever its protocol (``dialects``): name and authorise the
request, parse it into a ``Turn``, hand it to the ``Gateway`` and turn what comes back (``Delta``
pieces when streaming, then one ``Reply`` or ``Failure``) into the dialect's shapes. A stream
starts only once the first piece is there, so a request that fails before generating anything
(bad input, no worker) still gets its plain status code; a failure after that arrives as the
dialect's last event. A dialect with a keep-alive event (Anthropic's ``ping``) has it sent
after every ``IDLE_S`` of silence, and its stream opens after ``IDLE_S`` even before the first
piece (a first round of server-side tool calls shows nothing for as long as the tools run). A client that goes away mid-stream cancels the handler, and with it the
generation (the ``Gateway`` sends ``Cancel``); so does ``request_timeout_s``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from importlib import resources
from typing import Any, AsyncIterator, Awaitable, Callable

from sanic import Request, Sanic
from sanic.exceptions import NotFound, SanicException
from sanic.response import HTTPResponse
from sanic.response import json as json_response

from ..common.config import Config
from ..common.protocol import Delta, Failure, Listening, Reply, http_status
from . import browser, metrics_route
from .answers import error_response, log_response, name_request
from .dialects.anthropic_messages import AnthropicCountTokens, AnthropicMessages
from .dialects.base import Begin, Dialect, Turn
from .dialects.openai_chat import OpenAIChat
from .dialects.openai_responses import OpenAIResponses
from .dialects.plain import Plain
from .gateway import Gateway
from .validation import BadRequest

log = logging.getLogger("llm_server.http")

# The protocols, each a POST route; the first one's errors are those of paths no other claims.
DIALECTS: tuple[type[Dialect], ...] = (Plain, AnthropicCountTokens, AnthropicMessages, OpenAIResponses, OpenAIChat)
MAX_BODY_BYTES = 10_000_000  # "10 MB": larger bodies get 413, with or without Content-Length
RESPONSE_TIMEOUT_SLACK_S = 10.0  # Sanic's own timeout only backs up ours (request_timeout_s)
SHUTTING_DOWN = "the server is shutting down; retry shortly"
IDLE_S = 2.0  # a stream silent this long gets the dialect's keep-alive event (Anthropic's ping)
STREAM_END_S = 5.0  # how long the last event of a timed-out stream may take to write
OPENAPI = json.loads(resources.files(__package__).joinpath("openapi.json").read_text(encoding="utf-8"))

Handler = Callable[[Request], Awaitable[HTTPResponse | None]]


def build_app(config: Config, gateway: Gateway) -> Sanic:
    """The Sanic application: JSON everywhere, errors in the shape of the dialect the path is
    under (``{"Error": ...}`` elsewhere)."""
    app = Sanic("llm_server", configure_logging=False, dumps=_dumps)
    app.config.REQUEST_MAX_SIZE = MAX_BODY_BYTES
    # A stuck worker is the supervisor's to detect (worker_stall_timeout_s); the client's own bound
    # on one request, request_timeout_s, is the skeleton's (Sanic's restarts at every write, so it
    # cannot end a stream): Sanic's is only a backstop behind it.
    app.config.RESPONSE_TIMEOUT = config.request_timeout_s + RESPONSE_TIMEOUT_SLACK_S
    app.config.GRACEFUL_SHUTDOWN_TIMEOUT = config.shutdown_timeout_s
    app.config.MOTD = False
    dialects = [dialect(config) for dialect in DIALECTS]

    def dialect_for(path: str) -> Dialect:
        for dialect in dialects:
            if dialect.path == path:
                return dialect
        return next((dialect for dialect in dialects if dialect.claims(path)), dialects[0])

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
        # Not awaited: a Shutdown may follow the moment the supervisor reads it, and Sanic
        # cannot stop before its start-up listeners have returned.
        gateway.control.send_soon(Listening(config.listening_host, config.listening_port))

    @app.on_response
    async def _no_keep_alive_while_draining(request: Request, response: HTTPResponse) -> None:
        # A kept-alive connection would let a client slip new requests into the drain.
        if gateway.draining:
            request.stream.keep_alive = False
            gateway.answered_while_draining += 1

    browser.register(app, config)

    @app.on_request
    async def _name(request: Request) -> None:
        name_request(request)

    def begin(request: Request, dialect: Dialect) -> tuple[str, float, HTTPResponse | None]:
        """Name and log the request; answer it at once if it is not authorised or we are draining."""
        rid = name_request(request)
        started = gateway.arrived()
        log.info("request from %s, %d bytes: %s %s", request.remote_addr or request.ip, len(request.body),
                 request.method, request.path)  # fmt: skip
        if config.api_key is not None and not dialect.authorised(request, config.api_key):
            return rid, started, error_response(dialect, rid, 401, dialect.auth_hint, started=started)
        if gateway.draining:  # came in after the drain began: not taken, answered at once
            return rid, started, error_response(dialect, rid, 503, SHUTTING_DOWN, started=started)
        return rid, started, None

    for dialect in dialects:
        handler = _generation_route(dialect, begin, gateway, config.request_timeout_s)
        app.add_route(handler, dialect.path, methods=["POST"], name=dialect.name)
        dialect.add_routes(app, begin)

    metrics_route.register(app, dialects[0], begin)

    @app.get("/openapi.json")
    async def openapi(request: Request) -> HTTPResponse:
        return json_response(OPENAPI)

    @app.exception(SanicException)
    async def _sanic_error(request: Request, exc: SanicException) -> HTTPResponse:
        request_id = name_request(request)  # first seen here when routing or the size check failed
        log.info("rejected %s %s: %d %s", request.method, request.path, exc.status_code, exc)
        response = error_response(dialect_for(request.path), request_id, exc.status_code, str(exc))
        response.headers.update(exc.headers or {})
        return response

    @app.exception(Exception)
    async def _unexpected(request: Request, exc: Exception) -> HTTPResponse:
        request_id = name_request(request)
        log.exception("unexpected error while handling %s %s", request.method, request.path)
        return error_response(dialect_for(request.path), request_id, 500, "internal server error")

    return app


def _generation_route(dialect: Dialect, begin: Begin, gateway: Gateway, timeout_s: float) -> Handler:
    """The handler of ``dialect``'s POST route, ended ``timeout_s`` after it began, streaming or
    not (Sanic's response timeout restarts at every write, so a trickling stream would never
    end): leaving the handler closes the ``Gateway`` conversation, which cancels the generation;
    the client gets 503 or, once its stream has begun, the dialect's failure event as the last."""

    async def generate(request: Request, turns: list[Turn]) -> HTTPResponse | None:
        if request.path != dialect.path:  # Sanic's router also matches "//" for "/"
            raise NotFound(f"Requested URL {request.path} not found")
        request_id, started, early = begin(request, dialect)
        if early is not None:
            return early
        try:
            turn = dialect.parse(request.body, request_id)
        except BadRequest as exc:
            return error_response(dialect, request_id, exc.status, str(exc), exc.param, started)
        turns.append(turn)
        idle_s = IDLE_S if turn.options.stream and turn.idle() else None
        async with contextlib.aclosing(_ticking(gateway.ask(request_id, turn.messages, turn.options), idle_s)) as replies:
            # A stream whose dialect keeps it alive opens after idle_s even with nothing to send
            # yet (a first round of server-side tool calls shows nothing): pings then hold it.
            first = await anext(replies)
            if isinstance(first, Failure):
                return error_response(dialect, request_id, http_status(first.category), first.message,
                                      first.param, started)  # fmt: skip
            if not turn.options.stream:
                assert isinstance(first, Reply)
                body = turn.reply(first)
                log_response(200, started, _stats_detail(first))
                return json_response(body, headers={"X-Request-Id": request_id})
            response = await request.respond(
                content_type="text/event-stream; charset=utf-8",
                headers={"X-Request-Id": request_id, "Cache-Control": "no-cache"},
            )
            for event in turn.opening():
                await response.send(event)
            async for message in _chain(first, replies):
                if message is None:  # nothing new for idle_s: a server-side tool is running
                    await response.send(turn.idle())
                elif isinstance(message, Delta):
                    await response.send(turn.piece(message))
                elif isinstance(message, Reply):
                    for event in turn.end(message):
                        await response.send(event)
                    log_response(200, started, "stream " + _stats_detail(message))
                else:
                    await response.send(turn.failure(http_status(message.category), message.message))
                    log_response(200, started, f"stream failed: {message.message!r}")
            if closing := turn.close():
                await response.send(closing)
            await response.eof()
        return None

    async def bounded(request: Request) -> HTTPResponse | None:
        started = time.monotonic()
        turns: list[Turn] = []  # the request's, once parsed: its stream's last event is the turn's
        deadline = asyncio.timeout(timeout_s)
        try:
            async with deadline:
                return await generate(request, turns)
        except TimeoutError:
            if not deadline.expired():
                raise  # not ours
        message = f"the request took longer than request_timeout_s ({timeout_s:g} s)"
        log.warning("%s: its generation is cancelled", message)
        request_id = name_request(request)
        stream = request.stream.response if request.stream is not None else None
        if stream is None or not turns:
            return error_response(dialect, request_id, 503, message, started=started)
        log_response(200, started, f"stream failed: {message!r}")
        with contextlib.suppress(TimeoutError, OSError):  # a client that reads nothing gets nothing
            async with asyncio.timeout(STREAM_END_S):
                await stream.send(turns[0].failure(503, message) + turns[0].close())
                await stream.eof()
        return None

    return bounded


def _stats_detail(reply: Reply) -> str:
    stats = reply.stats
    return (
        f"prompt_tokens={stats.prompt_tokens} completion_tokens={stats.completion_tokens} "
        f"tool_calls={stats.tool_calls} cached_tokens={stats.cached_tokens} finish_reason={reply.finish_reason}"
    )


async def _chain(first: Any, rest: AsyncIterator[Any]) -> AsyncIterator[Any]:
    yield first
    async for message in rest:
        yield message


async def _ticking(messages: AsyncIterator[Delta | Reply | Failure], idle_s: float | None) -> AsyncIterator[Any]:
    """The messages, with None after every ``idle_s`` without one (when set)."""
    async with contextlib.aclosing(messages):
        while True:
            step = asyncio.ensure_future(_next(messages))
            try:
                while not (await asyncio.wait({step}, timeout=idle_s))[0]:
                    yield None
                message = step.result()
            except StopAsyncIteration:
                return
            finally:
                if not step.done():  # closed while waiting: the gateway's generator is let go first
                    step.cancel()
                    await asyncio.wait({step})
            yield message


async def _next(rest: AsyncIterator[Any]) -> Any:
    return await anext(rest)


def _dumps(value: Any, **kwargs: Any) -> str:
    """Standard-library JSON (ujson mishandles some Unicode edge cases). A lone surrogate (what
    Sanic makes of a header's undecodable byte, which an error message may quote) is written as
    its ``\\u`` escape: as a raw character it cannot be encoded, and the answer would be a 500."""
    return json.dumps(value, ensure_ascii=False, **kwargs).encode("utf-8", "backslashreplace").decode("utf-8")
