"""Structured output end to end: the official ``openai`` package and ``POST /`` against the real daemon.

The model is the untrained tiny one: its free text is gibberish and it never stops on its own,
so an answer that parses, validates against the schema and ends with finish reason "stop" can
only come from the grammar constraining every token (and allowing only the end once the value
is complete). Sampling at temperature 1 makes each answer a different walk through the grammar.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Annotated, Any, Iterator, Literal

import httpx2
import jsonschema
import openai
import pydantic
import pytest

from daemon import Daemon, HttpResult, base_config, serving, sse_events

SCHEMA = {
    "type": "object",
    "properties": {
        "color": {"enum": ["red", "green", "blue"]},
        "ok": {"type": "boolean"},
        "n": {"type": "integer", "minimum": 1, "maximum": 9},
        "xs": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 99}, "maxItems": 3},
    },
    "required": ["color", "ok", "n", "xs"],
    "additionalProperties": False,
}
ASK = [{"role": "user", "content": "Describe a thing."}]
AS_SCHEMA = {"type": "json_schema", "json_schema": {"name": "thing", "schema": SCHEMA, "strict": True}}
ADD = {
    "type": "function",
    "function": {
        "name": "add",
        "description": "Add two integers.",
        "parameters": {
            "type": "object",
            "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 9}, "b": {"type": "integer"}},
            "required": ["a", "b"],
            "additionalProperties": False,
        },
    },
}
ECHO = {
    "type": "function",
    "function": {
        "name": "echo",
        "parameters": {"type": "object", "properties": {"x": {"type": "boolean"}}, "required": ["x"],
                       "additionalProperties": False},
    },
}  # fmt: skip
CALLS_ROOM = 400  # the grammar allows several calls in a row: room for a few


class Thing(pydantic.BaseModel):
    color: Literal["red", "green", "blue"]
    ok: bool
    n: int = pydantic.Field(ge=1, le=9)
    xs: list[Annotated[int, pydantic.Field(ge=0, le=99)]] = pydantic.Field(max_length=3)


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Iterator[Daemon]:
    config = base_config(tiny_model, 0, max_tokens=120, max_batch_size=8)
    with serving(tmp_path_factory.mktemp("structured"), config) as running:
        yield running


def client(daemon: Daemon) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://127.0.0.1:{daemon.port}/v1", api_key="unused", max_retries=0)


def test_json_schema_answer_validates(daemon: Daemon) -> None:
    completion = client(daemon).chat.completions.create(model="m", messages=ASK, response_format=AS_SCHEMA)
    choice = completion.choices[0]
    assert choice.finish_reason == "stop"
    jsonschema.validate(json.loads(choice.message.content), SCHEMA)


def test_parse_with_a_pydantic_model(daemon: Daemon) -> None:
    completion = client(daemon).chat.completions.parse(model="m", messages=ASK, response_format=Thing, temperature=1.0)
    assert isinstance(completion.choices[0].message.parsed, Thing)


def test_eight_at_once_sampled_all_validate(daemon: Daemon) -> None:
    def one(_: int) -> openai.types.chat.ChatCompletion:
        return client(daemon).chat.completions.create(
            model="m", messages=ASK, response_format=AS_SCHEMA, temperature=1.0
        )

    with ThreadPoolExecutor(8) as pool:
        completions = list(pool.map(one, range(8)))
    for completion in completions:
        assert completion.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(completion.choices[0].message.content), SCHEMA)


def test_streamed_answer_validates(daemon: Daemon) -> None:
    stream = client(daemon).chat.completions.create(
        model="m", messages=ASK, response_format=AS_SCHEMA, temperature=1.0, stream=True
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[-1].choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(text), SCHEMA)


def test_json_object_gives_an_object(daemon: Daemon) -> None:
    completion = client(daemon).chat.completions.create(
        model="m", messages=ASK, response_format={"type": "json_object"}, temperature=1.0, max_tokens=400
    )
    if completion.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(completion.choices[0].message.content), dict)
    else:  # any object may be long: cut by max_tokens, it is still an object's beginning
        assert completion.choices[0].message.content.startswith("{")


def test_without_a_constraint_the_model_rambles(daemon: Daemon) -> None:
    """The control: the same request unconstrained runs to max_tokens, so the tests above pass
    because of the grammar."""
    completion = client(daemon).chat.completions.create(model="m", messages=ASK, max_tokens=40)
    assert completion.choices[0].finish_reason == "length"


@pytest.mark.parametrize(
    ("fields", "param"),
    [({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"not": {}}}}},
      "response_format"),
     ({"response_format": {"type": "xml"}}, "response_format"),
     ({"tools": [{"type": "function", "function": {**ADD["function"], "strict": True,
                                                   "parameters": {"type": "object", "not": {}}}}]},
      "tools[0].function.parameters"),
     ({"tools": [ADD], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice")],
)  # fmt: skip
def test_what_cannot_be_enforced_is_a_400(daemon: Daemon, fields: dict, param: str) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client(daemon).chat.completions.create(model="m", messages=ASK, **fields)
    assert caught.value.body["param"] == param and caught.value.body["message"]


@pytest.mark.parametrize("stream", [False, True])
def test_named_tool_choice_calls_that_tool(daemon: Daemon, stream: bool) -> None:
    fields = dict(model="m", messages=ASK, tools=[ADD, ECHO], temperature=1.0, max_tokens=CALLS_ROOM,
                  tool_choice={"type": "function", "function": {"name": "add"}})  # fmt: skip
    if stream:
        chunks = list(client(daemon).chat.completions.create(**fields, stream=True))
        calls = [call for c in chunks if c.choices for call in c.choices[0].delta.tool_calls or ()]
        finish = chunks[-1].choices[0].finish_reason
        first = [c for c in calls if c.index == calls[0].index]  # the first call's pieces
        name, arguments = first[0].function.name, "".join(c.function.arguments or "" for c in first)
    else:
        choice = client(daemon).chat.completions.create(**fields).choices[0]
        finish, name, arguments = choice.finish_reason, choice.message.tool_calls[0].function.name, \
            choice.message.tool_calls[0].function.arguments  # fmt: skip
    assert finish == "tool_calls" and name == "add"
    jsonschema.validate(json.loads(arguments), ADD["function"]["parameters"])


def test_required_tool_choice_calls_an_offered_tool(daemon: Daemon) -> None:
    choice = client(daemon).chat.completions.create(
        model="m", messages=ASK, tools=[ADD, ECHO], tool_choice="required", temperature=1.0, max_tokens=CALLS_ROOM
    ).choices[0]
    assert choice.finish_reason == "tool_calls"
    schemas = {tool["function"]["name"]: tool["function"]["parameters"] for tool in (ADD, ECHO)}
    for call in choice.message.tool_calls:
        jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])


def test_plain_endpoint_format_schema_and_json(daemon: Daemon) -> None:
    answer = daemon.post_json({"prompt": "Describe a thing.", "format": SCHEMA, "temperature": 1.0})
    assert answer.status == 200
    jsonschema.validate(json.loads(answer.json()["response"]), SCHEMA)
    status, _, events = sse_events(daemon, "/", {"prompt": "Describe a thing.", "format": SCHEMA, "stream": True})
    assert status == 200 and events[-1]["done"] is True
    jsonschema.validate(json.loads("".join(e.get("response", "") for e in events[:-1])), SCHEMA)
    answer = daemon.post_json({"prompt": "Anything.", "format": "json", "max_tokens": 400})
    assert answer.status == 200 and answer.json()["response"].startswith("{")


def test_plain_endpoint_eight_at_once_sampled_all_validate(daemon: Daemon) -> None:
    def one(i: int) -> HttpResult:
        return daemon.post_json({"prompt": f"Thing {i}.", "format": SCHEMA, "temperature": 1.0})

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(one, range(8)))
    texts = [a.json()["response"] for a in answers if a.status == 200]
    assert len(texts) == 8
    for text in texts:
        jsonschema.validate(json.loads(text), SCHEMA)
    assert len(set(texts)) > 1  # sampled: different walks through the grammar


@pytest.mark.parametrize(("value", "fragment"), [({"not": {}}, "not"), (7, "format")])
def test_plain_endpoint_bad_format_is_a_400(daemon: Daemon, value: object, fragment: str) -> None:
    answer = daemon.post_json({"prompt": "x", "format": value})
    assert answer.status == 400 and fragment in answer.json()["Error"]


@pytest.mark.parametrize("mode", ["tool", "native"])
def test_pydantic_ai_agent_gets_its_model(daemon: Daemon, mode: str) -> None:
    """An agent framework's own structured-output call: pydantic-ai's ``Agent(output_type=...)``.

    Its default ("tool") forces a call to its ``final_result`` tool with ``tool_choice:
    "required"``; ``NativeOutput`` sends ``response_format`` ``json_schema``. Either way the
    framework validates the reply into the pydantic model itself and would retry, then raise, on
    an invalid one: ``retries=0`` makes the first answer the one that must validate.
    """
    from pydantic_ai import Agent, NativeOutput
    from pydantic_ai.models.openai import OpenAIChatModel
    from pydantic_ai.providers.openai import OpenAIProvider

    sent: list[dict] = []
    seen = httpx2.AsyncClient(event_hooks={"request": [lambda request: _record(request, sent)]})
    provider = OpenAIProvider(base_url=f"http://127.0.0.1:{daemon.port}/v1", api_key="unused", http_client=seen)
    output = Thing if mode == "tool" else NativeOutput(Thing)
    agent = Agent(OpenAIChatModel("m", provider=provider), output_type=output, retries=0)
    result = agent.run_sync("Describe a thing.")
    assert isinstance(result.output, Thing)
    assert len(sent) == 1  # answered by the first reply: no retry
    if mode == "tool":
        assert sent[0]["tool_choice"] == "required"
    else:
        assert sent[0]["response_format"]["type"] == "json_schema"


async def _record(request: httpx2.Request, sent: list[dict]) -> None:
    sent.append(json.loads(request.content))


# --- the coding agents' dialects: Anthropic Messages and OpenAI Responses ----------------------


class Pick(pydantic.BaseModel):
    """For the anthropic SDK's ``parse``: it moves numeric and length bounds out of the schema it
    sends (into descriptions, as Anthropic's API wants), so a model with bounds would be checked
    by the SDK against bounds the grammar was never given."""

    color: Literal["red", "green", "blue"]
    ok: bool


def anthropic_client(daemon: Daemon) -> Any:
    import anthropic

    return anthropic.Anthropic(base_url=f"http://127.0.0.1:{daemon.port}", api_key="unused", max_retries=0)


def as_anthropic(tool: dict) -> dict:
    function = tool["function"]
    return {"name": function["name"], "description": function.get("description", ""),
            "input_schema": function["parameters"]}  # fmt: skip


def as_responses(tool: dict) -> dict:
    return {"type": "function", **tool["function"]}


SCHEMAS = {tool["function"]["name"]: tool["function"]["parameters"] for tool in (ADD, ECHO)}
MESSAGES_SCHEMA = {"format": {"type": "json_schema", "schema": SCHEMA}}
HOT = {"temperature": 1.0}  # the anthropic SDK has no sampling arguments of its own any more: sent as the API takes them
RESPONSES_SCHEMA = {"format": {"type": "json_schema", "name": "thing", "schema": SCHEMA, "strict": True}}


@pytest.mark.parametrize("stream", [False, True])
def test_messages_output_format_validates(daemon: Daemon, stream: bool) -> None:
    fields = dict(model="m", max_tokens=120, messages=ASK, extra_body=HOT, output_config=MESSAGES_SCHEMA)
    if stream:
        with anthropic_client(daemon).messages.stream(**fields) as events:
            message = events.get_final_message()
    else:
        message = anthropic_client(daemon).messages.create(**fields)
    assert message.stop_reason == "end_turn"
    jsonschema.validate(json.loads(message.content[0].text), SCHEMA)


def test_messages_parse_with_a_pydantic_model(daemon: Daemon) -> None:
    message = anthropic_client(daemon).messages.parse(model="m", max_tokens=120, messages=ASK, output_format=Pick,
                                                      extra_body=HOT)  # fmt: skip
    assert isinstance(message.parsed_output, Pick)


@pytest.mark.parametrize("choice", [{"type": "any"}, {"type": "tool", "name": "add"}], ids=["any", "named"])
def test_messages_forced_tool_choice_calls_with_valid_input(daemon: Daemon, choice: dict) -> None:
    message = anthropic_client(daemon).messages.create(
        model="m", max_tokens=CALLS_ROOM, messages=ASK, extra_body=HOT, tool_choice=choice,
        tools=[as_anthropic(ADD), as_anthropic(ECHO)],
    )  # fmt: skip
    calls = [block for block in message.content if block.type == "tool_use"]
    assert message.stop_reason == "tool_use" and calls
    for call in calls:
        assert call.name == choice.get("name", call.name)
        jsonschema.validate(call.input, SCHEMAS[call.name])


@pytest.mark.parametrize("stream", [False, True])
def test_responses_text_format_validates(daemon: Daemon, stream: bool) -> None:
    fields = dict(model="m", input="Describe a thing.", temperature=1.0, text=RESPONSES_SCHEMA)
    if stream:
        with client(daemon).responses.stream(**fields) as events:
            response = events.get_final_response()
    else:
        response = client(daemon).responses.create(**fields)
    assert response.status == "completed"
    jsonschema.validate(json.loads(response.output_text), SCHEMA)


def test_responses_parse_with_a_pydantic_model(daemon: Daemon) -> None:
    response = client(daemon).responses.parse(model="m", input="Describe a thing.", text_format=Thing, temperature=1.0)
    assert isinstance(response.output_parsed, Thing)


@pytest.mark.parametrize("choice", ["required", {"type": "function", "name": "add"}], ids=["required", "named"])
def test_responses_forced_tool_choice_calls_with_valid_arguments(daemon: Daemon, choice: Any) -> None:
    response = client(daemon).responses.create(
        model="m", input="Describe a thing.", temperature=1.0, tool_choice=choice, max_output_tokens=CALLS_ROOM,
        tools=[as_responses(ADD), as_responses(ECHO)],
    )  # fmt: skip
    calls = [item for item in response.output if item.type == "function_call"]
    assert response.status == "completed" and calls
    for call in calls:
        assert call.name == (choice["name"] if isinstance(choice, dict) else call.name)
        jsonschema.validate(json.loads(call.arguments), SCHEMAS[call.name])


def test_both_dialects_eight_at_once_sampled_all_validate(daemon: Daemon) -> None:
    """Four Messages and four Responses requests at once, in one batch: every answer validates."""

    def one(i: int) -> str:
        if i % 2:
            return client(daemon).responses.create(model="m", input=f"Thing {i}.", temperature=1.0,
                                                   text=RESPONSES_SCHEMA).output_text  # fmt: skip
        return anthropic_client(daemon).messages.create(
            model="m", max_tokens=120, messages=[{"role": "user", "content": f"Thing {i}."}], extra_body=HOT,
            output_config=MESSAGES_SCHEMA,
        ).content[0].text  # fmt: skip

    with ThreadPoolExecutor(8) as pool:
        texts = list(pool.map(one, range(8)))
    for text in texts:
        jsonschema.validate(json.loads(text), SCHEMA)
