"""Prompt rendering and output parsing with a real tokenizer (the tiny model's, via mlx_lm)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from mlx_lm.utils import load_tokenizer
from tinymodel import ADD_TOOL

from llm_server.worker.chat import ToolCall, first_messages, parse_output, render, tool_message

CALL = '<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3}}\n</tool_call>'


@pytest.fixture(scope="module")
def tokenizer(tiny_model: Path) -> Any:
    return load_tokenizer(tiny_model)


def test_tool_call_is_parsed_by_mlx_lm_and_markup_leaves_the_text(tokenizer: Any) -> None:
    assert tokenizer.has_tool_calling
    parsed = parse_output(tokenizer, f"Let me add.\n{CALL}", [ADD_TOOL])
    assert [(c.name, c.arguments) for c in parsed.calls] == [("add", {"a": 2, "b": 3})]
    assert parsed.content == "Let me add." and parsed.malformed == []


def test_malformed_call_is_reported_and_never_shown(tokenizer: Any) -> None:
    parsed = parse_output(tokenizer, "Answer: <tool_call>\n{not json\n</tool_call> done", [ADD_TOOL])
    assert parsed.calls == [] and parsed.malformed == ["{not json"]
    assert parsed.content == "Answer:  done"


def test_markup_is_stripped_even_when_no_tools_were_offered(tokenizer: Any) -> None:
    """After the round limit the model answers without tools; stray calls must not leak."""
    parsed = parse_output(tokenizer, f"{CALL}\nThe sum is 5.", None)
    assert "<tool_call>" not in parsed.content and parsed.content == "The sum is 5."


def test_a_stray_end_marker_is_removed_too(tokenizer: Any) -> None:
    parsed = parse_output(tokenizer, 'I ehello"}}\n</tool_call> ok', [ADD_TOOL])
    assert parsed.content == 'I ehello"}}\n ok' and parsed.calls == []


def test_render_shows_tools_and_tool_results(tokenizer: Any) -> None:
    call = ToolCall("add", {"a": 2, "b": 3}, id="call_0")
    messages = first_messages("Be brief.", "What is 2 + 3?")
    messages += [
        {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "id": "call_0", "function": {"name": "add", "arguments": {"a": 2, "b": 3}}}]},
        tool_message(call, "5"),
    ]
    text = tokenizer.decode(render(tokenizer, messages, [ADD_TOOL]))
    assert '"name": "add"' in text and "Be brief." in text and "<tool_response>\n5\n</tool_response>" in text


def test_error_results_say_so_to_the_model() -> None:
    call = ToolCall("slow", {}, id="call_0")
    assert tool_message(call, "timed out after 1s", is_error=True)["content"] == "Error: timed out after 1s"
    assert tool_message(call, "done")["content"] == "done"


def test_no_system_turn_for_an_empty_system_prompt() -> None:
    assert first_messages("", "hi") == [{"role": "user", "content": "hi"}]
