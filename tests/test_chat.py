"""Prompt rendering and output reading with a real tokenizer (the tiny model's, via mlx_lm)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from mlx_lm.utils import load_tokenizer
from tinymodel import ADD_TOOL

from llm_server.common.protocol import prompt_messages
from llm_server.model_worker.chat import ToolCall, render, template_messages, tool_message
from llm_server.model_worker.output import RoundReader, TextReader, VisibleText

CALL = '<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3}}\n</tool_call>'


@pytest.fixture(scope="module")
def tokenizer(tiny_model: Path) -> Any:
    return load_tokenizer(tiny_model)


def parse_output(tokenizer: Any, text: str, tools: Any) -> Any:
    """A whole round's text read at once (what the worker does piece by piece)."""
    reader = TextReader(tokenizer, tools)
    reader.feed(text)
    reader.finish("length")
    return reader


def test_tool_call_is_parsed_by_mlx_lm_and_markup_leaves_the_text(tokenizer: Any) -> None:
    assert tokenizer.has_tool_calling
    parsed = parse_output(tokenizer, f"Let me add.\n{CALL}", [ADD_TOOL])
    assert [(c.name, c.arguments) for c in parsed.calls] == [("add", {"a": 2, "b": 3})]
    assert parsed.content == "Let me add." and parsed.malformed == []


def test_malformed_call_is_reported_and_never_shown(tokenizer: Any) -> None:
    parsed = parse_output(tokenizer, "Answer: <tool_call>\n{not json\n</tool_call> done", [ADD_TOOL])
    assert parsed.calls == [] and parsed.malformed == ["{not json"]
    assert parsed.content == "Answer:  done"


def test_malformed_call_is_kept_as_text_when_asked(tokenizer: Any) -> None:
    """The OpenAI endpoints return markup that does not parse as the assistant's text, in place,
    streamed or not; a call cut off by the length limit has no end marker to show."""
    text = "Answer: <tool_call>\n{not json\n</tool_call> done"
    reader = TextReader(tokenizer, [ADD_TOOL], keep_malformed=True)
    shown = reader.feed(text) + reader.finish("stop")
    assert shown == reader.content == text and reader.calls == [] and reader.malformed == ["{not json"]
    ids = tokenizer.encode(text, add_special_tokens=False)
    one_by_one = RoundReader(tokenizer, [], [ADD_TOOL], keep_malformed=True)
    pieces = [one_by_one.add([token]) for token in ids] + [one_by_one.close("stop")]
    assert "".join(pieces) == text
    cut = TextReader(tokenizer, [ADD_TOOL], keep_malformed=True)
    assert cut.feed('<tool_call>\n{"name": "add", "argu') + cut.finish("length") == '<tool_call>\n{"name": "add", "argu'


def test_verbatim_text_keeps_every_space() -> None:
    visible = VisibleText(verbatim=True)
    assert visible.push("  ") == "  " and visible.push(" Hi ") == " Hi "
    visible.new_round()
    assert visible.push("\nthere") == "\nthere"
    assert visible.text == "   Hi \nthere"


def test_markup_is_stripped_even_when_no_tools_were_offered(tokenizer: Any) -> None:
    """After the round limit the model answers without tools; stray calls must not leak."""
    parsed = parse_output(tokenizer, f"{CALL}\nThe sum is 5.", None)
    assert "<tool_call>" not in parsed.content and parsed.content == "The sum is 5."


def test_streamed_reading_equals_reading_at_once(tokenizer: Any) -> None:
    """Fed one token at a time, the visible text is the same as fed all at once, and markup is
    held back until it is known: no piece of ``<tool_call>`` ever shows."""
    text = f"Let me add.\n{CALL}\nThe sum is 5.  "
    ids = tokenizer.encode(text, add_special_tokens=False)
    whole, pieces = VisibleText(), VisibleText()
    at_once = RoundReader(tokenizer, [], [ADD_TOOL])
    whole.push(at_once.add(ids))
    whole.push(at_once.close("length"))
    one_by_one = RoundReader(tokenizer, [], [ADD_TOOL])
    shown = [pieces.push(one_by_one.add([token])) for token in ids] + [pieces.push(one_by_one.close("length"))]
    assert whole.text == pieces.text == "".join(shown) == "Let me add.\n\nThe sum is 5."
    assert not any("<" in piece for piece in shown)
    assert [(c.name, c.arguments) for c in one_by_one.calls] == [("add", {"a": 2, "b": 3})]


def test_rounds_are_joined_by_a_blank_line_and_trimmed() -> None:
    visible = VisibleText()
    assert visible.push("  Let me check. ") == "Let me check."
    visible.new_round()
    assert visible.push("\n") == ""
    assert visible.push(" It is 5") == "\n\nIt is 5"
    assert visible.push(" \n") == ""
    assert visible.text == "Let me check.\n\nIt is 5"


def test_openai_messages_become_template_messages() -> None:
    """mlx-lm's own conversion: text parts joined, null content, arguments decoded; on a copy."""
    messages = [
        {"role": "user", "content": [{"type": "text", "text": "What is "}, {"type": "text", "text": "2 + 3?"}]},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "add", "arguments": '{"a": 2, "b": 3}'}}]},
    ]
    converted = template_messages(messages)
    assert converted[0]["content"] == "What is 2 + 3?" and converted[1]["content"] == ""
    assert converted[1]["tool_calls"][0]["function"]["arguments"] == {"a": 2, "b": 3}
    assert messages[1]["content"] is None  # the request's own messages are untouched


def test_render_shows_tools_and_tool_results(tokenizer: Any) -> None:
    call = ToolCall("add", {"a": 2, "b": 3}, id="call_0")
    messages = prompt_messages("Be brief.", "What is 2 + 3?")
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
    assert prompt_messages("", "hi") == [{"role": "user", "content": "hi"}]


def test_a_leading_space_survives_the_detokenizer(tokenizer: Any) -> None:
    """mlx-lm's BPE streaming detokenizer trims a generation's first space; the reader keeps it."""
    text = "   Hi there"
    ids = tokenizer.encode(text, add_special_tokens=False)
    reader = RoundReader(tokenizer, [], None)
    assert "".join(reader.add([token]) for token in ids) + reader.close("length") == text
    once = RoundReader(tokenizer, [], None)
    assert once.add(ids) + once.close("length") == text
