"""Reading an Anthropic Messages request (``/v1/messages``, ``/v1/messages/count_tokens``).

The conversation comes in Anthropic's blocks and leaves in the chat template's (OpenAI) format,
the one every dialect hands the worker: ``system`` first, a user turn's ``tool_result`` blocks as
``tool`` messages before its text, an assistant turn's ``tool_use`` blocks as its ``tool_calls``
and its ``thinking`` as ``reasoning_content`` (which reasoning models' templates render and the
others ignore). What cannot be honoured is a 400 naming the field; the fields Claude Code sends
that change nothing on one local model (``cache_control`` on any block, ``metadata``,
``service_tier``, ``context_management``, ``container``, ...) are read past.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

from ...common.protocol import Options
from ..validation import BadRequest, Fields, decode_object, joined_text, schema_field, text_field
from .tools import chat_tool, named_tool, tool_objects

log = logging.getLogger("llm_server.http")

MAX_STOP_SEQUENCES = 64
THINKING = ("enabled", "adaptive", "disabled")


@dataclass(frozen=True)
class MessagesRequest:
    messages: list[dict[str, Any]]
    options: Options
    model: str | None  # as the client named it (echoed back)


def parse_messages_request(body: bytes, system_prompt: str, count_only: bool = False) -> MessagesRequest:
    """A Messages body (``count_only``: a ``count_tokens`` body, which has no ``max_tokens``);
    ``system_prompt`` (the config's) stands in when the request has no ``system``."""
    document = decode_object(body, "'messages'")
    fields = Fields(document)
    model = text_field(document, "model")
    max_tokens = fields.integer("max_tokens", 1, 10_000_000)
    if max_tokens is None and not count_only:
        raise BadRequest("'max_tokens' is required", "max_tokens")
    if "messages" not in document:
        raise BadRequest("'messages' is required", "messages")
    system = _system(document.get("system"))
    if system is None:
        system = system_prompt or None
    messages = ([{"role": "system", "content": system}] if system else []) + _messages(document["messages"])
    tools = _tools(document.get("tools"))
    use_tools, call_required, call_name = _tool_choice(document.get("tool_choice"), tools)
    return MessagesRequest(
        messages,
        Options(
            max_tokens=max_tokens,
            temperature=fields.number("temperature", 0.0, 1.0),
            top_p=fields.number("top_p", 0.0, 1.0, low_open=True),
            top_k=fields.integer("top_k", 0, 1_000_000),
            stop=_stop(document.get("stop_sequences")),
            client_tools=tools,
            use_tools=use_tools,
            stream=(fields.boolean("stream") or False) and not count_only,
            verbatim=True,
            return_unknown_calls=True,
            answer_schema=_output_format(document),
            call_required=call_required,
            call_name=call_name,
            reasoning=_thinking(document.get("thinking")),
            count_only=count_only,
        ),
        model,
    )


def _text_blocks(value: Any, where: str) -> str:
    """A string, or an array of ``text`` blocks joined (what ``system`` and a tool result hold)."""
    return joined_text(value, where, {"text": "text"}, "\n\n")


def _system(value: Any) -> str | None:
    return None if value is None else _text_blocks(value, "system")


def _messages(value: Any) -> list[dict[str, Any]]:
    if not isinstance(value, list) or not value:
        raise BadRequest("'messages' must be a non-empty array", "messages")
    out: list[dict[str, Any]] = []
    names: dict[str, str] = {}  # tool_use id -> tool name, for the results that answer them
    for i, item in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(item, dict) or item.get("role") not in ("user", "assistant"):
            raise BadRequest(f"'{where}.role' must be \"user\" or \"assistant\"", f"{where}.role")
        content = item.get("content")
        if isinstance(content, str):
            out.append({"role": item["role"], "content": text_field(item, "content", where=f"{where}.")})
            continue
        if not isinstance(content, list):
            raise BadRequest(f"'{where}.content' must be a string or an array of blocks", f"{where}.content")
        if item["role"] == "user":
            out += _user_blocks(content, f"{where}.content", names)
        else:
            out.append(_assistant_blocks(content, f"{where}.content", names))
    return out


def _user_blocks(blocks: list[Any], where: str, names: dict[str, str]) -> list[dict[str, Any]]:
    """A user turn: its tool results (as ``tool`` messages), then its text (one user message)."""
    results, texts = [], []
    for j, block in enumerate(blocks):
        at = f"{where}[{j}]"
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text":
            texts.append(text_field(block, "text", required=True, where=f"{at}.") or "")
        elif kind == "tool_result":
            call_id = text_field(block, "tool_use_id", required=True, where=f"{at}.") or ""
            text = _text_blocks(block.get("content", ""), f"{at}.content")
            if block.get("is_error") is True:
                text = f"Error: {text}"
            result = {"role": "tool", "tool_call_id": call_id, "content": text}
            if call_id in names:
                result["name"] = names[call_id]
            results.append(result)
        else:
            raise BadRequest(f"'{at}': {kind!r} blocks are not supported (text and tool_result are)", at)
    return results + ([{"role": "user", "content": "\n\n".join(texts)}] if texts else [])


def _assistant_blocks(blocks: list[Any], where: str, names: dict[str, str]) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": ""}
    texts, thoughts, calls = [], [], []
    for j, block in enumerate(blocks):
        at = f"{where}[{j}]"
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text":
            texts.append(text_field(block, "text", required=True, where=f"{at}.") or "")
        elif kind == "thinking":
            thoughts.append(text_field(block, "thinking", where=f"{at}.") or "")
        elif kind == "redacted_thinking":
            continue  # another model's encrypted reasoning: nothing this one can read
        elif kind == "tool_use":
            call_id = text_field(block, "id", required=True, where=f"{at}.") or ""
            name = text_field(block, "name", required=True, where=f"{at}.") or ""
            if not isinstance(block.get("input", {}), dict):
                raise BadRequest(f"'{at}.input' must be an object", f"{at}.input")
            names[call_id] = name
            calls.append({"id": call_id, "type": "function",
                          "function": {"name": name, "arguments": json.dumps(block.get("input", {}))}})  # fmt: skip
        else:
            raise BadRequest(f"'{at}': {kind!r} blocks are not supported in an assistant turn", at)
    message["content"] = "".join(texts)
    if thoughts:
        message["reasoning_content"] = "\n\n".join(thoughts)
    if calls:
        message["tool_calls"] = calls
    return message


def _tools(value: Any) -> tuple[dict[str, Any], ...]:
    """Client tools in the chat template's (OpenAI function) form. Anthropic's own server tools
    (``web_search_20250305``, ``bash_20250124``, ...) run in Anthropic's cloud, not here: they
    are left out with a log line, as the Responses dialect leaves out OpenAI's hosted tools."""
    tools: list[dict[str, Any]] = []
    names: set[str] = set()
    for where, tool in tool_objects(value):
        if tool.get("type") not in (None, "custom"):
            log.info("tool %r of type %r is Anthropic's own: not offered here", tool.get("name"), tool.get("type"))
            continue
        schema = tool.get("input_schema", {"type": "object"})
        tools.append(chat_tool(names, where, tool.get("name"), tool.get("description"), schema, "input_schema",
                               tool.get("strict")))  # fmt: skip
    return tuple(tools)


def _tool_choice(value: Any, tools: tuple[dict[str, Any], ...]) -> tuple[bool, bool, str | None]:
    """(tools offered, a call required, the tool named): ``auto`` (the default), ``none``,
    ``any`` (some tool must be called) or ``tool`` with a ``name``; ``disable_parallel_tool_use``
    is read past (the model's own format decides how many calls it makes)."""
    if value is None:
        return True, False, None
    kind = value.get("type") if isinstance(value, dict) else None
    if kind == "auto":
        return True, False, None
    if kind == "none":
        return False, False, None
    if kind == "any":
        return True, True, None
    if kind == "tool" and isinstance(value.get("name"), str):
        return True, False, named_tool(value["name"], tools)
    raise BadRequest(
        f"'tool_choice' {json.dumps(value)} is not supported: use auto, any, none or tool with a name", "tool_choice"
    )


def _stop(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or len(value) > MAX_STOP_SEQUENCES or not all(isinstance(w, str) and w for w in value):
        raise BadRequest(f"'stop_sequences' must be an array of up to {MAX_STOP_SEQUENCES} non-empty strings",
                         "stop_sequences")  # fmt: skip
    return tuple(value)


def _thinking(value: Any) -> bool:
    """Whether the client is shown the model's thinking (``enabled`` or ``adaptive``). A model
    that does not think has none to show; ``budget_tokens`` is read past (``max_tokens`` bounds
    the thinking and the answer together, as in the API)."""
    if value is None:
        return False
    kind = value.get("type") if isinstance(value, dict) else None
    if kind not in THINKING:
        raise BadRequest(f"'thinking.type' must be one of {', '.join(THINKING)}", "thinking")
    return kind != "disabled"


def _output_format(document: dict[str, Any]) -> dict[str, Any] | None:
    """The answer's JSON Schema: ``output_config.format`` (what the current SDK writes), or the
    beta's top-level ``output_format``; ``output_config.effort`` is read past."""
    config = document.get("output_config")
    if config is not None and not isinstance(config, dict):
        raise BadRequest("'output_config' must be an object", "output_config")
    where, value = "output_config.format", (config or {}).get("format")
    if value is None:
        where, value = "output_format", document.get("output_format")
    if value is None:
        return None
    if not isinstance(value, dict) or value.get("type") != "json_schema":
        raise BadRequest(f"'{where}.type' must be \"json_schema\"", where)
    return schema_field(value.get("schema", {}), where)
