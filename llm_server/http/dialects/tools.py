"""The client's function tools, as every dialect reads them: checked the same way whatever the
protocol's spelling (OpenAI chat nests them under ``function``, Responses and Anthropic do not),
and handed to the worker in one form, the chat template's (OpenAI chat's)."""

from __future__ import annotations

import json
from typing import Any, Iterator

from ..validation import BadRequest, schema_field


def tool_objects(value: Any) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, tool) for each object of the request's ``tools`` array (absent: none)."""
    if value is None:
        return
    if not isinstance(value, list):
        raise BadRequest("'tools' must be an array", "tools")
    for i, tool in enumerate(value):
        where = f"tools[{i}]"
        if not isinstance(tool, dict):
            raise BadRequest(f"'{where}' must be an object", where)
        yield where, tool


def check_function(names: set[str], name: Any, name_at: str, schema: Any, schema_at: str, strict: Any) -> None:
    """A tool's name (a non-empty string, offered once: ``names`` holds those seen) and its
    arguments' JSON Schema, compiled when ``strict`` (its calls are constrained to it)."""
    if not isinstance(name, str) or not name or name in names:
        raise BadRequest(f"'{name_at}' must be a non-empty name offered once", name_at)
    names.add(name)
    if not isinstance(schema, dict):
        raise BadRequest(f"'{schema_at}' must be a JSON Schema object", schema_at)
    if strict is True:
        schema_field(schema, schema_at)


def chat_tool(names: set[str], where: str, name: Any, description: Any, schema: Any, schema_key: str,
              strict: Any) -> dict[str, Any]:  # fmt: skip
    """A checked tool in the chat template's form (``schema_key``: the protocol's name for its
    arguments' schema, for the message)."""
    check_function(names, name, f"{where}.name", schema, f"{where}.{schema_key}", strict)
    function: dict[str, Any] = {"name": name, "description": description or "", "parameters": schema}
    if strict is True:
        function["strict"] = True
    return {"type": "function", "function": function}


def named_tool(name: str, tools: tuple[dict[str, Any], ...]) -> str:
    """``tool_choice``'s named tool, which must be among the request's ``tools``."""
    if name not in {tool["function"]["name"] for tool in tools}:
        raise BadRequest(f"'tool_choice': {name!r} is not among 'tools'", "tool_choice")
    return name


def assistant_call(call_id: str, name: str, arguments: Any, at: str) -> dict[str, Any]:
    """A call from the conversation's history, in the chat template's form; its ``arguments``
    (at ``at``) must be a JSON object in a string."""
    try:
        parsed = json.loads(arguments) if isinstance(arguments, str) else None
    except ValueError:
        parsed = None
    if not isinstance(parsed, dict):
        raise BadRequest(f"'{at}' must be a JSON object in a string", at)
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}
