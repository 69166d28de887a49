"""``request_timeout_s`` ends every request, streams included, end to end against the real daemon.

Sanic's own response timeout restarts at every write, so a stream that keeps sending never
ended; the deadline is the daemon's own now. The tiny model never stops on its own (see the
``tiny_model`` fixture): with ``max_tokens`` 100,000 every answer outlasts the 2 s deadline.
"""

from __future__ import annotations

from typing import Callable

import openai
from daemon import Daemon, sse_events

CANCELLED = "generation cancelled after"
PIRATE = {"prompt": "Why?", "system_prompt": "You are a pirate."}  # an answer that starts with text


def test_every_kind_of_request_ends_at_its_deadline(make_daemon: Callable[..., Daemon]) -> None:
    """Scenario (``request_timeout_s`` 2, answers far longer):
    1. a plain ``POST /`` gets 503 ``{"Error"}`` naming ``request_timeout_s``;
    2. a stream on ``POST /`` ends with ``{"Error": ...}`` as its last event (before: it went on
       until the 100,000 tokens were sent);
    3. a stream on ``/v1/chat/completions`` ends with the OpenAI error object, then ``[DONE]``,
       which the official ``openai`` SDK raises as an ``APIError``;
    4. each time the generation is cancelled in the worker (logged), and the daemon then answers
       a short request with 200.
    """
    daemon = make_daemon(max_tokens=100_000, request_timeout_s=2).start().wait_serving()

    plain = daemon.ask("a very long story", timeout=60)
    assert plain.status == 503 and "request_timeout_s" in plain.json()["Error"], plain
    daemon.wait_log(CANCELLED, count=1)

    status, headers, events = sse_events(daemon, "/", {**PIRATE, "stream": True}, timeout=60)
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    assert len(events) > 1 and all("response" in event for event in events[:-1])
    assert "request_timeout_s" in events[-1]["Error"], events[-1]
    daemon.wait_log(CANCELLED, count=2)

    messages = [{"role": "system", "content": PIRATE["system_prompt"]}, {"role": "user", "content": PIRATE["prompt"]}]
    chat = {"messages": messages, "stream": True}
    status, _, events = sse_events(daemon, "/v1/chat/completions", chat, timeout=60)
    assert status == 200 and events[-1] == "[DONE]"
    error = events[-2]["error"]
    assert "request_timeout_s" in error["message"] and error["type"] == "service_unavailable", events[-2]
    daemon.wait_log(CANCELLED, count=3)

    client = openai.OpenAI(base_url=f"http://127.0.0.1:{daemon.port}/v1", api_key="unused", max_retries=0, timeout=60)
    pieces = []
    try:
        for chunk in client.chat.completions.create(model="any", messages=chat["messages"], stream=True):
            pieces.extend(choice.delta.content or "" for choice in chunk.choices)
    except openai.APIError as exc:
        assert "request_timeout_s" in exc.message, exc
    else:
        raise AssertionError("the stream ended without the error")
    assert "".join(pieces)  # it did stream before the deadline
    daemon.wait_log(CANCELLED, count=4)
    assert daemon.log_text().count("longer than request_timeout_s (2 s): its generation is cancelled") == 4

    short = daemon.post_json({"prompt": "hi", "max_tokens": 3}, timeout=60)
    assert short.status == 200 and short.json()["response"] is not None
