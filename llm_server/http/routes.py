"""The endpoints: ``POST /`` (the plain contract), the OpenAI ``/v1`` routes, ``/openapi.json``.

Every generation goes the same way: check the body, build the conversation, hand it to the
``Gateway`` and turn what comes back (``Delta`` pieces when streaming, then one ``Reply`` or
``Failure``) into the endpoint's format. A stream starts only once the first piece is there, so
a request that fails before generating anything (bad input, no worker) still gets its plain
status code; a failure after that arrives as a last event. A client that goes away mid-stream
cancels the handler, and with it the generation (the ``Gateway`` sends ``Cancel``).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hmac
import json
import logging
import time
import uuid
from importlib import resources
from typing import TYPE_CHECKING, Any, AsyncIterator, Awaitable, Callable

from sanic import Request, Sanic
from sanic.exceptions import NotFound
from sanic.response import HTTPResponse
from sanic.response import json as json_response

from ..common.config import Config
from ..common.logs import TRACE, current_request
from ..common.protocol import Delta, Failure, Reply, http_status, prompt_messages
from . import openai_api
from .validation import BadRequest, parse_prompt_request

if TYPE_CHECKING:
    from .process import Gateway

log = logging.getLogger("llm_server.http")

RETRY_AFTER_S = "1"
SHUTTING_DOWN = "the server is shutting down; retry shortly"
STREAM_END_S = 5.0  # how long the last event of a timed-out stream may take to write
OPENAPI = json.loads(resources.files(__package__).joinpath("openapi.json").read_text(encoding="utf-8"))


def is_openai(request: Request) -> bool:
    """Whether errors take the OpenAI error object: anywhere under ``/v1/`` (an OpenAI client
    reads only that shape, a 404 or 405 included)."""
    return request.path == "/v1" or request.path.startswith("/v1/")


def name_request(request: Request) -> str:
    """The request's id, made where the request is first seen (the request middleware, or the
    error handler for what fails before it: 404, 405, 413) and kept in ``request.ctx``, so its
    log lines and its ``X-Request-Id`` agree."""
    found = getattr(request.ctx, "request_id", None)
    if found is None:
        found = request.ctx.request_id = uuid.uuid4().hex[:16]
    current_request.set(found)
    return found


def error_response(request: Request, request_id: str | None, status: int, message: str, param: str | None = None,
                   started: float | None = None) -> HTTPResponse:  # fmt: skip
    """An error in the endpoint's format: ``{"Error"}``, or the OpenAI error object on ``/v1``;
    a 503 says when to retry, a 401 how to authenticate."""
    if started is not None:
        log_response(status, started, f"error={message!r}")
    body = openai_api.error_body(status, message, param) if is_openai(request) else {"Error": message}
    headers = {"X-Request-Id": request_id} if request_id else {}
    if status == 503:
        headers["Retry-After"] = RETRY_AFTER_S
    if status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    return json_response(body, status=status, headers=headers)


def log_response(status: int, started: float, detail: str) -> None:
    latency_ms = (time.monotonic() - started) * 1000
    log.log(logging.ERROR if status >= 500 else logging.INFO, "response %d in %.0f ms %s", status, latency_ms, detail)


def stats_detail(reply: Reply) -> str:
    stats = reply.stats
    return (
        f"prompt_tokens={stats.prompt_tokens} completion_tokens={stats.completion_tokens} "
        f"tool_calls={stats.tool_calls} cached_tokens={stats.cached_tokens} finish_reason={reply.finish_reason}"
    )


def sse(value: Any) -> str:
    return f"data: {json.dumps(value, ensure_ascii=False)}\n\n"


def register(app: Sanic, config: Config, gateway: Gateway) -> None:
    """Add every route to ``app``."""
    created = int(time.time())

    def begin(request: Request) -> tuple[str, float, HTTPResponse | None]:
        """Name and log the request; answer it at once if it is not authorised or we are draining."""
        rid = name_request(request)
        started = gateway.last_request = time.monotonic()
        log.info("request from %s, %d bytes: %s %s", request.remote_addr or request.ip, len(request.body),
                 request.method, request.path)  # fmt: skip
        if config.api_key is not None and not _authorised(request, config.api_key):
            return (
                rid,
                started,
                error_response(
                    request, rid, 401, "missing or wrong API key (Authorization: Bearer <key>)", started=started
                ),
            )
        if gateway.draining:  # came in after the drain began: not taken, answered at once
            return rid, started, error_response(request, rid, 503, SHUTTING_DOWN, started=started)
        return rid, started, None

    @app.on_request
    async def _name(request: Request) -> None:
        name_request(request)

    within_deadline = _deadline(config.request_timeout_s)

    @app.post("/")
    @within_deadline
    async def prompt(request: Request) -> HTTPResponse | None:
        if request.path != "/":  # Sanic's router also matches "//" here; the contract names "/" only
            raise NotFound(f"Requested URL {request.path} not found")
        request_id, started, early = begin(request)
        if early is not None:
            return early
        try:
            parsed = parse_prompt_request(request.body)
        except BadRequest as exc:
            return error_response(request, request_id, 400, str(exc), exc.param, started)
        log.log(TRACE, "prompt: %s", parsed.prompt)
        system = config.system_prompt if parsed.system_prompt is None else parsed.system_prompt
        messages = prompt_messages(system, parsed.prompt)
        async with contextlib.aclosing(gateway.ask(request_id, messages, parsed.options)) as replies:
            first = await anext(replies)
            if isinstance(first, Failure):
                return error_response(request, request_id, http_status(first.category), first.message,
                                      started=started)  # fmt: skip
            if not parsed.options.stream:
                assert isinstance(first, Reply)
                log.log(TRACE, "response text: %s", first.text)
                log_response(200, started, stats_detail(first))
                return json_response({"response": first.text}, headers={"X-Request-Id": request_id})
            response = await _open_stream(request, request_id)
            async for message in _chain(first, replies):
                if isinstance(message, Delta):
                    await response.send(sse({"response": message.text}))
                elif isinstance(message, Reply):
                    usage = openai_api.usage_body(message.stats)
                    await response.send(sse({"done": True, "usage": usage}))
                    log_response(200, started, "stream " + stats_detail(message))
                else:
                    await response.send(sse({"Error": message.message}))
                    log_response(200, started, f"stream failed: {message.message!r}")
            await response.eof()
        return None

    @app.post("/v1/chat/completions")
    @within_deadline
    async def chat_completions(request: Request) -> HTTPResponse | None:
        request_id, started, early = begin(request)
        if early is not None:
            return early
        try:
            chat = openai_api.parse_chat_request(request.body, config.system_prompt)
        except BadRequest as exc:
            return error_response(request, request_id, 400, str(exc), exc.param, started)
        completion_id = f"chatcmpl-{request_id}"
        model = config.served_model_name
        async with contextlib.aclosing(gateway.ask(request_id, chat.messages, chat.options)) as replies:
            first = await anext(replies)
            if isinstance(first, Failure):
                return error_response(request, request_id, http_status(first.category), first.message,
                                      started=started)  # fmt: skip
            if not chat.options.stream:
                assert isinstance(first, Reply)
                log_response(200, started, stats_detail(first))
                body = openai_api.completion_body(
                    completion_id, model, first.text, first.finish_reason, first.tool_calls, first.stats
                )
                return json_response(body, headers={"X-Request-Id": request_id})
            response = await _open_stream(request, request_id)

            def chunk(delta: dict[str, Any] | None, finish: str | None = None, usage: Any = None) -> str:
                return sse(openai_api.chunk_body(completion_id, model, delta, finish, usage))

            await response.send(chunk({"role": "assistant", "content": ""}))
            async for message in _chain(first, replies):
                if isinstance(message, Delta):
                    await response.send(chunk({"content": message.text}))
                elif isinstance(message, Reply):
                    if message.tool_calls:
                        calls = openai_api.tool_calls_body(message.tool_calls, streaming=True)
                        await response.send(chunk({"tool_calls": calls}))
                    await response.send(chunk({}, message.finish_reason))
                    if chat.include_usage:
                        await response.send(chunk(None, usage=openai_api.usage_body(message.stats)))
                    log_response(200, started, "stream " + stats_detail(message))
                else:
                    await response.send(sse(openai_api.error_body(http_status(message.category), message.message)))
                    log_response(200, started, f"stream failed: {message.message!r}")
            await response.send("data: [DONE]\n\n")
            await response.eof()
        return None

    @app.get("/v1/models")
    async def models(request: Request) -> HTTPResponse:
        request_id, started, early = begin(request)
        if early is not None:
            return early
        log_response(200, started, "models")
        body = openai_api.models_body(config.served_model_name, created)
        return json_response(body, headers={"X-Request-Id": request_id})

    @app.get("/v1/models/<model_id:path>")
    async def model_info(request: Request, model_id: str) -> HTTPResponse:
        request_id, started, early = begin(request)
        if early is not None:
            return early
        if model_id != config.served_model_name:
            return error_response(request, request_id, 404, f"the model {model_id!r} does not exist", "model",
                                  started)  # fmt: skip
        log_response(200, started, "model")
        body = openai_api.model_body(config.served_model_name, created)
        return json_response(body, headers={"X-Request-Id": request_id})

    @app.get("/openapi.json")
    async def openapi(request: Request) -> HTTPResponse:
        return json_response(OPENAPI)


Handler = Callable[[Request], Awaitable[HTTPResponse | None]]


def _deadline(timeout_s: float) -> Callable[[Handler], Handler]:
    """End a generation route's handler ``timeout_s`` after it began, streaming or not (Sanic's
    response timeout restarts at every write, so a trickling stream would never end): leaving
    the handler closes the ``Gateway`` conversation, which cancels the generation; the client
    gets 503 or, once its stream has begun, the dialect's error event as the last one."""

    def wrap(handler: Handler) -> Handler:
        @functools.wraps(handler)
        async def bounded(request: Request) -> HTTPResponse | None:
            started = time.monotonic()
            deadline = asyncio.timeout(timeout_s)
            try:
                async with deadline:
                    return await handler(request)
            except TimeoutError:
                if not deadline.expired():
                    raise  # not ours
            message = f"the request took longer than request_timeout_s ({timeout_s:g} s)"
            log.warning("%s: its generation is cancelled", message)
            request_id = name_request(request)
            stream = request.stream.response if request.stream is not None else None
            if stream is None:
                return error_response(request, request_id, 503, message, started=started)
            log_response(200, started, f"stream failed: {message!r}")
            if is_openai(request):  # as any failure after the stream began
                last = sse(openai_api.error_body(503, message)) + "data: [DONE]\n\n"
            else:
                last = sse({"Error": message})
            with contextlib.suppress(TimeoutError, OSError):  # a client that reads nothing gets nothing
                async with asyncio.timeout(STREAM_END_S):
                    await stream.send(last)
                    await stream.eof()
            return None

        return bounded

    return wrap


def _authorised(request: Request, key: str) -> bool:
    scheme, _, given = (request.headers.get("authorization") or "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), key.encode())


async def _open_stream(request: Request, request_id: str) -> Any:
    return await request.respond(
        content_type="text/event-stream; charset=utf-8",
        headers={"X-Request-Id": request_id, "Cache-Control": "no-cache"},
    )


async def _chain(first: Delta | Reply | Failure, rest: AsyncIterator[Delta | Reply | Failure]) -> AsyncIterator[Any]:
    yield first
    async for message in rest:
        yield message
