"""What every answer carries, whatever its route: the request id, the error shape, the log line.

A request is named where it is first seen (the request middleware, or the error handler for
what fails before it: 404, 405, 413), so its log lines and its ``X-Request-Id`` agree.
"""

from __future__ import annotations

import logging
import time
import uuid

from sanic import Request
from sanic.response import HTTPResponse
from sanic.response import json as json_response

from ..common.logs import current_request
from .dialects.base import Dialect

log = logging.getLogger("llm_server.http")

RETRY_AFTER_S = "1"


def name_request(request: Request) -> str:
    """The request's id, made on first sight and kept in ``request.ctx``."""
    found = getattr(request.ctx, "request_id", None)
    if found is None:
        found = request.ctx.request_id = uuid.uuid4().hex[:16]
    current_request.set(found)
    return found


def error_response(dialect: Dialect, request_id: str | None, status: int, message: str, param: str | None = None,
                   started: float | None = None) -> HTTPResponse:  # fmt: skip
    """An error in the dialect's shape; a 503 says when to retry, a 401 how to authenticate."""
    if started is not None:
        log_response(status, started, f"error={message!r}")
    headers = {"X-Request-Id": request_id} if request_id else {}
    if status == 503:
        headers["Retry-After"] = RETRY_AFTER_S
    if status == 401:
        headers["WWW-Authenticate"] = dialect.auth_challenge
    return json_response(dialect.error_body(status, message, param), status=status, headers=headers)


def log_response(status: int, started: float, detail: str) -> None:
    latency_ms = (time.monotonic() - started) * 1000
    log.log(logging.ERROR if status >= 500 else logging.INFO, "response %d in %.0f ms %s", status, latency_ms, detail)
