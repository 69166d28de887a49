"""The OpenAI protocol end to end: the official ``openai`` package against the real daemon.

Plain chat uses the untrained tiny model (greedy, never stops on its own); tools use the tiny
model trained to call the calc server's tools (``tool_model``), once with the calc server as an
MCP server of the daemon (the tool runs on the server) and once with the same tools sent by the
client instead (the call comes back as ``tool_calls`` and the client answers it).
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any, Iterator

import openai
import pytest
from daemon import Daemon, base_config, free_port, serving
from tool_model import MAX_TOOL_ROUNDS, SYSTEM_PROMPT, TOOL_TIMEOUT_S, calc_servers

from llm_server.common.config import parse_servers
from llm_server.worker.mcp_host import MCPHost

KEY = "sk-test-0123456789"


def client(daemon: Daemon, key: str = "unused", retries: int = 0) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://127.0.0.1:{daemon.port}/v1", api_key=key, max_retries=retries)


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Iterator[Daemon]:
    with serving(tmp_path_factory.mktemp("plain"), base_config(tiny_model, free_port(), max_tokens=30)) as daemon:
        yield daemon


def tool_config(model: Path, servers: dict, **overrides: Any) -> dict:
    return base_config(
        model, free_port(), servers=servers, system_prompt=SYSTEM_PROMPT, max_tokens=200,
        tool_timeout_s=TOOL_TIMEOUT_S, max_tool_rounds=MAX_TOOL_ROUNDS, **overrides,
    )  # fmt: skip


WHY = [{"role": "system", "content": "You are a pirate."}, {"role": "user", "content": "Why?"}]


def test_chat_completion(plain: Daemon) -> None:
    completion = client(plain).chat.completions.create(model="anything", messages=WHY, max_tokens=12)
    choice = completion.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason == "length" and choice.message.tool_calls is None
    assert completion.usage.completion_tokens == 12 and completion.usage.prompt_tokens > 0
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + 12
    assert completion.model == str(plain.config["model_name"]) and completion.id.startswith("chatcmpl-")
    again = client(plain).chat.completions.create(model="anything", messages=WHY, max_tokens=12)
    assert again.choices[0].message.content == choice.message.content
    assert again.usage.prompt_tokens_details.cached_tokens > 0  # the prompt cache, reported


def test_streaming_with_usage_matches_the_plain_completion(plain: Daemon) -> None:
    full = client(plain).chat.completions.create(model="m", messages=WHY, max_tokens=20)
    stream = client(plain).chat.completions.create(
        model="m", messages=WHY, max_tokens=20, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert len([p for p in pieces if p]) > 1
    assert "".join(pieces) == full.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 20


def test_stop_words_and_the_models_list(plain: Daemon) -> None:
    full = client(plain).chat.completions.create(model="m", messages=WHY, max_tokens=20).choices[0].message.content
    word = full.split()[2]
    stopped = client(plain).chat.completions.create(model="m", messages=WHY, max_tokens=20, stop=[word])
    assert stopped.choices[0].finish_reason == "stop"
    assert word not in stopped.choices[0].message.content and full.startswith(stopped.choices[0].message.content)
    models = client(plain).models.list()
    assert [m.id for m in models.data] == [str(plain.config["model_name"])]


@pytest.mark.parametrize(
    ("request_fields", "param"),
    [({"messages": []}, "messages"), ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
     ({"temperature": 3}, "temperature"), ({"n": 2}, "n"), ({"tool_choice": "required"}, "tool_choice"),
     ({"seed": 7, "temperature": 1.0}, "seed"), ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
     ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools[0].function.name")],
)  # fmt: skip
def test_bad_input_gets_the_openai_error_object(plain: Daemon, request_fields: dict, param: str) -> None:
    fields = {"model": "m", "messages": [{"role": "user", "content": "hi"}], **request_fields}
    with pytest.raises(openai.BadRequestError) as caught:
        client(plain).chat.completions.create(**fields)
    error = caught.value.body
    assert error["type"] == "invalid_request_error" and error["param"] == param and error["message"]


def test_other_errors_use_the_error_object_too(plain: Daemon) -> None:
    # A path that is no endpoint keeps the contract's 404 {"Error"}, under /v1 too.
    assert plain.request("GET", "/v1/nothing").json() == {"Error": "Requested URL /v1/nothing not found"}
    wrong_method = plain.request("GET", "/v1/chat/completions")
    assert wrong_method.status == 405 and "message" in wrong_method.json()["error"]
    not_json = plain.request("POST", "/v1/chat/completions", b"{", {"Content-Type": "application/json"})
    assert not_json.status == 400 and "not valid JSON" in not_json.json()["error"]["message"]
    assert plain.request("GET", "/nothing").json() == {"Error": "Requested URL /nothing not found"}


def test_openapi_document_names_every_route(plain: Daemon) -> None:
    served = plain.request("GET", "/openapi.json").json()
    kept = json.loads((Path(__file__).resolve().parents[1] / "llm_server/http/openapi.json").read_text())
    assert served == kept
    assert set(served["paths"]) == {"/", "/v1/chat/completions", "/v1/models", "/openapi.json"}


def test_bearer_key(make_daemon: Any, tiny_model: Path) -> None:
    """With ``api_key`` set (from the environment, like any secret), ``/`` and ``/v1/*`` need
    the key: a wrong or missing one is 401 in each endpoint's format; the key is never logged."""
    daemon = make_daemon(
        base_config(tiny_model, free_port(), api_key="${LLM_KEY}"), env={"LLM_KEY": KEY}
    ).start().wait_serving()
    with pytest.raises(openai.AuthenticationError):
        client(daemon, "wrong").models.list()
    assert client(daemon, KEY).chat.completions.create(model="m", messages=WHY, max_tokens=3).choices
    missing = daemon.ask("hi")
    assert missing.status == 401 and "API key" in missing.json()["Error"]
    assert missing.headers["www-authenticate"] == "Bearer"
    good = daemon.request("POST", "/", b'{"prompt": "hi"}', {"Authorization": f"Bearer {KEY}"})
    assert good.status == 200
    assert daemon.request("GET", "/openapi.json").status == 200  # the document is public
    daemon.signal()
    assert daemon.wait_exit() == 0
    assert KEY not in daemon.log_text() and KEY not in daemon.output()


# --- tools --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def calc_daemon(tmp_path_factory: pytest.TempPathFactory, tool_model: Path) -> Iterator[Daemon]:
    with serving(tmp_path_factory.mktemp("calc"), tool_config(tool_model, calc_servers())) as daemon:
        yield daemon


def test_server_side_mcp_tool_in_one_request(calc_daemon: Daemon) -> None:
    completion = client(calc_daemon).chat.completions.create(
        model="m", messages=[{"role": "user", "content": "What is 2 + 3?"}]
    )
    assert completion.choices[0].message.content == "2 + 3 = 5."
    assert completion.choices[0].finish_reason == "stop" and completion.choices[0].message.tool_calls is None
    assert "tool call add server=calc" in calc_daemon.log_text()


def test_tool_choice_none_offers_no_tools(calc_daemon: Daemon) -> None:
    before = calc_daemon.log_text().count("tool call add server=calc")
    completion = client(calc_daemon).chat.completions.create(
        model="m", messages=[{"role": "user", "content": "What is 2 + 3?"}], tool_choice="none", max_tokens=40
    )
    assert completion.choices[0].message.tool_calls is None
    assert completion.choices[0].message.content != "2 + 3 = 5."
    assert calc_daemon.log_text().count("tool call add server=calc") == before


def test_client_tool_with_a_server_tools_name_is_a_400(calc_daemon: Daemon) -> None:
    tool = {"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}
    with pytest.raises(openai.BadRequestError, match="'add' clashes"):
        client(calc_daemon).chat.completions.create(model="m", messages=WHY, tools=[tool])


def calc_tool_specs() -> list[dict[str, Any]]:
    """The calc server's tools exactly as the daemon would offer them (what the model learnt)."""

    async def listed() -> list[dict[str, Any]]:
        async with MCPHost(parse_servers(calc_servers()), restart=False) as host:
            return host.tools()

    return asyncio.run(listed())


def test_client_tool_comes_back_as_tool_calls_and_is_answered(
    make_daemon: Any, tool_model: Path
) -> None:
    """Scenario: no MCP server; the client offers the calc tools itself:
    1. "What is 2 + 3?": the model calls ``add``; the turn ends with ``finish_reason``
       ``tool_calls`` and the call (name, JSON arguments, an id), streamed or not alike;
    2. the client runs it and sends the whole conversation back with the result: the model
       answers with the sum."""
    daemon = make_daemon(tool_config(tool_model, {})).start().wait_serving()
    tools = calc_tool_specs()
    question = [{"role": "user", "content": "What is 2 + 3?"}]
    first = client(daemon).chat.completions.create(model="m", messages=question, tools=tools)
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls
    assert call.function.name == "add" and json.loads(call.function.arguments) == {"a": 2, "b": 3}
    streamed = list(client(daemon).chat.completions.create(model="m", messages=question, tools=tools, stream=True))
    deltas = [c.choices[0].delta for c in streamed if c.choices and c.choices[0].delta.tool_calls]
    assert [d.tool_calls[0].function.name for d in deltas] == ["add"]
    assert [c.choices[0].finish_reason for c in streamed if c.choices and c.choices[0].finish_reason] == [
        "tool_calls"
    ]
    answered = client(daemon).chat.completions.create(
        model="m",
        tools=tools,
        messages=[
            *question,
            {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
            {"role": "tool", "tool_call_id": call.id, "content": "5"},
        ],
    )
    assert answered.choices[0].message.content == "2 + 3 = 5."
    assert answered.choices[0].finish_reason == "stop"
