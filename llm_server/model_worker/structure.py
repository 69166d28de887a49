"""Which grammar constrains a round of the tool loop, from the request's structure options.

- ``tool_choice`` required or named: the first round is tool calls only (of that tool); later
  rounds (after a server-side tool ran) are free, or the answer's schema, as ``auto`` would be.
- An answer schema (``response_format``, ``format``): a round without tools on offer is that JSON
  value only; with tools on offer it is that value *or* tool calls, so tool rounds stay possible
  and the constraint falls on the final answer.
- ``strict`` function tools: free text, and any tool call's arguments follow their schemas.

A round that starts inside a reasoning block (the chat template opened it) may reason freely
first. Grammars for tool calls exist for the ``json_tools`` call format only
(``common.grammars.CALL_FORMATS``): with another format, what needs one is a 400 naming the
field, never an unconstrained answer — except ``strict`` tools, which stay unconstrained there
(as documented).
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

from ..common import grammars
from ..common.grammars import CallFormat, Marker
from ..common.protocol import Options
from .output import initial_state

log = logging.getLogger("llm_server.model_worker")


class Unconstrainable(Exception):
    """The request asks for a structure that cannot be honoured for this model (a 400)."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


def _marker(tokenizer: Any, text: str) -> Marker:
    ids = tokenizer.encode(text, add_special_tokens=False)
    return Marker(text, ids[0] if len(ids) == 1 else None)


def _parser_name(tokenizer: Any) -> str:
    """The mlx-lm tool parser's module name (``json_tools``, ``mistral``, ...), or "none"."""
    return getattr(getattr(tokenizer, "tool_parser", None), "__module__", "none").rpartition(".")[2]


def _call_format(tokenizer: Any) -> CallFormat | None:
    if _parser_name(tokenizer) not in grammars.CALL_FORMATS or not tokenizer.has_tool_calling:
        return None
    return CallFormat(_marker(tokenizer, tokenizer.tool_call_start), _marker(tokenizer, tokenizer.tool_call_end))


def round_grammar(
    tokenizer: Any, options: Options, tools: Sequence[dict[str, Any]] | None, prompt: Sequence[int], first: bool
) -> str | None:
    """The grammar of one round (None: free), or ``Unconstrainable``."""
    forced = first and bool(tools) and (options.call_required or options.call_name is not None)
    strict = any(tool["function"].get("strict") for tool in tools or ())
    schema = options.answer_schema
    if schema is None and not forced and not strict:
        return None
    reasoning = None
    if initial_state(tokenizer, prompt) == "reasoning":
        reasoning = _marker(tokenizer, tokenizer.think_end)
    call = _call_format(tokenizer) if tools else None
    if tools and call is None:
        unsupported = (
            f"this model's tool-call format ({_parser_name(tokenizer)}) has no grammar here (supported: json_tools)"
        )
        if forced:
            raise Unconstrainable(f"'tool_choice' cannot be enforced: {unsupported}", "tool_choice")
        if schema is not None:
            raise Unconstrainable(
                f"a structured answer with tools on offer cannot be enforced: {unsupported}; "
                "offer no tools ('tool_choice': 'none') to constrain the answer",
                "response_format",
            )
        log.info("strict tools left unconstrained: %s", unsupported)
        return None
    try:
        if forced:
            assert tools is not None and call is not None
            chosen = [t for t in tools if options.call_name in (None, t["function"]["name"])]
            if not chosen:
                missing = f"'tool_choice' names {options.call_name!r}, which is not on offer"
                raise Unconstrainable(missing, "tool_choice")
            return grammars.calls_only(chosen, call, reasoning)
        if schema is not None:
            if tools:
                assert call is not None
                return grammars.answer_or_calls(schema, tools, call, reasoning)
            return grammars.answer(schema, reasoning)
        assert tools is not None and call is not None
        return grammars.text_or_calls(tools, call, reasoning)
    except grammars.SchemaError as exc:
        raise Unconstrainable(f"the tools' schemas cannot be compiled into a grammar: {exc}", "tools") from None
