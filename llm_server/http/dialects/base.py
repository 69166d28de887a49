"""What a protocol (a dialect) provides to the one generation route skeleton in ``http.app``.

Every generation goes the same way (``app``): authorise, parse, ask the worker, then answer
plainly or as a stream. What differs between protocols is only the shape of things: a
``Dialect`` turns a request body into a ``Turn`` (the conversation and its ``Options``) and
shapes errors; the ``Turn`` renders what comes back for it — the reply, the stream's opening,
each piece, the end, a failure after the stream began, and the stream's closing line. Adding a
protocol is one module with a ``Dialect`` subclass and one line in ``app.DIALECTS``.
"""

from __future__ import annotations

import hmac
import json
from abc import ABC, abstractmethod
from typing import Any, Callable

from sanic import Request, Sanic
from sanic.response import HTTPResponse

from ...common.config import Config
from ...common.protocol import Delta, Options, Reply


def sse(value: Any, event: str | None = None) -> str:
    """One server-sent event carrying ``value`` as JSON (``event``: its ``event:`` line)."""
    head = f"event: {event}\n" if event is not None else ""
    return f"{head}data: {json.dumps(value, ensure_ascii=False)}\n\n"


# ``app``'s first step for every route: name and log the request, and answer it at once (the
# response) when it is not authorised or the server is draining: (request id, start, response).
Begin = Callable[[Request, "Dialect"], tuple[str, float, HTTPResponse | None]]


class Turn(ABC):
    """One request in its dialect: what the worker is asked, and how what comes back is shown."""

    def __init__(self, messages: list[dict[str, Any]], options: Options) -> None:
        self.messages = messages
        self.options = options

    @abstractmethod
    def reply(self, reply: Reply) -> dict[str, Any]:
        """The body of a 200 answer that does not stream."""

    def opening(self) -> list[str]:
        """Events sent as the stream opens, before the first piece."""
        return []

    @abstractmethod
    def piece(self, delta: Delta) -> str:
        """The event for one piece of generated text."""

    @abstractmethod
    def end(self, reply: Reply) -> list[str]:
        """The events for the finished reply (usage, finish reason, the client's tool calls)."""

    @abstractmethod
    def failure(self, status: int, message: str) -> str:
        """The event for a failure after the stream began (its status is already 200)."""

    def close(self) -> str:
        """What ends every stream, after its end or its failure ("" for nothing)."""
        return ""

    def idle(self) -> str:
        """The keep-alive event for a stream that has had nothing to send for a while, as while
        a server-side tool runs ("": none)."""
        return ""


class Dialect(ABC):
    """One protocol: its generation route, its request parser and its error shape."""

    name: str  # the route's name in Sanic
    path: str  # the generation route (POST)
    auth_hint = "missing or wrong API key (Authorization: Bearer <key>)"
    auth_challenge = "Bearer"  # the 401's WWW-Authenticate

    def __init__(self, config: Config) -> None:
        self.config = config

    def claims(self, path: str) -> bool:
        """Whether errors on ``path`` (its 404 or 405 too) take this dialect's shape, the route
        itself aside; ``app`` asks the dialects in order and falls back to the first."""
        return False

    def api_key(self, request: Request) -> str | None:
        """The key the client sent, in this protocol's header (None: none)."""
        scheme, _, given = (request.headers.get("authorization") or "").partition(" ")
        return given.strip() if scheme.lower() == "bearer" else None

    def authorised(self, request: Request, key: str) -> bool:
        given = self.api_key(request)
        return given is not None and hmac.compare_digest(given.encode(), key.encode())

    def add_routes(self, app: Sanic, begin: Begin) -> None:
        """Routes of this protocol besides its generation route (none by default)."""

    @abstractmethod
    def parse(self, body: bytes, request_id: str) -> Turn:
        """The request as a ``Turn``; raises ``validation.BadRequest`` (a 400) for what cannot be
        served, naming the field."""

    @abstractmethod
    def error_body(self, status: int, message: str, param: str | None = None) -> dict[str, Any]:
        """The body of an error answer."""
