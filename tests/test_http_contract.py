"""The HTTP contract, end to end: a real daemon, a real tiny MLX model, real sockets.

One daemon serves the whole module (start-up costs seconds); each test sends its own requests.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Iterator

import pytest
from daemon import Daemon, base_config, raw_exchange, serving

MB = 1_000_000


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Iterator[Daemon]:
    with serving(tmp_path_factory.mktemp("contract"), base_config(tiny_model, 0)) as d:
        yield d


def assert_json_error(result, status: int) -> str:
    """A JSON ``{"Error"}`` with ``status``, and an ``X-Request-Id`` like every answer."""
    assert result.status == status, (result.status, result.body)
    assert result.headers["content-type"].startswith("application/json")
    assert len(result.headers.get("x-request-id", "")) == 16, result.headers
    document = result.json()
    assert set(document) == {"Error"} and isinstance(document["Error"], str) and document["Error"]
    return document["Error"]


def test_prompt_gets_a_response(daemon: Daemon) -> None:
    result = daemon.ask("Hello, who are you?")
    assert result.status == 200
    assert result.headers["content-type"].startswith("application/json")
    document = result.json()
    assert list(document) == ["response"] and isinstance(document["response"], str)
    assert document["response"]
    assert result.headers.get("x-request-id")
    request_id = result.headers["x-request-id"]
    daemon.response_line(request_id)  # records reach the file a moment after the answer
    log = daemon.log_text()
    assert f"{request_id} request from 127.0.0.1" in log
    assert f"{request_id} prompt: Hello, who are you?" in log  # trace level logs bodies
    assert f"{request_id} response 200 in" in log


def test_unicode_prompt_and_extra_fields(daemon: Daemon) -> None:
    result = daemon.post_json({"prompt": "Grüße 👋 日本語 — ok?", "stream": False, "extra": [1, 2]})
    assert result.status == 200
    assert isinstance(result.json()["response"], str)


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        (b"", "empty"),
        (b"not json", "not valid JSON"),
        (b'{"prompt": "unterminated', "not valid JSON"),
        (b"\xff\xfe{\x00}\x00", "not UTF-8"),
        ('{"prompt": "caf\xe9"}'.encode("latin-1"), "not UTF-8"),
        (b'["prompt"]', "JSON object"),
        (b'"just a string"', "JSON object"),
        (b"null", "JSON object"),
        (b'{"text": "hi"}', "no 'prompt'"),
        (b'{"prompt": 42}', "must be a string"),
        (b'{"prompt": null}', "must be a string"),
        (b'{"prompt": ["a"]}', "must be a string"),
        (b'{"prompt": ""}', "empty"),
        (b'{"prompt": "   \\n\\t "}', "empty"),
        (b'{"prompt": NaN}', "NaN"),
        (b'{"prompt": "x", "n": Infinity}', "Infinity"),
        (b'{"prompt": "\\ud800"}', "surrogate"),
        (b"[" * 100_000 + b"]" * 100_000, "JSON"),
    ],
)
def test_bad_requests_get_400(daemon: Daemon, body: bytes, fragment: str) -> None:
    result = daemon.request("POST", "/", body, {"Content-Type": "application/json"})
    assert fragment in assert_json_error(result, 400)


def test_prompt_longer_than_context_window_gets_400(daemon: Daemon) -> None:
    # The tiny model's context window is 16,384 tokens; this is far longer once tokenized.
    prompt = " ".join(f"word{i}" for i in range(40_000))
    message = assert_json_error(daemon.ask(prompt), 400)
    assert "context window" in message
    # ...and the daemon still serves afterwards.
    assert daemon.ask("still there?").status == 200


def test_body_over_10_mb_with_content_length_gets_413(daemon: Daemon) -> None:
    body = json.dumps({"prompt": "a" * (10 * MB)}).encode()
    head = (
        f"POST / HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    result = raw_exchange(daemon.port, head, [body[i:i + 65536] for i in range(0, len(body), 65536)])
    assert_json_error(result, 413)


def test_chunked_body_over_10_mb_gets_413(daemon: Daemon) -> None:
    head = b"POST / HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    piece = b"a" * 65536
    chunks = [b'{"prompt": "'] + [piece] * (11 * MB // len(piece))
    framed = [f"{len(c):x}\r\n".encode() + c + b"\r\n" for c in chunks] + [b"0\r\n\r\n"]
    assert_json_error(raw_exchange(daemon.port, head, framed), 413)


def test_body_just_under_the_limit_is_read(daemon: Daemon) -> None:
    # 9.9 MB of JSON that is valid but has no prompt: read whole, then rejected as 400, not 413.
    body = json.dumps({"padding": "a" * (9_900_000)}).encode()
    assert "no 'prompt'" in assert_json_error(daemon.request("POST", "/", body), 400)


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE", "PATCH"])
def test_other_methods_get_405_with_allow(daemon: Daemon, method: str) -> None:
    result = daemon.request(method, "/")
    assert_json_error(result, 405)
    assert result.headers.get("allow") == "POST"


@pytest.mark.parametrize("method", ["GET", "POST"])
def test_other_paths_get_404(daemon: Daemon, method: str) -> None:
    assert_json_error(daemon.request(method, "/api/chat", b'{"prompt": "x"}' if method == "POST" else None), 404)


def test_rejections_carry_the_request_id_of_their_log_line(daemon: Daemon) -> None:
    """404, 405 and 413 (refused before any route runs) name the request like every answer: the
    ``X-Request-Id`` is the id on the request's "rejected" line in the log."""
    big = f"POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {11 * MB}\r\n\r\n".encode()
    chunked = b"POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n"
    piece = b"%x\r\n%s\r\n" % (65536, b"a" * 65536)
    answers = [
        (404, daemon.request("GET", "/nothing")),
        (405, daemon.request("GET", "/")),
        (413, raw_exchange(daemon.port, big, [b"a" * 65536])),
        (413, raw_exchange(daemon.port, chunked, [piece] * (11 * MB // 65536))),
    ]
    for status, result in answers:
        assert result.status == status
        request_id = result.headers["x-request-id"]
        daemon.wait_log(f"{request_id} rejected ")
        (line,) = [line for line in daemon.log_text().splitlines() if f"{request_id} rejected " in line]
        assert f": {status} " in line


@pytest.mark.parametrize("path", ["//", "///"])
def test_doubled_slashes_are_another_path(daemon: Daemon, path: str) -> None:
    """Found by the hostile-input campaign: Sanic's router matched "//" to "/"."""
    assert_json_error(daemon.request("POST", path, b'{"prompt": "x"}'), 404)


def test_thirty_concurrent_clients_are_all_answered(daemon: Daemon) -> None:
    results: dict[int, object] = {}

    def client(i: int) -> None:
        try:
            results[i] = daemon.ask(f"client {i} says hello", timeout=180)
        except Exception as exc:  # recorded, then asserted below
            results[i] = exc

    threads = [threading.Thread(target=client, args=(i,)) for i in range(30)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(200)
    assert len(results) == 30
    for i, result in results.items():
        assert not isinstance(result, Exception), (i, result)
        assert result.status == 200, (i, result.body)
        assert isinstance(result.json()["response"], str)
    ids = {r.headers["x-request-id"] for r in results.values()}
    assert len(ids) == 30


def test_same_prompt_is_stateless(daemon: Daemon) -> None:
    # Greedy decoding and no history: the same prompt gives the same answer twice.
    first = daemon.ask("Repeat after me: stateless").json()["response"]
    daemon.ask("Something else in between")
    assert daemon.ask("Repeat after me: stateless").json()["response"] == first
