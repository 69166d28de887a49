"""``POST /v1/chat/completions``: the OpenAI chat-completions protocol, as the SDKs speak it.

``parse_chat_request`` turns a body into messages (in the chat template's format), ``Options``
and the client's tools, rejecting what cannot be honoured with a 400 that names the field;
``ChatTurn`` renders the completion, or its stream of ``chat.completion.chunk`` events ending
with ``[DONE]``. Errors anywhere under ``/v1`` take the OpenAI error object (an OpenAI client
reads only that shape, a 404 or 405 included). No state is kept between requests: the client
sends the whole conversation.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from sanic import Sanic

from ...common.protocol import Delta, Options, Reply
from ...common.grammars import ANY_OBJECT
from ..validation import BadRequest, Fields, decode_object, schema_field, text_field
from . import openai_models
from .base import Begin, Dialect, Turn, sse
from .tools import assistant_call, check_function, tool_objects
from .openai_shapes import chunk_body, completion_body, error_body, tool_calls_body, usage_body

ROLES = ("system", "developer", "user", "assistant", "tool")
_TOOL_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


@dataclass(frozen=True)
class ChatRequest:
    messages: list[dict[str, Any]]
    options: Options
    include_usage: bool  # stream_options.include_usage


def parse_chat_request(body: bytes, system_prompt: str) -> ChatRequest:
    """A ``/v1/chat/completions`` body; ``system_prompt`` (the config's) goes first when the
    client sends no system message of its own."""
    document = decode_object(body, "'messages'")
    fields = Fields(document)
    if "messages" not in document:
        raise BadRequest("'messages' is required", "messages")
    messages = _messages(document["messages"])
    if system_prompt and not any(m["role"] == "system" for m in messages):
        messages.insert(0, {"role": "system", "content": system_prompt})
    if fields.integer("n", 1, 1_000_000) not in (None, 1):
        raise BadRequest("'n' must be 1: one choice per request", "n")
    if document.get("logprobs"):
        raise BadRequest("'logprobs' is not supported", "logprobs")
    answer_schema = _response_format(document.get("response_format"))
    temperature = fields.number("temperature", 0.0, 2.0)
    seed = fields.integer("seed", -(2**63), 2**63 - 1)
    if seed is not None and temperature != 0.0:
        raise BadRequest(
            "'seed' needs 'temperature': 0 here: requests share one batch and one random stream, so "
            "a seed cannot make sampling repeatable",
            "seed",
        )
    max_tokens = fields.integer("max_completion_tokens", 1, 10_000_000)
    if max_tokens is None:
        max_tokens = fields.integer("max_tokens", 1, 10_000_000)
    stream = fields.boolean("stream") or False
    stream_options = document.get("stream_options")
    include_usage = False
    if stream_options is not None:
        if not isinstance(stream_options, dict):
            raise BadRequest("'stream_options' must be an object", "stream_options")
        include_usage = Fields(stream_options, "stream_options.").boolean("include_usage") or False
    tools = _tools(document.get("tools"))
    use_tools, call_required, call_name = _tool_choice(document.get("tool_choice"))
    return ChatRequest(
        messages,
        Options(
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=fields.number("top_p", 0.0, 1.0, low_open=True),
            stop=_stop(document.get("stop")),
            client_tools=tools,
            use_tools=use_tools,
            stream=stream,
            verbatim=True,
            return_unknown_calls=True,
            answer_schema=answer_schema,
            call_required=call_required,
            call_name=call_name,
        ),
        include_usage,
    )


def _messages(value: Any) -> list[dict[str, Any]]:
    if not isinstance(value, list) or not value:
        raise BadRequest("'messages' must be a non-empty array", "messages")
    return [_message(item, f"messages[{i}]") for i, item in enumerate(value)]


def _message(item: Any, where: str) -> dict[str, Any]:
    """One message, checked, in the form chat templates take (the worker finishes the job with
    mlx-lm's ``process_message_content``)."""
    if not isinstance(item, dict):
        raise BadRequest(f"'{where}' must be an object", where)
    role = item.get("role")
    if role not in ROLES:
        raise BadRequest(f"'{where}.role' must be one of {', '.join(ROLES)}", f"{where}.role")
    message: dict[str, Any] = {"role": "system" if role == "developer" else role}
    content = item.get("content")
    if isinstance(content, list):
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise BadRequest(f"'{where}.content[{j}]': only text parts are supported", f"{where}.content")
            text_field(part, "text", where=f"{where}.content[{j}].")
    elif content is not None:
        text_field(item, "content", where=f"{where}.")
    elif role != "assistant":
        raise BadRequest(f"'{where}.content' is required", f"{where}.content")
    message["content"] = content
    if role == "assistant" and item.get("tool_calls") is not None:
        message["tool_calls"] = _assistant_calls(item["tool_calls"], f"{where}.tool_calls")
    if role == "tool":
        if "tool_call_id" not in item:
            raise BadRequest(f"'{where}.tool_call_id' is required", f"{where}.tool_call_id")
        message["tool_call_id"] = text_field(item, "tool_call_id", required=True, where=f"{where}.")
        if isinstance(item.get("name"), str):
            message["name"] = item["name"]
    return message


def _assistant_calls(value: Any, where: str) -> list[dict[str, Any]]:
    if not isinstance(value, list):
        raise BadRequest(f"'{where}' must be an array", where)
    calls = []
    for i, call in enumerate(value):
        at = f"{where}[{i}]"
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise BadRequest(f"'{at}.function.name' must be a string", f"{at}.function.name")
        call_id = str(call.get("id") or f"call_{i}")
        calls.append(assistant_call(call_id, function["name"], function.get("arguments", "{}"), f"{at}.function.arguments"))
    return calls


def _tools(value: Any) -> tuple[dict[str, Any], ...]:
    tools: list[dict[str, Any]] = []
    names: set[str] = set()
    for where, tool in tool_objects(value):
        if tool.get("type") != "function" or not isinstance(tool.get("function"), dict):
            raise BadRequest(f'\'{where}\' must be {{"type": "function", "function": {{...}}}}', where)
        function = tool["function"]
        if not isinstance(function.get("name"), str) or not _TOOL_NAME.match(function["name"]):
            raise BadRequest(
                f"'{where}.function.name' must be 1 to 64 of A-Z, a-z, 0-9, _ and -", f"{where}.function.name"
            )
        check_function(names, function["name"], f"{where}.function.name", function.get("parameters", {}),
                       f"{where}.function.parameters", function.get("strict"))  # fmt: skip
        tools.append(tool)  # as sent: the chat template shows the model what the client wrote
    return tuple(tools)


def _response_format(value: Any) -> dict[str, Any] | None:
    """The answer's JSON Schema: ``json_object`` any object, ``json_schema`` its ``schema``
    (enforced whether ``strict`` or not); ``text`` (the default) None."""
    if value is None or value == {"type": "text"}:
        return None
    kind = value.get("type") if isinstance(value, dict) else None
    if kind == "json_object":
        return ANY_OBJECT
    if kind == "json_schema":
        spec = value.get("json_schema")
        if not isinstance(spec, dict):
            raise BadRequest("'response_format.json_schema' must be an object", "response_format")
        return schema_field(spec.get("schema", {}), "response_format")
    raise BadRequest("'response_format.type' must be \"text\", \"json_object\" or \"json_schema\"", "response_format")


def _tool_choice(value: Any) -> tuple[bool, bool, str | None]:
    """(tools offered, a call required, the tool named): ``"auto"`` (the default), ``"none"`` (no
    tools at all), ``"required"``, or ``{"type": "function", "function": {"name": ...}}``."""
    if value is None or value == "auto":
        return True, False, None
    if value == "none":
        return False, False, None
    if value == "required":
        return True, True, None
    function = value.get("function") if isinstance(value, dict) and value.get("type") == "function" else None
    if isinstance(function, dict) and isinstance(function.get("name"), str):
        return True, False, function["name"]
    raise BadRequest(
        f'\'tool_choice\' {json.dumps(value)} is not supported: use "auto", "none", "required" or '
        '{"type": "function", "function": {"name": ...}}',
        "tool_choice",
    )


def _stop(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    words = [value] if isinstance(value, str) else value
    if not isinstance(words, list) or len(words) > 4 or not all(isinstance(w, str) and w for w in words):
        raise BadRequest("'stop' must be a non-empty string or an array of up to 4 of them", "stop")
    return tuple(words)


class ChatTurn(Turn):
    def __init__(self, request: ChatRequest, completion_id: str, model: str) -> None:
        super().__init__(request.messages, request.options)
        self.include_usage = request.include_usage
        self.completion_id = completion_id
        self.model = model

    def reply(self, reply: Reply) -> dict[str, Any]:
        return completion_body(
            self.completion_id, self.model, reply.text, reply.finish_reason, reply.tool_calls, reply.stats
        )

    def _chunk(self, delta: dict[str, Any] | None, finish: str | None = None, usage: Any = None) -> str:
        return sse(chunk_body(self.completion_id, self.model, delta, finish, usage))

    def opening(self) -> list[str]:
        return [self._chunk({"role": "assistant", "content": ""})]

    def piece(self, delta: Delta) -> str:
        return self._chunk({"content": delta.text})

    def end(self, reply: Reply) -> list[str]:
        events = []
        if reply.tool_calls:
            events.append(self._chunk({"tool_calls": tool_calls_body(reply.tool_calls, streaming=True)}))
        events.append(self._chunk({}, reply.finish_reason))
        if self.include_usage:
            events.append(self._chunk(None, usage=usage_body(reply.stats)))
        return events

    def failure(self, status: int, message: str) -> str:
        return sse(error_body(status, message))

    def close(self) -> str:
        return "data: [DONE]\n\n"


class OpenAIChat(Dialect):
    name = "chat_completions"
    path = "/v1/chat/completions"

    def claims(self, path: str) -> bool:
        return path == "/v1" or path.startswith("/v1/")

    def parse(self, body: bytes, request_id: str) -> Turn:
        chat = parse_chat_request(body, self.config.system_prompt)
        return ChatTurn(chat, f"chatcmpl-{request_id}", self.config.served_model_name)

    def error_body(self, status: int, message: str, param: str | None = None) -> dict[str, Any]:
        return error_body(status, message, param)

    def add_routes(self, app: Sanic, begin: Begin) -> None:
        openai_models.register(app, self, begin)
