"""``POST /`` with streaming and per-request options, end to end against the real daemon.

The tiny model decodes greedily and never stops on its own (see the ``tiny_model`` fixture), so
every answer is exactly ``max_tokens`` long and the same each time: a streamed answer can be
compared with the non-streamed one piece by piece. (Its answers are gibberish, and for many
prompts only newlines, which the answer trims away: the prompts here are ones that give text.)
"""

from __future__ import annotations

import pytest
from daemon import Daemon, sse_events


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory, tiny_model) -> Daemon:  # noqa: ANN001
    from daemon import base_config

    made = Daemon(tmp_path_factory.mktemp("stream"), base_config(tiny_model, 0, max_tokens=40))
    made.start().wait_serving()
    yield made
    made.kill_all()


def test_streamed_text_equals_the_plain_answer(daemon: Daemon) -> None:
    """Scenario: the same prompt asked plainly and with ``"stream": true``: the stream is
    ``text/event-stream``, one ``{"response": piece}`` event per decoded piece (more than one),
    then ``{"done": true, "usage": {...}}``; the pieces joined are the plain answer."""
    request = {"prompt": "Why?", "system_prompt": "You are a pirate."}
    plain = daemon.post_json(request)
    assert plain.status == 200 and plain.json()["response"]
    status, headers, events = sse_events(daemon, "/", {**request, "stream": True})
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    pieces = [event["response"] for event in events[:-1]]
    assert len(pieces) > 1 and all(pieces)
    assert "".join(pieces) == plain.json()["response"]
    assert events[-1]["done"] is True
    assert events[-1]["usage"]["completion_tokens"] == 40 and events[-1]["usage"]["prompt_tokens"] > 0


def test_errors_before_the_stream_keep_their_status(daemon: Daemon) -> None:
    status, _, events = sse_events(daemon, "/", {"prompt": "x" * 50_000, "stream": True})
    assert status == 400 and "context window" in events[0]["Error"]
    status, _, events = sse_events(daemon, "/", {"prompt": "hi", "stream": "yes"})
    assert status == 400 and "'stream'" in events[0]["Error"]


def test_client_leaving_mid_stream_frees_its_sequence(daemon: Daemon) -> None:
    """Scenario: a stream of 100,000 tokens; the client reads three events and hangs up; the
    worker cancels the generation (logged), and the next request is answered at once."""
    before = daemon.log_text().count("generation cancelled after")
    sse_events(daemon, "/", {"prompt": "A very long story.", "stream": True, "max_tokens": 100_000}, stop_after=3)
    daemon.wait_log("client went away: cancelling", count=1)
    daemon.wait_log("generation cancelled after", count=before + 1)
    assert daemon.ask("Still there?").status == 200


def test_per_request_options_change_the_answer(daemon: Daemon) -> None:
    """``max_tokens``, ``system_prompt``, ``temperature``/``top_p``/``min_p`` each change what
    comes back, and the defaults (the config's) give the plain answer again."""
    base = daemon.ask("Why?").json()["response"]
    assert base

    def answer(**options: object) -> str:
        result = daemon.post_json({"prompt": "Why?", **options})
        assert result.status == 200, result.body
        return result.json()["response"]

    short = answer(max_tokens=5)
    assert short != base and base.startswith(short)
    assert answer(system_prompt="You are a pirate.") != base
    assert answer(temperature=5.0, top_p=0.99, min_p=0.0) != base
    assert answer(temperature=0.0) == base


@pytest.mark.parametrize(
    ("options", "field"),
    [({"temperature": -1}, "temperature"), ({"top_p": 0}, "top_p"), ({"min_p": "a"}, "min_p"),
     ({"max_tokens": 0}, "max_tokens"), ({"system_prompt": ["x"]}, "system_prompt")],
)  # fmt: skip
def test_bad_options_are_400_naming_the_field(daemon: Daemon, options: dict, field: str) -> None:
    result = daemon.post_json({"prompt": "hi", **options})
    assert result.status == 400 and f"'{field}'" in result.json()["Error"]


def test_requests_with_different_settings_share_one_batch(daemon: Daemon) -> None:
    """Greedy and hot requests at once: the greedy answers are still the reference (a sampler
    per sequence in mlx-lm's BatchGenerator), and all are answered."""
    import threading

    reference = daemon.ask("What is the capital of France?").json()["response"]
    assert reference
    results: dict[int, object] = {}

    def run(i: int) -> None:
        options = {"temperature": 4.0} if i % 2 else {}
        results[i] = daemon.post_json({"prompt": "What is the capital of France?", **options})

    threads = [threading.Thread(target=run, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert all(results[i].status == 200 for i in range(6))  # type: ignore[attr-defined]
    assert all(results[i].json()["response"] == reference for i in range(0, 6, 2))  # type: ignore[attr-defined]
