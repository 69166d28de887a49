"""A reasoning model's thinking through the agents' dialects, end to end: Anthropic ``thinking``
blocks when asked for (hidden otherwise), OpenAI Responses ``reasoning`` items, and the chat
endpoints unchanged (reasoning never in the answer).

The model is the tiny one with thinking markers and a template that opens a thinking block
(``thinking_model``): all it writes is reasoning, so the answer's own text is empty.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import anthropic
import pytest

from daemon import Daemon, base_config, serving
from test_openai_e2e import client as openai_client
from thinking_model import write_thinking_model

ASK = [{"role": "user", "content": "Why?"}]


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Iterator[Daemon]:
    model = write_thinking_model(tiny_model, tmp_path_factory.mktemp("thinking") / "model")
    with serving(tmp_path_factory.mktemp("thinking-daemon"), base_config(model, 0, max_tokens=16)) as running:
        yield running


def client(daemon: Daemon) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=f"http://127.0.0.1:{daemon.port}", api_key="unused", max_retries=0)


def test_messages_show_thinking_only_when_asked(daemon: Daemon) -> None:
    thinking = {"type": "enabled", "budget_tokens": 1024}
    shown = client(daemon).messages.create(model="m", max_tokens=10, messages=ASK, thinking=thinking)
    assert [block.type for block in shown.content] == ["thinking", "text"]
    assert shown.content[0].thinking.strip() and shown.content[0].signature == ""
    assert shown.content[1].text == "" and shown.stop_reason == "max_tokens"
    for hidden in ({"type": "disabled"}, None):
        extra = {"thinking": hidden} if hidden else {}
        message = client(daemon).messages.create(model="m", max_tokens=10, messages=ASK, **extra)
        assert [block.type for block in message.content] == ["text"] and message.content[0].text == ""
    with client(daemon).messages.stream(model="m", max_tokens=10, messages=ASK, thinking=thinking) as stream:
        events = list(stream)
        final = stream.get_final_message()
    deltas = [e.delta.thinking for e in events if e.type == "content_block_delta" and e.delta.type == "thinking_delta"]
    assert len(deltas) > 1 and "".join(deltas) == shown.content[0].thinking
    assert final.content[0].type == "thinking" and final.content[0].thinking == shown.content[0].thinking


def test_thinking_sent_back_is_accepted(daemon: Daemon) -> None:
    history = [*ASK, {"role": "assistant", "content": [{"type": "thinking", "thinking": "hmm", "signature": "x"},
                                                       {"type": "redacted_thinking", "data": "opaque"},
                                                       {"type": "text", "text": "Because."}]},
               {"role": "user", "content": "And?"}]  # fmt: skip
    assert client(daemon).messages.create(model="m", max_tokens=4, messages=history).stop_reason == "max_tokens"


def test_responses_reasoning_item(daemon: Daemon) -> None:
    response = openai_client(daemon).responses.create(model="m", input="Why?", max_output_tokens=10)
    reasoning, message = response.output
    assert reasoning.type == "reasoning" and reasoning.content[0].text.strip()
    assert message.type == "message" and response.output_text == ""
    events = list(openai_client(daemon).responses.create(model="m", input="Why?", max_output_tokens=10, stream=True))
    text = "".join(e.delta for e in events if e.type == "response.reasoning_text.delta")
    assert text == reasoning.content[0].text
    assert [item.type for item in events[-1].response.output] == ["reasoning", "message"]
    follow = openai_client(daemon).responses.create(model="m", input=[*response.output, {"role": "user",
                                                    "content": "And?"}], max_output_tokens=4)  # fmt: skip
    assert follow.status == "incomplete"


def test_chat_completions_never_show_reasoning(daemon: Daemon) -> None:
    completion = openai_client(daemon).chat.completions.create(model="m", messages=ASK, max_tokens=10)
    assert completion.choices[0].message.content == "" and completion.usage.completion_tokens == 10
