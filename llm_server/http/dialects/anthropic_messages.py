"""``POST /v1/messages`` and ``POST /v1/messages/count_tokens``: the Anthropic Messages API, as
the ``anthropic`` SDK and Claude Code speak it.

``MessagesTurn`` renders the ``message`` object, or its stream in the API's event order:
``message_start``, a ``ping``, each content block (``thinking``, ``text``, then the client's
``tool_use`` calls with their input as ``input_json_delta``) opened, filled and stopped,
``message_delta`` with the stop reason and the usage, ``message_stop``; ``ping`` again while the
stream has been silent (a server-side MCP tool running). Usage splits the prompt as the API
does: ``input_tokens`` are the tokens processed anew, ``cache_read_input_tokens`` those taken
from the prompt cache, so ``count_tokens`` (the whole prompt) equals their sum. Errors under
``/v1/messages`` take the API's error object; ``x-api-key`` authenticates as well as a bearer key.
"""

from __future__ import annotations

import json
from typing import Any

from ...common.protocol import ClientToolCall, Delta, GenerationStats, Reply
from .anthropic_request import MessagesRequest, parse_messages_request
from .base import Dialect, Turn, sse

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
}


def error_body(status: int, message: str) -> dict[str, Any]:
    kind = ERROR_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")
    return {"type": "error", "error": {"type": kind, "message": message}}


def usage_body(stats: GenerationStats) -> dict[str, Any]:
    return {
        "input_tokens": stats.prompt_tokens - stats.cached_tokens,
        "output_tokens": stats.completion_tokens,
        "cache_read_input_tokens": stats.cached_tokens,
        "cache_creation_input_tokens": 0,
    }


def stop_reason(reply: Reply) -> str:
    if reply.finish_reason == "tool_calls":
        return "tool_use"
    if reply.finish_reason == "length":
        return "max_tokens"
    return "stop_sequence" if reply.stop_word is not None else "end_turn"


def tool_use_block(call: ClientToolCall, streaming: bool = False) -> dict[str, Any]:
    return {"type": "tool_use", "id": call.id, "name": call.name, "input": {} if streaming else json.loads(call.arguments)}


class MessagesTurn(Turn):
    def __init__(self, request: MessagesRequest, message_id: str, model: str) -> None:
        super().__init__(request.messages, request.options)
        self.message_id = message_id
        self.model = model
        self._blocks = 0  # content blocks opened so far in the stream
        self._open: str | None = None  # the kind of the block now open ("text", "thinking")

    def reply(self, reply: Reply) -> dict[str, Any]:
        content: list[dict[str, Any]] = []
        if reply.reasoning:
            content.append({"type": "thinking", "thinking": reply.reasoning, "signature": ""})
        if reply.text or not reply.tool_calls:
            content.append({"type": "text", "text": reply.text})
        content += [tool_use_block(call) for call in reply.tool_calls]
        return self._message(content, stop_reason(reply), reply.stop_word, usage_body(reply.stats))

    def _message(self, content: list[dict[str, Any]], reason: str | None, stop_word: str | None,
                 usage: dict[str, Any]) -> dict[str, Any]:  # fmt: skip
        return {
            "id": self.message_id, "type": "message", "role": "assistant", "model": self.model, "content": content,
            "stop_reason": reason, "stop_sequence": stop_word, "usage": usage,
        }  # fmt: skip

    def opening(self) -> list[str]:
        usage = usage_body(GenerationStats())  # counted once the answer is done (message_delta)
        start = {"type": "message_start", "message": self._message([], None, None, usage)}
        return [sse(start, "message_start"), self.idle()]

    def _start(self, block: dict[str, Any]) -> str:
        self._open = block["type"]
        self._blocks += 1
        return sse({"type": "content_block_start", "index": self._blocks - 1, "content_block": block},
                   "content_block_start")  # fmt: skip

    def _delta(self, delta: dict[str, Any]) -> str:
        return sse({"type": "content_block_delta", "index": self._blocks - 1, "delta": delta}, "content_block_delta")

    def _stop(self) -> str:
        events = ""
        if self._open == "thinking":  # the API signs a thinking block before it stops it
            events = self._delta({"type": "signature_delta", "signature": ""})
        self._open = None
        return events + sse({"type": "content_block_stop", "index": self._blocks - 1}, "content_block_stop")

    def piece(self, delta: Delta) -> str:
        kind = "thinking" if delta.reasoning else "text"
        events = ""
        if self._open != kind:
            if self._open is not None:
                events += self._stop()
            events += self._start({"type": "thinking", "thinking": "", "signature": ""} if delta.reasoning
                                  else {"type": "text", "text": ""})  # fmt: skip
        if delta.reasoning:
            return events + self._delta({"type": "thinking_delta", "thinking": delta.text})
        return events + self._delta({"type": "text_delta", "text": delta.text})

    def end(self, reply: Reply) -> list[str]:
        events = []
        if self._open is not None:
            events.append(self._stop())
        if not self._blocks and not reply.tool_calls:  # an empty answer is one empty text block
            events += [self._start({"type": "text", "text": ""}), self._stop()]
        for call in reply.tool_calls:
            events += [
                self._start(tool_use_block(call, streaming=True)),
                self._delta({"type": "input_json_delta", "partial_json": call.arguments}),
                self._stop(),
            ]
        delta = {"stop_reason": stop_reason(reply), "stop_sequence": reply.stop_word}
        events.append(sse({"type": "message_delta", "delta": delta, "usage": usage_body(reply.stats)}, "message_delta"))
        events.append(sse({"type": "message_stop"}, "message_stop"))
        return events

    def failure(self, status: int, message: str) -> str:
        return sse(error_body(status, message), "error")

    def idle(self) -> str:
        return sse({"type": "ping"}, "ping")


class CountTurn(Turn):
    """``count_tokens``: the worker renders the prompt (tools included) and generates nothing."""

    def reply(self, reply: Reply) -> dict[str, Any]:
        return {"input_tokens": reply.stats.prompt_tokens}

    def piece(self, delta: Delta) -> str:
        raise AssertionError("count_tokens does not stream")

    def end(self, reply: Reply) -> list[str]:
        raise AssertionError("count_tokens does not stream")

    def failure(self, status: int, message: str) -> str:
        raise AssertionError("count_tokens does not stream")


class AnthropicMessages(Dialect):
    name = "messages"
    path = "/v1/messages"
    auth_hint = "missing or wrong API key (x-api-key: <key>, or Authorization: Bearer <key>)"

    def claims(self, path: str) -> bool:
        return path == self.path or path.startswith(self.path + "/")

    def api_key(self, request: Any) -> str | None:
        given = request.headers.get("x-api-key")
        return given.strip() if given is not None else super().api_key(request)

    def parse(self, body: bytes, request_id: str) -> Turn:
        request = parse_messages_request(body, self.config.system_prompt)
        return MessagesTurn(request, f"msg_{request_id}", request.model or self.config.served_model_name)

    def error_body(self, status: int, message: str, param: str | None = None) -> dict[str, Any]:
        return error_body(status, message)


class AnthropicCountTokens(AnthropicMessages):
    name = "count_tokens"
    path = "/v1/messages/count_tokens"

    def parse(self, body: bytes, request_id: str) -> Turn:
        request = parse_messages_request(body, self.config.system_prompt, count_only=True)
        return CountTurn(request.messages, request.options)

