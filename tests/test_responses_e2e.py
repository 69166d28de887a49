"""The OpenAI Responses API end to end: the official ``openai`` package, and raw bodies in the
shapes Codex sends, against the real daemon.

Plain text uses the untrained tiny model (greedy, never stops on its own: answers end at
``max_output_tokens``, status ``incomplete``); tools use the tiny model trained to call the calc
server's tools, as the daemon's own MCP tools and as the client's function tools.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

import openai
import pytest

from daemon import Daemon, base_config, serving, sse_events
from test_openai_e2e import calc_tool_specs, client, tool_config
from tool_model import calc_servers


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Iterator[Daemon]:
    with serving(tmp_path_factory.mktemp("responses"), base_config(tiny_model, 0, max_tokens=30)) as daemon:
        yield daemon


def test_response(plain: Daemon) -> None:
    response = client(plain).responses.create(model="gpt-5-codex", input="Why?", max_output_tokens=12)
    assert response.id.startswith("resp_") and response.object == "response" and response.model == "gpt-5-codex"
    assert response.status == "incomplete" and response.incomplete_details.reason == "max_output_tokens"
    (item,) = response.output
    assert item.type == "message" and item.role == "assistant" and item.content[0].type == "output_text"
    assert response.output_text == item.content[0].text and response.output_text
    assert response.usage.output_tokens == 12 and response.usage.input_tokens > 0
    assert response.usage.total_tokens == response.usage.input_tokens + 12


def test_stream_events_and_their_text(plain: Daemon) -> None:
    """The typed events in the API's order, numbered from 0; the deltas join to the plain text."""
    whole = client(plain).responses.create(model="m", input="Why?", max_output_tokens=20, store=False)
    events = list(client(plain).responses.create(model="m", input="Why?", max_output_tokens=20, stream=True,
                                                 store=False))  # fmt: skip
    assert [event.sequence_number for event in events] == list(range(len(events)))
    kinds = [event.type for event in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]  # fmt: skip
    assert set(kinds[4:-4]) == {"response.output_text.delta"}
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.incomplete"]  # fmt: skip
    text = "".join(event.delta for event in events if event.type == "response.output_text.delta")
    assert text == whole.output_text and events[-4].text == text
    assert events[-1].response.output[0].content[0].text == text
    assert events[-1].response.usage.output_tokens == 20


def test_previous_response_id_continues_and_store_false_keeps_nothing(plain: Daemon) -> None:
    first = client(plain).responses.create(model="m", input="Why?", max_output_tokens=5, instructions="Be a pirate.")
    second = client(plain).responses.create(model="m", input="And then?", max_output_tokens=5,
                                            previous_response_id=first.id)  # fmt: skip
    assert second.previous_response_id == first.id
    # the whole first exchange was prompted again: more than it alone
    assert second.usage.input_tokens > first.usage.input_tokens + first.usage.output_tokens
    unstored = client(plain).responses.create(model="m", input="Why?", max_output_tokens=5, store=False)
    for missing in (unstored.id, "resp_nothing"):
        with pytest.raises(openai.NotFoundError) as caught:
            client(plain).responses.create(model="m", input="More", previous_response_id=missing)
        assert caught.value.body["param"] == "previous_response_id" and missing in caught.value.body["message"]


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "http://x/y.png"}]}]},
         "'input_image'"),
        ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "'item_reference'"),
        ({"tool_choice": {"type": "web_search"}}, "tool_choice"),
        ({"text": {"format": {"type": "json_schema", "name": "x", "schema": {"not": {}}}}}, "text.format"),
        ({"max_output_tokens": 0}, "max_output_tokens"),
    ],
    ids=["image", "item-reference", "hosted-tool-choice", "unsupported-schema", "zero-tokens"],
)  # fmt: skip
def test_what_cannot_be_honoured_is_a_400_naming_it(plain: Daemon, fields: dict[str, Any], named: str) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client(plain).responses.create(**{"model": "m", "input": "Why?", **fields})
    assert named in caught.value.body["message"]


def test_codex_request_shape(plain: Daemon) -> None:
    """A body as Codex CLI sends it: instructions, developer and user items of input_text parts,
    function tools beside web_search, local_shell, custom and namespace tools (left out, not
    refused), reasoning, store false, include, prompt_cache_key, text.verbosity; streamed."""
    body = {
        "model": "gpt-5-codex",
        "instructions": "You are Codex, a coding agent.",
        "input": [
            {"type": "message", "role": "developer", "content": [{"type": "input_text", "text": "<permissions/>"}]},
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "<environment_context/>"}]},
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "list the files"}]},
        ],
        "tools": [
            {"type": "function", "name": "shell", "description": "Runs a shell command.", "strict": False,
             "parameters": {"type": "object", "properties": {"command": {"type": "array", "items": {"type": "string"}}},
                            "required": ["command"], "additionalProperties": False}},
            {"type": "web_search"},
            {"type": "local_shell"},
            {"type": "custom", "name": "apply_patch", "description": "Patch files.",
             "format": {"type": "grammar", "syntax": "lark", "definition": "start: /.+/"}},
            {"type": "namespace", "name": "mcp__files", "tools": []},
        ],
        "tool_choice": "auto",
        "parallel_tool_calls": False,
        "reasoning": {"effort": "medium", "summary": "auto"},
        "store": False,
        "stream": True,
        "include": ["reasoning.encrypted_content"],
        "prompt_cache_key": "0199a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b",
        "text": {"verbosity": "medium"},
        "max_output_tokens": 6,
    }  # fmt: skip
    status, _, events = sse_events(plain, "/v1/responses", body, headers={"Authorization": "Bearer codex"},
                                   named=True)  # fmt: skip
    assert status == 200, events
    assert all(name == data["type"] for name, data in events)
    assert events[0][0] == "response.created" and events[-1][0] == "response.incomplete"
    assert events[-1][1]["response"]["store"] is False
    log = plain.log_text()
    for skipped in ("'web_search'", "'local_shell'", "'custom'", "'namespace'"):
        assert skipped in log


# --- tools --------------------------------------------------------------------------------------


def function_tools() -> list[dict[str, Any]]:
    """The calc server's tools as Responses function tools (what the tool model learnt)."""
    return [{"type": "function", **spec["function"]} for spec in calc_tool_specs()]


@pytest.fixture(scope="module")
def calc(tmp_path_factory: pytest.TempPathFactory, tool_model: Path) -> Iterator[Daemon]:
    with serving(tmp_path_factory.mktemp("responses-calc"), tool_config(tool_model, calc_servers())) as daemon:
        yield daemon


def test_server_side_mcp_tool(calc: Daemon) -> None:
    response = client(calc).responses.create(model="m", input="What is 2 + 3?")
    assert response.status == "completed" and response.output_text == "2 + 3 = 5."
    assert [item.type for item in response.output] == ["message"]
    assert "tool call add server=calc" in calc.log_text()


def test_client_function_round_trip(calc: Daemon, make_daemon: Any, tool_model: Path) -> None:
    """Scenario: no MCP server; the client offers the calc tools as function tools:
    1. "What is 2 + 3?": the output is a ``function_call`` (``add``, JSON arguments, a call_id),
       streamed (arguments as deltas) or not alike;
    2. the client sends the items back with a ``function_call_output``: the model answers;
    3. the same through ``previous_response_id``, sending only the output;
    4. the same tools beside the daemon's own MCP tools of the same name: a 400."""
    daemon = make_daemon(tool_config(tool_model, {})).start().wait_serving()
    first = client(daemon).responses.create(model="m", input="What is 2 + 3?", tools=function_tools())
    (call,) = first.output
    assert call.type == "function_call" and call.name == "add" and json.loads(call.arguments) == {"a": 2, "b": 3}
    events = list(client(daemon).responses.create(model="m", input="What is 2 + 3?", tools=function_tools(),
                                                  stream=True))  # fmt: skip
    deltas = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    assert json.loads(deltas) == {"a": 2, "b": 3} and events[-1].type == "response.completed"
    assert [item.type for item in events[-1].response.output] == ["function_call"]
    output = {"type": "function_call_output", "call_id": call.call_id, "output": "5"}
    history = [{"role": "user", "content": "What is 2 + 3?"}, call.model_dump(exclude_none=True), output]
    answered = client(daemon).responses.create(model="m", input=history, tools=function_tools())
    assert answered.output_text == "2 + 3 = 5." and answered.status == "completed"
    continued = client(daemon).responses.create(model="m", input=[output], tools=function_tools(),
                                                previous_response_id=first.id)  # fmt: skip
    assert continued.output_text == "2 + 3 = 5."
    with pytest.raises(openai.BadRequestError, match="'add' clashes"):
        client(calc).responses.create(model="m", input="What is 2 + 3?", tools=function_tools())
