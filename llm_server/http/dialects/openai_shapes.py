"""The OpenAI API's shapes: completions, stream chunks, usage, the model list and the error object.

Shared by the OpenAI routes (``openai_chat``, ``openai_models``) and by whatever else reports
usage as OpenAI counts it (the plain stream's last event).
"""

from __future__ import annotations

import time
from typing import Any

from ...common.protocol import ClientToolCall, GenerationStats

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    500: "server_error",
    503: "service_unavailable",
}


def usage_body(stats: GenerationStats) -> dict[str, Any]:
    return {
        "prompt_tokens": stats.prompt_tokens,
        "completion_tokens": stats.completion_tokens,
        "total_tokens": stats.prompt_tokens + stats.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": stats.cached_tokens},
    }


def tool_calls_body(calls: tuple[ClientToolCall, ...], streaming: bool = False) -> list[dict[str, Any]]:
    body = []
    for index, call in enumerate(calls):
        item: dict[str, Any] = {
            "id": call.id,
            "type": "function",
            "function": {"name": call.name, "arguments": call.arguments},
        }
        if streaming:
            item["index"] = index
        body.append(item)
    return body


def completion_body(
    completion_id: str, model: str, text: str, finish_reason: str, calls: tuple[ClientToolCall, ...],
    stats: GenerationStats,
) -> dict[str, Any]:  # fmt: skip
    message: dict[str, Any] = {"role": "assistant", "content": text or (None if calls else "")}
    if calls:
        message["tool_calls"] = tool_calls_body(calls)
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": message, "finish_reason": finish_reason, "logprobs": None}],
        "usage": usage_body(stats),
    }


def chunk_body(
    completion_id: str, model: str, delta: dict[str, Any] | None, finish_reason: str | None = None,
    usage: dict[str, Any] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """One ``chat.completion.chunk``; ``delta`` None makes the usage-only chunk (no choices)."""
    choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}]
    body: dict[str, Any] = {
        "id": completion_id,
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": choices,
    }
    if usage is not None:
        body["usage"] = usage
    return body


def model_body(model: str, created: int) -> dict[str, Any]:
    return {"id": model, "object": "model", "created": created, "owned_by": "llm-server"}


def models_body(model: str, created: int) -> dict[str, Any]:
    return {"object": "list", "data": [model_body(model, created)]}


def error_body(status: int, message: str, param: str | None = None) -> dict[str, Any]:
    return {
        "error": {
            "message": message,
            "type": ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error"),
            "param": param,
            "code": None,
        }
    }
