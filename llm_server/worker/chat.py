"""Chat formatting and model-output parsing, done with the tokenizer's own machinery.

Prompts are rendered by the model's chat template (``apply_chat_template`` with ``tools``), and
tool calls are found with the markers and parser mlx-lm picked for this tokenizer
(``tool_call_start``/``tool_call_end``/``tool_parser``), so any model family mlx-lm supports works
without a hand-written format. The same functions render the transcripts the test model is
trained on, which keeps training and serving byte-for-byte identical.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any, Sequence

Message = dict[str, Any]


def first_messages(system_prompt: str, prompt: str) -> list[Message]:
    """The conversation a request starts with (no system turn when the prompt is empty)."""
    messages: list[Message] = []
    if system_prompt:
        messages.append({"role": "system", "content": system_prompt})
    messages.append({"role": "user", "content": prompt})
    return messages


def render(tokenizer: Any, messages: Sequence[Message], tools: Sequence[dict[str, Any]] | None) -> list[int]:
    """Token ids of the conversation so far, ending with the assistant's generation prompt."""
    return list(
        tokenizer.apply_chat_template(list(messages), tools=list(tools) if tools else None, add_generation_prompt=True)
    )


@dataclass(frozen=True)
class ToolCall:
    """One parsed call: the model's name for the tool and its arguments."""

    name: str
    arguments: dict[str, Any]
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:12]}")


@dataclass(frozen=True)
class ParsedOutput:
    """An assistant turn split into visible text, tool calls and calls that did not parse."""

    content: str
    calls: list[ToolCall]
    malformed: list[str]


def parse_output(tokenizer: Any, text: str, tools: Sequence[dict[str, Any]] | None) -> ParsedOutput:
    """Split generated text: thinking removed, tool-call blocks parsed with mlx-lm's parser."""
    text = strip_thinking(tokenizer, text)
    start = getattr(tokenizer, "tool_call_start", None) if getattr(tokenizer, "has_tool_calling", False) else None
    end = getattr(tokenizer, "tool_call_end", None)
    if not start:
        return ParsedOutput(text.strip(), [], [])
    pieces: list[str] = []
    calls: list[ToolCall] = []
    malformed: list[str] = []
    rest = text
    while True:
        at = rest.find(start)
        if at < 0:
            pieces.append(rest)
            break
        pieces.append(rest[:at])
        rest = rest[at + len(start) :]
        stop = rest.find(end) if end else -1
        body, rest = (rest, "") if stop < 0 else (rest[:stop], rest[stop + len(end) :])
        try:
            parsed = tokenizer.tool_parser(body, list(tools or []))
        except Exception:  # noqa: BLE001 - any parser failure means "not a usable call"
            malformed.append(body.strip())
            continue
        for item in parsed if isinstance(parsed, list) else [parsed]:
            call = _as_call(item)
            if call is None:
                malformed.append(body.strip())
            else:
                calls.append(call)
    content = "".join(pieces)
    if end:  # a stray end marker (no start before it) is markup too
        content = content.replace(end, "")
    return ParsedOutput(content.strip(), calls, malformed)


def _as_call(item: Any) -> ToolCall | None:
    if not isinstance(item, dict) or not isinstance(item.get("name"), str):
        return None
    arguments = item.get("arguments", {})
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except ValueError:
            return None
    if not isinstance(arguments, dict):
        return None
    return ToolCall(item["name"], arguments)


def strip_thinking(tokenizer: Any, text: str) -> str:
    """Drop a reasoning block (the template may have opened it, so cut up to its end marker)."""
    if not getattr(tokenizer, "has_thinking", False):
        return text
    think_start, think_end = tokenizer.think_start, tokenizer.think_end
    if think_end and think_end in text:
        head, _, tail = text.rpartition(think_end)
        before = head.split(think_start, 1)[0] if think_start and think_start in head else ""
        return before + tail
    if think_start and think_start in text:  # unfinished thinking: nothing to show from it
        return text.split(think_start, 1)[0]
    return text


def assistant_message(content: str, calls: Sequence[ToolCall]) -> Message:
    """The assistant turn as the chat template expects it back (OpenAI style)."""
    message: Message = {"role": "assistant", "content": content}
    if calls:
        message["tool_calls"] = [
            {"type": "function", "id": call.id, "function": {"name": call.name, "arguments": call.arguments}}
            for call in calls
        ]
    return message


def tool_message(call: ToolCall, content: str, is_error: bool = False) -> Message:
    """A tool result, answered to the call with the same id.

    Chat templates render only a tool message's text, so an error (the tool's own, a timeout,
    a dead server) says so in the text: the model must not take it for the tool's answer.
    """
    text = f"Error: {content}" if is_error else content
    return {"role": "tool", "tool_call_id": call.id, "name": call.name, "content": text}


def withdraw_tool_results(messages: list[Message]) -> None:
    """Replace every tool result by a short error the model can read (they overflowed the window)."""
    for message in messages:
        if message.get("role") == "tool":
            size = len(message["content"])
            message["content"] = f"Error: the result ({size} characters) does not fit in the model's context window"
