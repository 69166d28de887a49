"""The OpenAI protocol end to end: the official ``openai`` package against the real daemon.

Plain chat uses the untrained tiny model (greedy, never stops on its own); tools use the tiny
model trained to call the calc server's tools (``tool_model``), once with the calc server as an
MCP server of the daemon (the tool runs on the server) and once with the same tools sent by the
client instead (the call comes back as ``tool_calls`` and the client answers it).
"""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path
from typing import Any, Iterator

import openai
import pytest

from daemon import Daemon, base_config, serving, sse_events
from mlx_lm.utils import load_tokenizer
from tool_model import (
    BAD_MARKUP, BAD_MARKUP_PROMPT, BLANK_ANSWER, BLANK_PROMPT, INDENTED_ANSWER, INDENTED_PROMPT, MAX_TOOL_ROUNDS,
    SYSTEM_PROMPT, TOOL_TIMEOUT_S, UNKNOWN_TOOL_PROMPT, calc_servers,
)  # fmt: skip

from llm_server.common.servers import parse_servers
from llm_server.common.protocol import prompt_messages
from llm_server.model_worker.chat import ToolCall, assistant_message, render, tool_message
from llm_server.model_worker.mcp_host import MCPHost

KEY = "sk-test-0123456789"


def client(daemon: Daemon, key: str = "unused", retries: int = 0) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://127.0.0.1:{daemon.port}/v1", api_key=key, max_retries=retries)


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Iterator[Daemon]:
    with serving(tmp_path_factory.mktemp("plain"), base_config(tiny_model, 0, max_tokens=30)) as daemon:
        yield daemon


def tool_config(model: Path, servers: dict, **overrides: Any) -> dict:
    return base_config(
        model, 0, servers=servers, system_prompt=SYSTEM_PROMPT, max_tokens=200,
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
    # served_model_name defaults to a local folder's own name, never its path
    assert completion.model == Path(plain.config["model_name"]).name and completion.id.startswith("chatcmpl-")
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
    assert [m.id for m in models.data] == [Path(plain.config["model_name"]).name]
    assert client(plain).models.retrieve(models.data[0].id).id == models.data[0].id
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client(plain).models.retrieve("no-such-model")


@pytest.mark.parametrize(
    ("request_fields", "param"),
    [({"messages": []}, "messages"), ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
     ({"temperature": 3}, "temperature"), ({"n": 2}, "n"), ({"tool_choice": "any"}, "tool_choice"),
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
    # Anything under /v1/ answers in the OpenAI format, a path that is no endpoint included.
    missing = plain.request("GET", "/v1/nothing")
    assert missing.status == 404 and missing.json()["error"]["type"] == "invalid_request_error"
    assert "/v1/nothing" in missing.json()["error"]["message"] and missing.headers["x-request-id"]
    with pytest.raises(openai.NotFoundError):
        client(plain).completions.create(model="m", prompt="hi")  # no /v1/completions
    wrong_method = plain.request("GET", "/v1/chat/completions")
    assert wrong_method.status == 405 and "message" in wrong_method.json()["error"]
    assert wrong_method.headers["x-request-id"]
    not_json = plain.request("POST", "/v1/chat/completions", b"{", {"Content-Type": "application/json"})
    assert not_json.status == 400 and "not valid JSON" in not_json.json()["error"]["message"]
    assert plain.request("GET", "/nothing").json() == {"Error": "Requested URL /nothing not found"}


def test_openapi_document_names_every_route(plain: Daemon) -> None:
    served = plain.request("GET", "/openapi.json").json()
    kept = json.loads((Path(__file__).resolve().parents[1] / "llm_server/http/openapi.json").read_text())
    assert served == kept
    assert set(served["paths"]) == {"/", "/v1/chat/completions", "/v1/models", "/v1/models/{model}", "/openapi.json",
                                    "/v1/messages", "/v1/messages/count_tokens", "/v1/responses"}  # fmt: skip


def test_bearer_key(make_daemon: Any, tiny_model: Path) -> None:
    """With ``api_key`` set (from the environment, like any secret), ``/`` and ``/v1/*`` need
    the key: a wrong or missing one is 401 in each endpoint's format; the key is never logged."""
    daemon = make_daemon(
        base_config(tiny_model, 0, api_key="${LLM_KEY}", served_model_name="local-model"),
        env={"LLM_KEY": KEY},
    ).start().wait_serving()
    with pytest.raises(openai.AuthenticationError):
        client(daemon, "wrong").models.list()
    assert [m.id for m in client(daemon, KEY).models.list().data] == ["local-model"]
    assert client(daemon, KEY).chat.completions.create(model="m", messages=WHY, max_tokens=3).model == "local-model"
    missing = daemon.ask("hi")
    assert missing.status == 401 and "API key" in missing.json()["Error"] and missing.headers["x-request-id"]
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
       answers with the sum;
    3. "What is 2 times 3?": the model calls ``multiply``, offered by nobody: it comes back too."""
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
    # 3. a tool the client did not send either: the call is the client's to see, not answered here
    unknown = client(daemon).chat.completions.create(
        model="m", messages=[{"role": "user", "content": UNKNOWN_TOOL_PROMPT}], tools=tools
    )
    assert unknown.choices[0].finish_reason == "tool_calls"
    assert [c.function.name for c in unknown.choices[0].message.tool_calls] == ["multiply"]


def test_usage_counts_every_round(calc_daemon: Daemon, tool_model: Path) -> None:
    """Scenario: a request that runs one server-side tool round (``add``), then answers:
    1. its usage's prompt_tokens is the sum of both rounds' prompts, counted here by rendering
       them with the model's tokenizer (the tool's result read from the log);
    2. cached_tokens never exceeds prompt_tokens, total is prompt + completion;
    3. ``POST /`` with the same question streams the same usage."""
    completion = client(calc_daemon).chat.completions.create(
        model="m", messages=[{"role": "user", "content": "What is 2 + 3?"}]
    )
    assert completion.choices[0].message.content == "2 + 3 = 5."
    usage = completion.usage
    request_id = completion.id.removeprefix("chatcmpl-")
    calc_daemon.response_line(request_id)
    result = re.search(rf"{request_id} tool call add result: (.*)", calc_daemon.log_text()).group(1)
    tokenizer, tools = load_tokenizer(tool_model), calc_tool_specs()
    first = prompt_messages(SYSTEM_PROMPT, "What is 2 + 3?")
    call = ToolCall("add", {"a": 2, "b": 3})
    second = [*first, assistant_message("", [call]), tool_message(call, result)]
    expected = len(render(tokenizer, first, tools)) + len(render(tokenizer, second, tools))
    assert usage.prompt_tokens == expected
    assert usage.prompt_tokens_details.cached_tokens <= usage.prompt_tokens
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    status, _, events = sse_events(calc_daemon, "/", {"prompt": "What is 2 + 3?", "stream": True})
    assert status == 200 and events[-1]["done"] and events[-1]["usage"]["prompt_tokens"] == expected
    streamed = events[-1]["usage"]
    assert streamed["prompt_tokens_details"]["cached_tokens"] <= streamed["prompt_tokens"]
    assert streamed["total_tokens"] == streamed["prompt_tokens"] + streamed["completion_tokens"]


def test_a_tool_nobody_offers_goes_to_the_client(calc_daemon: Daemon) -> None:
    """The model calls ``multiply``, which neither the MCP server nor the client offers: on
    ``/v1`` the call comes back as a ``tool_calls`` turn (logged), not answered by the daemon;
    ``POST /`` has no such turn, so there the model is told the tool is unknown and answers."""
    question = [{"role": "user", "content": UNKNOWN_TOOL_PROMPT}]
    completion = client(calc_daemon).chat.completions.create(model="m", messages=question)
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls
    assert call.function.name == "multiply" and json.loads(call.function.arguments) == {"a": 2, "b": 3}
    request_id = completion.id.removeprefix("chatcmpl-")
    calc_daemon.wait_log(f"{request_id} the model called 'multiply', offered by no MCP server nor the client")
    assert f"{request_id} tool call multiply" not in calc_daemon.log_text()
    assert calc_daemon.ask(UNKNOWN_TOOL_PROMPT).json() == {"response": "2 times 3 is 6."}
    calc_daemon.wait_log("tool call multiply server=- ")


def test_markup_that_does_not_parse_is_the_answer(calc_daemon: Daemon) -> None:
    """A tool call the parser rejects is returned as the assistant's text (logged), streamed or
    not; ``POST /`` keeps its promise of no markup."""
    question = [{"role": "user", "content": BAD_MARKUP_PROMPT}]
    completion = client(calc_daemon).chat.completions.create(model="m", messages=question)
    assert completion.choices[0].message.content == BAD_MARKUP
    assert completion.choices[0].finish_reason == "stop" and completion.choices[0].message.tool_calls is None
    request_id = completion.id.removeprefix("chatcmpl-")
    calc_daemon.wait_log(f"{request_id} model emitted a tool call that does not parse (returned as text)")
    stream = client(calc_daemon).chat.completions.create(model="m", messages=question, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == BAD_MARKUP
    assert calc_daemon.ask(BAD_MARKUP_PROMPT).json() == {"response": ""}


@pytest.mark.parametrize(("prompt", "answer"), [(BLANK_PROMPT, BLANK_ANSWER), (INDENTED_PROMPT, INDENTED_ANSWER)])
def test_answer_text_is_verbatim(calc_daemon: Daemon, prompt: str, answer: str) -> None:
    """Whitespace the model writes is the client's: kept on ``/v1``, streamed or not (``POST /``
    trims it, as documented)."""
    question = [{"role": "user", "content": prompt}]
    completion = client(calc_daemon).chat.completions.create(model="m", messages=question)
    assert completion.choices[0].message.content == answer
    stream = client(calc_daemon).chat.completions.create(model="m", messages=question, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == answer
    assert calc_daemon.ask(prompt).json() == {"response": answer.strip()}
