"""``POST /``: the plain contract — a prompt in, ``{"response"}`` out, or a stream of its pieces."""

from __future__ import annotations

import logging
from typing import Any

from ...common.logs import TRACE
from ...common.protocol import Delta, Reply, prompt_messages
from ..validation import parse_prompt_request
from .base import Dialect, Turn, sse
from .openai_shapes import usage_body

log = logging.getLogger("llm_server.http")


class PlainTurn(Turn):
    def reply(self, reply: Reply) -> dict[str, Any]:
        log.log(TRACE, "response text: %s", reply.text)
        return {"response": reply.text}

    def piece(self, delta: Delta) -> str:
        return sse({"response": delta.text})

    def end(self, reply: Reply) -> list[str]:
        return [sse({"done": True, "usage": usage_body(reply.stats)})]  # usage as OpenAI counts it

    def failure(self, status: int, message: str) -> str:
        return sse({"Error": message})


class Plain(Dialect):
    """Errors everywhere outside another dialect's paths are ``{"Error": message}``."""

    name = "prompt"
    path = "/"

    def parse(self, body: bytes, request_id: str) -> Turn:
        parsed = parse_prompt_request(body)
        log.log(TRACE, "prompt: %s", parsed.prompt)
        system = self.config.system_prompt if parsed.system_prompt is None else parsed.system_prompt
        return PlainTurn(prompt_messages(system, parsed.prompt), parsed.options)

    def error_body(self, status: int, message: str, param: str | None = None) -> dict[str, Any]:
        return {"Error": message}
