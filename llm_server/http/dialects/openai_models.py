"""``GET /v1/models`` and ``GET /v1/models/{id}``: the one model this daemon serves, as OpenAI lists it."""

from __future__ import annotations

import time

from sanic import Request, Sanic
from sanic.response import HTTPResponse
from sanic.response import json as json_response

from ..answers import error_response, log_response
from .base import Begin, Dialect
from .openai_shapes import model_body, models_body


def register(app: Sanic, dialect: Dialect, begin: Begin) -> None:
    """Add the model routes, answered from the config (``served_model_name``) in ``dialect``'s errors."""
    created = int(time.time())
    served = dialect.config.served_model_name

    @app.get("/v1/models")
    async def models(request: Request) -> HTTPResponse:
        request_id, started, early = begin(request, dialect)
        if early is not None:
            return early
        log_response(200, started, "models")
        return json_response(models_body(served, created), headers={"X-Request-Id": request_id})

    @app.get("/v1/models/<model_id:path>")
    async def model_info(request: Request, model_id: str) -> HTTPResponse:
        request_id, started, early = begin(request, dialect)
        if early is not None:
            return early
        if model_id != served:
            return error_response(dialect, request_id, 404, f"the model {model_id!r} does not exist", "model",
                                  started)  # fmt: skip
        log_response(200, started, "model")
        return json_response(model_body(served, created), headers={"X-Request-Id": request_id})
