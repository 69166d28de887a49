"""Reading an OpenAI Responses request (``POST /v1/responses``), as the SDK and Codex send it.

``input`` (a string, or items) leaves in the chat template's (OpenAI chat) format, the one
every dialect hands the worker: ``message`` items with their ``input_text``/``output_text``
parts, ``function_call`` items as the assistant's ``tool_calls``, ``function_call_output`` items
as ``tool`` messages, ``reasoning`` items as the next assistant turn's ``reasoning_content``
(rendered by reasoning models' templates, ignored by the others). Tools other than ``function``
(Codex's ``web_search``, ``local_shell``, ``custom``, namespaces: OpenAI runs or parses those)
are left out with a log line, not refused; what cannot be honoured is a 400 naming the field;
fields that change nothing here (``store`` aside, ``include``, ``prompt_cache_key``,
``metadata``, ``parallel_tool_calls``, ``text.verbosity``, ``truncation``, ``service_tier``, ...)
are read past.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

from ...common.grammars import ANY_OBJECT
from ...common.protocol import Options
from ..validation import BadRequest, Fields, decode_object, joined_text, schema_field, text_field
from .tools import assistant_call, chat_tool, named_tool, tool_objects

log = logging.getLogger("llm_server.http")

ROLES = {"user": "user", "assistant": "assistant", "system": "system", "developer": "system"}
TEXT_PARTS = {"input_text": "text", "output_text": "text", "text": "text", "refusal": "refusal"}  # type: field


@dataclass(frozen=True)
class ResponsesRequest:
    instructions: str | None
    items: list[dict[str, Any]]  # the input, as chat messages (no system turn from instructions)
    options: Options
    previous_response_id: str | None
    store: bool
    model: str | None
    echo: dict[str, Any]  # request fields the response object repeats (tools, tool_choice, ...)


def parse_responses_request(body: bytes) -> ResponsesRequest:
    document = decode_object(body, "'input'")
    fields = Fields(document)
    if "input" not in document:
        raise BadRequest("'input' is required", "input")
    items = _input(document["input"])
    tools = _tools(document.get("tools"))
    use_tools, call_required, call_name = _tool_choice(document.get("tool_choice"), tools)
    previous = text_field(document, "previous_response_id")
    store = fields.boolean("store")
    return ResponsesRequest(
        text_field(document, "instructions"),
        items,
        Options(
            max_tokens=fields.integer("max_output_tokens", 1, 10_000_000),
            temperature=fields.number("temperature", 0.0, 2.0),
            top_p=fields.number("top_p", 0.0, 1.0, low_open=True),
            client_tools=tools,
            use_tools=use_tools,
            stream=fields.boolean("stream") or False,
            verbatim=True,
            return_unknown_calls=True,
            answer_schema=_text_format(document.get("text")),
            call_required=call_required,
            call_name=call_name,
            reasoning=True,  # a reasoning model's thinking is a reasoning item, as the API returns it
        ),
        previous,
        True if store is None else store,
        text_field(document, "model"),
        {key: document.get(key) for key in ("tools", "tool_choice", "parallel_tool_calls", "reasoning", "text",
                                             "temperature", "top_p", "metadata", "max_output_tokens")},  # fmt: skip
    )


def _text(value: Any, where: str) -> str:
    """A string, or an array of text parts joined (a message's content, a call's output)."""
    return joined_text(value, where, TEXT_PARTS, "")


def _input(value: Any) -> list[dict[str, Any]]:
    if isinstance(value, str):
        return [{"role": "user", "content": _text(value, "input")}]
    if not isinstance(value, list) or not value:
        raise BadRequest("'input' must be a string or a non-empty array of items", "input")
    messages: list[dict[str, Any]] = []
    names: dict[str, str] = {}  # call_id -> function name, for the outputs that answer them
    thought: list[str] = []  # reasoning items waiting for the assistant turn they precede

    def assistant() -> dict[str, Any]:
        if not messages or messages[-1]["role"] != "assistant":
            messages.append({"role": "assistant", "content": ""})
        if thought:
            messages[-1]["reasoning_content"] = "\n\n".join(thought)
            thought.clear()
        return messages[-1]

    for i, item in enumerate(value):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            raise BadRequest(f"'{where}' must be an object", where)
        kind = item.get("type", "message")
        if kind == "message":
            role = ROLES.get(item.get("role"))  # type: ignore[arg-type]
            if role is None:
                raise BadRequest(f"'{where}.role' must be one of {', '.join(ROLES)}", f"{where}.role")
            text = _text(item.get("content"), f"{where}.content")
            if role == "assistant":
                turn = assistant()
                turn["content"] += text
            else:
                messages.append({"role": role, "content": text})
        elif kind == "function_call":
            call_id = text_field(item, "call_id", required=True, where=f"{where}.") or ""
            name = text_field(item, "name", required=True, where=f"{where}.") or ""
            arguments = text_field(item, "arguments", where=f"{where}.") or "{}"
            names[call_id] = name
            assistant().setdefault("tool_calls", []).append(assistant_call(call_id, name, arguments, f"{where}.arguments"))
        elif kind == "function_call_output":
            call_id = text_field(item, "call_id", required=True, where=f"{where}.") or ""
            result = {"role": "tool", "tool_call_id": call_id, "content": _text(item.get("output", ""), f"{where}.output")}
            if call_id in names:
                result["name"] = names[call_id]
            messages.append(result)
        elif kind == "reasoning":
            parts = (item.get("content") or []) + (item.get("summary") or [])
            thought += [part["text"] for part in parts if isinstance(part, dict) and isinstance(part.get("text"), str)]
        else:
            raise BadRequest(f"'{where}.type' {kind!r} is not supported here (message, function_call, "
                             "function_call_output and reasoning are)", f"{where}.type")  # fmt: skip
    return messages


def _tools(value: Any) -> tuple[dict[str, Any], ...]:
    """``function`` tools, in the chat template's form; the others are OpenAI's to run."""
    tools: list[dict[str, Any]] = []
    names: set[str] = set()
    for where, tool in tool_objects(value):
        if tool.get("type") != "function":
            log.info("tool %r of type %r is not a function: not offered here", tool.get("name"), tool.get("type"))
            continue
        parameters = tool.get("parameters") or {"type": "object", "properties": {}}
        tools.append(chat_tool(names, where, tool.get("name"), tool.get("description"), parameters, "parameters",
                               tool.get("strict")))  # fmt: skip
    return tuple(tools)


def _tool_choice(value: Any, tools: tuple[dict[str, Any], ...]) -> tuple[bool, bool, str | None]:
    """``auto`` (the default), ``none``, ``required`` or ``{"type": "function", "name"}``."""
    if value is None or value == "auto":
        return True, False, None
    if value == "none":
        return False, False, None
    if value == "required":
        return True, True, None
    if isinstance(value, dict) and value.get("type") == "function" and isinstance(value.get("name"), str):
        return True, False, named_tool(value["name"], tools)
    raise BadRequest(f"'tool_choice' {json.dumps(value)} is not supported: use \"auto\", \"none\", \"required\" or "
                     '{"type": "function", "name": ...}', "tool_choice")  # fmt: skip


def _text_format(value: Any) -> dict[str, Any] | None:
    """``text.format``: ``text`` (the default), ``json_object``, or ``json_schema`` with its
    ``schema`` (enforced whether ``strict`` or not); ``text.verbosity`` is read past."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise BadRequest("'text' must be an object", "text")
    spec = value.get("format")
    if spec is None or spec == {"type": "text"}:
        return None
    kind = spec.get("type") if isinstance(spec, dict) else None
    if kind == "json_object":
        return ANY_OBJECT
    if kind == "json_schema":
        return schema_field(spec.get("schema", {}), "text.format")
    raise BadRequest("'text.format.type' must be \"text\", \"json_object\" or \"json_schema\"", "text.format")
