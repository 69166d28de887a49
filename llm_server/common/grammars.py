"""Grammars for constrained answers: JSON Schema and tool calls, in llguidance's grammar format.

The HTTP process checks a client's schema here (``check_schema``: a 400 naming the feature the
library cannot compile, before the request is queued); the model worker builds each round's
grammar here (``json_answer``, ``answer_or_calls``, ``calls_only``, ``text_or_calls``) from the
request and the model family's tool-call markers, and the engine runs it (``model_worker.
constraint``). The grammars are llguidance's Lark dialect (``%json`` embeds a JSON Schema; a
marker that is one token of the vocabulary is written as ``<[id]>``, as llguidance names special
tokens). JSON is written compactly, with ``", "`` and ``": "`` between items (as ``json.dumps``
and the chat templates' ``tojson`` write it): no free whitespace, so a model cannot wander off
into spaces and newlines before the value closes.

Only the tool-call format of the ``json_tools`` parser (Qwen2.5, Qwen3, Hermes and others:
``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>``) is written as a grammar;
``CALL_FORMATS`` lists it, and the README says so.
"""

from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass
from typing import Any, Sequence

_COMPACT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
ANY_OBJECT: dict[str, Any] = {"type": "object"}
CALL_FORMATS = ("json_tools",)  # mlx-lm tool parsers whose calls have a grammar here


class SchemaError(ValueError):
    """A schema the grammar library cannot compile (the message names what it lacks)."""


@dataclass(frozen=True)
class Marker:
    """A tool-call or reasoning marker: one vocabulary token (``token``), or text."""

    text: str
    token: int | None = None

    def lark(self) -> str:
        return f"<[{self.token}]>" if self.token is not None else json.dumps(self.text)


@dataclass(frozen=True)
class CallFormat:
    """How the model family writes a tool call (the ``json_tools`` format: start, JSON, end)."""

    start: Marker
    end: Marker


def _compact(schema: dict[str, Any]) -> dict[str, Any]:
    """The schema with our JSON layout, unless the client set llguidance's own options."""
    schema = copy.deepcopy(schema)
    schema["x-guidance"] = {**_COMPACT, **schema.get("x-guidance", {})}
    return schema


def _validate(grammar: str) -> str:
    import llguidance

    error = llguidance.LLMatcher.validate_grammar(grammar)
    if error:
        raise SchemaError(error.strip().splitlines()[0])
    return grammar


def check_schema(schema: Any) -> dict[str, Any]:
    """``schema`` if llguidance compiles it; else ``SchemaError`` naming what it lacks. The one
    compile check: the grammars built from checked schemas below are compiled once more, by the
    engine, and not checked again."""
    if not isinstance(schema, dict):
        raise SchemaError("a JSON Schema must be an object")
    _validate(json_answer(schema))
    return schema


def json_answer(schema: dict[str, Any]) -> str:
    """A grammar whose only sentences are JSON values valid against ``schema``."""
    import llguidance

    try:
        return llguidance.LLMatcher.grammar_from_json_schema(_compact(schema))
    except ValueError as exc:
        raise SchemaError(str(exc)) from None


def _call_schema(tools: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One ``json_tools`` call body: ``{"name": N, "arguments": {...}}`` for one of ``tools``
    (OpenAI function specs), its arguments to that tool's ``parameters``."""
    variants = []
    for tool in tools:
        function = tool["function"]
        parameters = function.get("parameters") or ANY_OBJECT
        variants.append(
            {
                "type": "object",
                "properties": {"name": {"const": function["name"]}, "arguments": parameters},
                "required": ["name", "arguments"],
                "additionalProperties": False,
            }
        )
    schema: dict[str, Any] = variants[0] if len(variants) == 1 else {"anyOf": variants}
    # MCP servers' schemas are theirs, not the client's: what llguidance cannot compile in them
    # is left unconstrained rather than failing the request.
    schema["x-guidance"] = {**_COMPACT, "lenient": True}
    return schema


def _calls_rules(tools: Sequence[dict[str, Any]], call: CallFormat) -> str:
    body = json.dumps(_call_schema(tools))
    return f'calls: call ("\\n" call)*\ncall: {call.start.lark()} "\\n" %json {body} "\\n" {call.end.lark()}\n'


def _grammar(start: str, rules: str, reasoning: Marker | None) -> str:
    """The Lark text, with a reasoning block first when the round starts in one (the chat
    template opened it): any text up to the end marker, then the constrained part."""
    import llguidance

    if reasoning is not None:
        if reasoning.token is not None:
            rules += f"think: THINK {reasoning.lark()}\nTHINK: /(?s:.*)/\n"
        else:
            rules += f"think[stop={json.dumps(reasoning.text)}]: /(?s:.*)/\n"
        start = f"think /\\s*/ ({start})"
    return llguidance.LLMatcher.grammar_from_lark(f"start: {start}\n{rules}")


def answer(schema: dict[str, Any], reasoning: Marker | None = None) -> str:
    """Only a JSON value valid against ``schema`` (after the reasoning, if any)."""
    if reasoning is None:
        return json_answer(schema)
    return _grammar("answer", f"answer: %json {json.dumps(_compact(schema))}\n", reasoning)


def answer_or_calls(schema: dict[str, Any], tools: Sequence[dict[str, Any]], call: CallFormat,
                    reasoning: Marker | None = None) -> str:  # fmt: skip
    """A JSON value valid against ``schema``, or tool calls (tool rounds stay possible)."""
    rules = f"answer: %json {json.dumps(_compact(schema))}\n" + _calls_rules(tools, call)
    return _grammar("answer | calls", rules, reasoning)


def calls_only(tools: Sequence[dict[str, Any]], call: CallFormat, reasoning: Marker | None = None) -> str:
    """One or more calls of ``tools`` and nothing else (``tool_choice`` required or named)."""
    return _grammar("calls", _calls_rules(tools, call), reasoning)


def text_or_calls(tools: Sequence[dict[str, Any]], call: CallFormat, reasoning: Marker | None = None) -> str:
    """Free text, then optionally tool calls whose arguments follow their schemas (``strict``
    function tools)."""
    no_call = call.start.token is None  # a marker spelled in text must not appear in the text
    marker = re.escape(call.start.text).replace("/", "\\/")  # a Lark regex ends at "/"
    text = "TEXT: /(?s:.*)/" + (f" & ~/(?s:.*{marker}.*)/" if no_call else "") + "\n"
    return _grammar("TEXT | TEXT? calls", text + _calls_rules(tools, call), reasoning)

