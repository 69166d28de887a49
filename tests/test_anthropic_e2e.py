"""The Anthropic Messages API end to end: the official ``anthropic`` package, and raw bodies in
the shapes Claude Code sends, against the real daemon.

Plain text uses the untrained tiny model (greedy, never stops on its own, so answers end at
``max_tokens`` or a stop sequence); tools use the tiny model trained to call the calc server's
tools, once as the daemon's own MCP tools (run server-side, unseen by the client) and once sent
by the client (the call comes back as ``tool_use`` and the client answers with ``tool_result``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

import anthropic
import pytest

from daemon import Daemon, base_config, serving, sse_events
from test_openai_e2e import calc_tool_specs, tool_config
from tool_model import calc_servers

KEY = "sk-ant-test-0123456789"
HI = [{"role": "user", "content": "Why is the sky blue?"}]


def client(daemon: Daemon, **auth: Any) -> anthropic.Anthropic:
    auth = auth or {"api_key": KEY}
    return anthropic.Anthropic(base_url=f"http://127.0.0.1:{daemon.port}", max_retries=0, **auth)


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Iterator[Daemon]:
    config = base_config(tiny_model, 0, max_tokens=30, api_key=KEY)
    with serving(tmp_path_factory.mktemp("anthropic"), config) as daemon:
        yield daemon


def test_message(plain: Daemon) -> None:
    message = client(plain).messages.create(model="claude-sonnet-4-5", max_tokens=12, messages=HI)
    assert message.type == "message" and message.role == "assistant" and message.id.startswith("msg_")
    assert message.model == "claude-sonnet-4-5"  # one model is served, under whatever name is asked
    (block,) = message.content
    assert block.type == "text" and block.text
    assert message.stop_reason == "max_tokens" and message.stop_sequence is None
    assert message.usage.output_tokens == 12 and message.usage.input_tokens > 0


def test_stream_joins_to_the_plain_message(plain: Daemon) -> None:
    plain_message = client(plain).messages.create(model="m", max_tokens=20, messages=HI)
    with client(plain).messages.stream(model="m", max_tokens=20, messages=HI) as stream:
        texts = list(stream.text_stream)
        final = stream.get_final_message()
    assert len(texts) > 1 and "".join(texts) == plain_message.content[0].text
    assert final.content[0].text == plain_message.content[0].text and final.stop_reason == "max_tokens"
    assert final.usage.output_tokens == 20
    assert final.usage.input_tokens + final.usage.cache_read_input_tokens == (
        plain_message.usage.input_tokens + plain_message.usage.cache_read_input_tokens
    )


def test_stream_events_come_in_the_apis_order(plain: Daemon) -> None:
    status, headers, events = sse_events(
        plain, "/v1/messages", {"model": "m", "max_tokens": 5, "messages": HI, "stream": True},
        headers={"x-api-key": KEY}, named=True,
    )  # fmt: skip
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    assert all(name == data["type"] for name, data in events)  # every event: its name = its type
    kinds = [name for name, _ in events]
    assert kinds[:3] == ["message_start", "ping", "content_block_start"]
    assert set(kinds[3:-3]) == {"content_block_delta"}
    assert kinds[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    delta = events[-2][1]
    assert delta["delta"] == {"stop_reason": "max_tokens", "stop_sequence": None}
    assert delta["usage"]["output_tokens"] == 5


def test_stop_sequence_ends_the_answer_and_is_named(plain: Daemon) -> None:
    pirate = {"model": "m", "max_tokens": 30, "system": "You are a pirate.", "messages": [{"role": "user", "content": "Why?"}]}
    full = client(plain).messages.create(**pirate).content[0].text
    word = full.split()[2]
    at = full.find(word)  # the text stops at the word's first appearance
    message = client(plain).messages.create(**pirate, stop_sequences=[word, "\x00"])
    assert message.stop_reason == "stop_sequence" and message.stop_sequence == word
    assert message.content[0].text == full[:at]


def test_sampling_fields_are_honoured(plain: Daemon) -> None:
    """``top_k`` 1 at temperature 1 is greedy: the answer of temperature 0; without it, sampling
    at a high temperature differs."""
    greedy = client(plain).messages.create(model="m", max_tokens=20, messages=HI).content[0].text
    one = client(plain).messages.create(model="m", max_tokens=20, messages=HI,
                                        extra_body={"temperature": 1.0, "top_k": 1})  # fmt: skip
    assert one.content[0].text == greedy
    hot = {"temperature": 1.0, "top_p": 1.0}
    sampled = {client(plain).messages.create(model="m", max_tokens=20, messages=HI, extra_body=hot).content[0].text
               for _ in range(3)}  # fmt: skip
    assert sampled != {greedy}


def test_count_tokens_is_the_whole_prompt_of_usage(plain: Daemon) -> None:
    system = [{"type": "text", "text": "You are terse.", "cache_control": {"type": "ephemeral"}}]
    tools = [{"name": "lookup", "description": "Look a word up.", "input_schema": {"type": "object"}}]
    counted = client(plain).messages.count_tokens(model="m", system=system, messages=HI, tools=tools)
    message = client(plain).messages.create(model="m", max_tokens=3, system=system, messages=HI, tools=tools)
    assert counted.input_tokens > 0
    assert counted.input_tokens == message.usage.input_tokens + message.usage.cache_read_input_tokens
    again = client(plain).messages.create(model="m", max_tokens=3, system=system, messages=HI, tools=tools)
    assert again.usage.cache_read_input_tokens > 0  # the prompt cache, reported as the API reports it
    assert counted.input_tokens == again.usage.input_tokens + again.usage.cache_read_input_tokens


def test_key_in_either_header(plain: Daemon) -> None:
    assert client(plain, auth_token=KEY).messages.create(model="m", max_tokens=2, messages=HI).content
    with pytest.raises(anthropic.AuthenticationError) as caught:
        client(plain, api_key="wrong").messages.create(model="m", max_tokens=2, messages=HI)
    assert caught.value.body["error"]["type"] == "authentication_error"


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"max_tokens": None}, "max_tokens"),
        ({"messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]}, "'image'"),
        ({"tool_choice": {"type": "tool", "name": "nope"}}, "'nope'"),
        ({"thinking": {"type": "sometimes"}}, "thinking.type"),
        ({"output_config": {"format": {"type": "json_schema", "schema": {"not": {}}}}}, "output_config.format"),
    ],
    ids=["no-max-tokens", "image", "unknown-tool", "thinking", "unsupported-schema"],
)
def test_what_cannot_be_honoured_is_a_400_naming_it(plain: Daemon, change: dict[str, Any], named: str) -> None:
    body = {"model": "m", "max_tokens": 5, "messages": HI, **change}
    body = {key: value for key, value in body.items() if value is not None}
    response = plain.request("POST", "/v1/messages", json.dumps(body).encode(),
                             {"x-api-key": KEY, "content-type": "application/json"})  # fmt: skip
    assert response.status == 400
    error = response.json()
    assert error["type"] == "error" and error["error"]["type"] == "invalid_request_error"
    assert named in error["error"]["message"]


def test_errors_under_v1_messages_take_the_apis_shape(plain: Daemon) -> None:
    missing = plain.request("GET", "/v1/messages", headers={"x-api-key": KEY})
    assert missing.status == 405 and missing.json()["type"] == "error"
    unknown = plain.request("POST", "/v1/messages/batches", b"{}", {"x-api-key": KEY})
    assert unknown.status == 404 and unknown.json()["error"]["type"] == "not_found_error"


def test_claude_code_request_shape(plain: Daemon) -> None:
    """A body as Claude Code sends it: system blocks with cache_control, metadata.user_id,
    thinking, context_management, tools with cache_control, beta and version headers, a
    streamed answer; what changes nothing here is accepted and ignored."""
    body = {
        "model": "claude-opus-4-1-20250805",
        "max_tokens": 8,
        "stream": True,
        "system": [
            {"type": "text", "text": "You are Claude Code, Anthropic's official CLI for Claude."},
            {"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}},
        ],
        "messages": [
            {"role": "user", "content": [
                {"type": "text", "text": "<system-reminder>ctx</system-reminder>"},
                {"type": "text", "text": "list the files", "cache_control": {"type": "ephemeral"}},
            ]},
        ],  # fmt: skip
        "tools": [{"name": "Bash", "description": "Run a command.", "cache_control": {"type": "ephemeral"},
                   "input_schema": {"type": "object", "properties": {"command": {"type": "string"}},
                                    "required": ["command"], "additionalProperties": False,
                                    "$schema": "http://json-schema.org/draft-07/schema#"}},
                  {"type": "web_search_20250305", "name": "web_search", "max_uses": 5}],  # fmt: skip
        "metadata": {"user_id": "user_abc_account_def_session_123"},
        "thinking": {"type": "enabled", "budget_tokens": 4000},
        "context_management": {"edits": [{"type": "clear_thinking_20251015", "keep": "all"}]},
        "temperature": 1,
    }
    headers = {
        "x-api-key": KEY, "anthropic-version": "2023-06-01", "x-app": "cli",
        "anthropic-beta": "claude-code-20250219,interleaved-thinking-2025-05-14,context-management-2025-06-27",
        "user-agent": "claude-cli/2.0.0 (external, cli)",
    }  # fmt: skip
    status, _, events = sse_events(plain, "/v1/messages?beta=true", body, headers=headers, named=True)
    assert status == 200, events
    assert events[0][0] == "message_start" and events[-1][0] == "message_stop"
    assert events[-2][1]["delta"]["stop_reason"] in ("max_tokens", "end_turn")  # sampled at temperature 1
    # the tiny model has no thinking markers: it has no thinking to show, only text
    assert {data["content_block"]["type"] for name, data in events if name == "content_block_start"} == {"text"}
    assert "web_search" in plain.log_text() and "not offered here" in plain.log_text()


# --- tools --------------------------------------------------------------------------------------


def anthropic_tools() -> list[dict[str, Any]]:
    """The calc server's tools in the Messages API's form (what the tool model learnt)."""
    return [
        {"name": t["function"]["name"], "description": t["function"]["description"],
         "input_schema": t["function"]["parameters"]}
        for t in calc_tool_specs()
    ]  # fmt: skip


@pytest.fixture(scope="module")
def calc(tmp_path_factory: pytest.TempPathFactory, tool_model: Path) -> Iterator[Daemon]:
    # tool_timeout_s above the slow tool's 5 s: the stream has to wait for it (and ping meanwhile)
    config = {**tool_config(tool_model, calc_servers()), "tool_timeout_s": 8.0}
    with serving(tmp_path_factory.mktemp("anthropic-calc"), config) as daemon:
        yield daemon


def test_server_side_mcp_tool(calc: Daemon) -> None:
    message = client(calc).messages.create(model="m", max_tokens=200, messages=[
        {"role": "user", "content": "What is 2 + 3?"}])  # fmt: skip
    assert [block.type for block in message.content] == ["text"] and message.content[0].text == "2 + 3 = 5."
    assert message.stop_reason == "end_turn"
    assert "tool call add server=calc" in calc.log_text()


def test_stream_pings_while_a_server_side_tool_runs(calc: Daemon) -> None:
    body = {"model": "m", "max_tokens": 200, "stream": True,
            "messages": [{"role": "user", "content": "Wait for 5 seconds."}]}  # fmt: skip
    status, _, events = sse_events(calc, "/v1/messages", body, named=True)
    kinds = [name for name, _ in events]
    assert status == 200 and kinds[0] == "message_start" and kinds[-1] == "message_stop"
    assert kinds.count("ping") >= 2  # one after message_start, more while the 5 s tool ran
    text = "".join(data["delta"]["text"] for name, data in events if name == "content_block_delta")
    assert text  # (the model learnt the tool timing out; here it finishes, and the model improvises)
    assert "tool call slow server=calc" in calc.log_text()


def test_client_tool_round_trip(calc: Daemon, make_daemon: Any, tool_model: Path) -> None:
    """Scenario: no MCP server; the client offers the calc tools in the Messages API's form:
    1. "What is 2 + 3?": the turn ends with ``tool_use`` (``add``, input an object), streamed
       or not alike (the streamed input arrives as ``input_json_delta``);
    2. the client answers with a ``tool_result``: the model answers with the sum;
    3. the same tools beside the daemon's own MCP tools of the same name: a 400."""
    daemon = make_daemon(tool_config(tool_model, {})).start().wait_serving()
    question = [{"role": "user", "content": "What is 2 + 3?"}]
    first = client(daemon).messages.create(model="m", max_tokens=200, messages=question, tools=anthropic_tools())
    assert first.stop_reason == "tool_use"
    (call,) = [block for block in first.content if block.type == "tool_use"]
    assert call.name == "add" and call.input == {"a": 2, "b": 3} and call.id
    with client(daemon).messages.stream(model="m", max_tokens=200, messages=question, tools=anthropic_tools()) as s:
        streamed = s.get_final_message()
    assert streamed.stop_reason == "tool_use"
    assert [(b.name, b.input) for b in streamed.content if b.type == "tool_use"] == [("add", {"a": 2, "b": 3})]
    answered = client(daemon).messages.create(
        model="m", max_tokens=200, tools=anthropic_tools(),
        messages=[
            *question,
            {"role": "assistant", "content": [block.model_dump() for block in first.content]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "5"}]},
        ],
    )  # fmt: skip
    assert answered.content[0].text == "2 + 3 = 5." and answered.stop_reason == "end_turn"
    with pytest.raises(anthropic.BadRequestError, match="'add' clashes"):
        client(calc).messages.create(model="m", max_tokens=20, messages=question, tools=anthropic_tools())

