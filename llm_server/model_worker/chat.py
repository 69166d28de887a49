"""The conversation in the chat template's format, rendered by the tokenizer's own machinery.

Prompts are rendered by the model's chat template (``apply_chat_template`` with ``tools``), so
any model family mlx-lm supports works without a hand-written format; reading the model's output
back is ``output``'s job. The same functions render the transcripts the test model is trained
on, which keeps training and serving byte-for-byte identical.
"""

from __future__ import annotations

import copy
import uuid
from dataclasses import dataclass, field
from typing import Any, Sequence

from mlx_lm.server import process_message_content

Message = dict[str, Any]


def template_messages(messages: Sequence[Message]) -> list[Message]:
    """A request's messages (OpenAI style, checked by the HTTP process) in the form chat templates
    take, by mlx-lm's own ``process_message_content`` (text parts joined, a null content made "",
    tool-call arguments decoded from JSON), on a copy."""
    copied = copy.deepcopy(list(messages))
    process_message_content(copied)
    return copied


def render(tokenizer: Any, messages: Sequence[Message], tools: Sequence[dict[str, Any]] | None) -> list[int]:
    """Token ids of the conversation so far, ending with the assistant's generation prompt."""
    return list(
        tokenizer.apply_chat_template(list(messages), tools=list(tools) if tools else None, add_generation_prompt=True)
    )


def render_opening(tokenizer: Any, system_prompt: str, tools: Sequence[dict[str, Any]] | None) -> list[int]:
    """Token ids of the system turn alone, as every conversation that starts with it renders it
    (no generation prompt): the prefix the prompt cache is warmed with."""
    return list(
        tokenizer.apply_chat_template(
            [{"role": "system", "content": system_prompt}], tools=list(tools) if tools else None,
            add_generation_prompt=False,
        )
    )  # fmt: skip


@dataclass(frozen=True)
class ToolCall:
    """One parsed call: the model's name for the tool and its arguments."""

    name: str
    arguments: dict[str, Any]
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:12]}")


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
