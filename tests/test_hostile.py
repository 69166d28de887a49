"""A hostile-input campaign against the real daemon: generated requests over raw sockets.

Hypothesis builds the requests: random bytes, invalid UTF-8, JSON of every shape and wrong type,
deep and huge JSON, duplicate keys, odd methods, paths and headers, bodies just under and over
10 MB, chunked bodies that overflow midway, truncated bodies, slow senders and clients that vanish
mid-request; and malformed heads as raw-HTTP fuzzers send them: methods that are no token
(non-ASCII bytes included), bare LF line ends in the request line and headers, binary request
lines, broken header lines. Every answer must be JSON: 4xx ``{"Error"}`` (200 ``{"response"}``
only where the generated body happens to be a valid request; a malformed head gets 400), never
5xx, never HTML, and every complete request gets one (only a client that vanishes or stops
sending early may see none); the daemon stays up and a valid request afterwards succeeds.

CI runs ``LLM_SERVER_CAMPAIGN`` requests (default 400); the full campaign is
``LLM_SERVER_CAMPAIGN=10000 bash tests/run.sh tests/test_hostile.py``.
"""

from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest
from daemon import Daemon, HttpResult, base_config, parse_response, read_answer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

CAMPAIGN = int(os.environ.get("LLM_SERVER_CAMPAIGN", "400"))
LIMIT = 10_000_000


@dataclass(frozen=True)
class Attack:
    """One request as bytes on the wire, and how to send it."""

    data: bytes
    how: str = "whole"  # whole | slow | vanish | half-close
    may_succeed: bool = False  # the body is a valid request: 200 is a correct answer
    method: str = "POST"
    status: int | None = None  # the one right answer: 400 ``{"Error"}`` for a malformed head (no endpoint read)

    @property
    def path(self) -> bytes:
        """The request line's target."""
        parts = self.data.split(b"\n", 1)[0].rstrip(b"\r").split(b" ")
        return parts[1] if len(parts) > 2 else b""

    def __repr__(self) -> str:  # keep hypothesis' failure reports readable
        return f"Attack({self.data[:300]!r}{'...' if len(self.data) > 300 else ''}, {self.how}, {self.method})"


def request(body: bytes, *, method: str = "POST", path: str = "/", headers: dict[str, str] | None = None,
            length: int | None = None) -> bytes:  # fmt: skip
    lines = [f"{method} {path} HTTP/1.1", "Host: localhost"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    if length is not None:
        lines.append(f"Content-Length: {length}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def valid_prompt(value: object) -> bool:
    if not isinstance(value, str) or not value.strip():
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


@st.composite
def json_bodies(draw: st.DrawFn) -> Attack:
    """JSON documents: arbitrary, or objects whose ``prompt`` has an arbitrary value."""
    if draw(st.booleans()):
        document = draw(json_values)
    else:
        document = {
            "prompt": draw(json_values | st.text(max_size=60)),
            **draw(st.dictionaries(st.text(max_size=6), json_values, max_size=3)),
        }
    body = json.dumps(document).encode()
    ok = isinstance(document, dict) and valid_prompt(document.get("prompt"))
    return Attack(request(body, length=len(body)), may_succeed=ok)


@st.composite
def byte_bodies(draw: st.DrawFn) -> Attack:
    """Random bytes, invalid UTF-8 inside a JSON string, NaN and friends, duplicate keys."""
    kind = draw(st.sampled_from(["random", "utf8", "constant", "duplicate"]))
    if kind == "random":
        body = draw(st.binary(max_size=400))
    elif kind == "utf8":
        body = b'{"prompt": "' + draw(st.binary(min_size=1, max_size=40)) + b'\xff\xfe"}'
    elif kind == "constant":
        body = b'{"prompt": ' + draw(st.sampled_from([b"NaN", b"Infinity", b"-Infinity", b"nan"])) + b"}"
    else:
        first, second = draw(json_values | st.text(max_size=10)), draw(json_values | st.text(max_size=10))
        body = b'{"prompt": ' + json.dumps(first).encode() + b', "prompt": ' + json.dumps(second).encode() + b"}"
        return Attack(request(body, length=len(body)), may_succeed=valid_prompt(second))
    return Attack(request(body, length=len(body)))


@st.composite
def shaped_bodies(draw: st.DrawFn) -> Attack:
    """Deep nesting, and bodies around the 10 MB limit (with a length or chunked)."""
    kind = draw(st.sampled_from(["deep", "size", "chunked"]))
    if kind == "deep":
        depth = draw(st.integers(100, 200_000))
        body = b'{"prompt": ' + b"[" * depth + b"]" * depth + b"}"
        return Attack(request(body, length=len(body)))
    if kind == "size":
        size = draw(st.sampled_from([LIMIT - 1000, LIMIT, LIMIT + 1, 12_000_000]))
        return Attack(request(b"x" * size, length=size))
    chunk = draw(st.sampled_from([65_536, 1_000_000]))
    count = draw(st.integers(1, 12_000_000 // chunk + 1))
    pieces = b"".join(b"%x\r\n" % chunk + b"y" * chunk + b"\r\n" for _ in range(count)) + b"0\r\n\r\n"
    return Attack(request(pieces, headers={"Transfer-Encoding": "chunked"}))


token = st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126, exclude_characters=':()<>@,;\\"/[]?={}'),
                min_size=1, max_size=12)  # fmt: skip
header_value = st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=30)


@st.composite
def odd_requests(draw: st.DrawFn) -> Attack:
    """Other methods and paths, odd headers, bad Content-Length, broken chunking, bad request lines."""
    kind = draw(st.sampled_from(["method", "headers", "length", "chunks", "garbage"]))
    if kind == "method":
        method = draw(st.sampled_from(["GET", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD", "POST", "TRACE"]))
        path = draw(st.sampled_from(["/", "/x", "//", "/v1/chat/completions", "/?a=b", "/%00", "/a/../"]))
        body = b'{"prompt": "hi"}'
        ok = method == "POST" and path in ("/", "/?a=b")
        return Attack(request(body, method=method, path=path, length=len(body)), may_succeed=ok, method=method)
    if kind == "headers":
        headers = draw(st.dictionaries(token, header_value, max_size=6))
        headers = {
            k: v
            for k, v in headers.items()
            if k.lower() not in ("content-length", "transfer-encoding", "host", "expect", "connection", "upgrade")
        }
        body = b'{"prompt": "hello"}'
        return Attack(request(body, headers=headers, length=len(body)), may_succeed=True)
    if kind == "length":
        value = draw(st.sampled_from(["-1", "abc", "1e3", " 5", "99999999999999999999", "5, 5"]))
        body = b'{"prompt": "hi"}'
        return Attack(request(body, headers={"Content-Length": value}))
    if kind == "chunks":
        size = draw(st.sampled_from([b"zz", b"-5", b"ffffffffffffffffff", b"5;x=y"]))
        return Attack(request(size + b"\r\nhello\r\n0\r\n\r\n", headers={"Transfer-Encoding": "chunked"}))
    line = draw(st.binary(min_size=1, max_size=60).filter(lambda b: b"\r\n" not in b))
    return Attack(line + b"\r\nHost: localhost\r\n\r\n")


TCHAR = frozenset(b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")
NOT_TCHAR = sorted(set(range(256)) - TCHAR - set(b" \r\n"))  # bytes no method may hold


@st.composite
def bare_lf(draw: st.DrawFn) -> Attack:
    """A request of the other generators with some of its head's CRLFs (at least one) sent as bare
    LF: a line end all the same (RFC 9112 §2.2), so it gets the answer the CRLF request gets."""
    attack = draw(st.one_of(json_bodies(), odd_requests()))
    head, _, body = attack.data.partition(b"\r\n\r\n")
    ends = head.count(b"\r\n") + 2
    bare = draw(st.lists(st.booleans(), min_size=ends, max_size=ends).filter(any))
    lines = (head + b"\r\n").split(b"\r\n")
    head = b"".join(line + (b"\n" if lf else b"\r\n") for line, lf in zip(lines, bare))
    return Attack(head + body, may_succeed=attack.may_succeed, method=attack.method, status=attack.status)


@st.composite
def malformed_heads(draw: st.DrawFn) -> Attack:
    """Heads no HTTP/1.1 parser may accept: a method that is no token (non-ASCII included), a
    binary request line, broken header lines; with CRLF or bare LF line ends. Each gets 400."""
    kind = draw(st.sampled_from(["method", "binary", "tls", "field"]))
    eol = draw(st.sampled_from([b"\r\n", b"\n"]))
    body = b'{"prompt": "hi"}'
    fields = [b"Host: localhost", b"Content-Length: %d" % len(body)]
    if kind == "method":  # a token with a byte outside tchar somewhere in it
        before, after = draw(st.binary(max_size=6)), draw(st.binary(max_size=6))
        bad = bytes(draw(st.lists(st.sampled_from(NOT_TCHAR), min_size=1, max_size=3)))
        method = (before + bad + after).replace(b"\r", b"").replace(b"\n", b"")
        line = method + b" " + draw(st.sampled_from([b"/", b"/v1/chat/completions", b"/x"])) + b" HTTP/1.1"
    elif kind == "binary":  # garbage, then a line end and headers
        line = bytes([draw(st.sampled_from(NOT_TCHAR))]) + draw(st.binary(max_size=60))
        line = line.replace(b"\r", b"").replace(b"\n", b"")
    elif kind == "tls":  # garbage with no line end at all: a TLS ClientHello sent to the HTTP port
        hello = b"\x16\x03\x01" + draw(st.binary(min_size=2, max_size=200))
        return Attack(hello, status=400)
    else:
        line = b"POST / HTTP/1.1"
        broken = draw(st.sampled_from([b"Host : localhost", b"X-A: b\x00c", b"X-A: b\rc", b" folded: yes",
                                       b"X-A: b" + eol + b" folded", b"no colon", b": empty name", b"X\xffA: b",
                                       b"X-A: b\x7f", b"X(A): b"]))  # fmt: skip
        fields.insert(draw(st.integers(0, len(fields))), broken)
    return Attack(eol.join([line, *fields, b"", body]), status=400)


@st.composite
def attacks(draw: st.DrawFn) -> Attack:
    attack = draw(st.one_of(json_bodies(), byte_bodies(), shaped_bodies(), odd_requests(), bare_lf(),
                            malformed_heads()))  # fmt: skip
    how = draw(st.sampled_from(["whole"] * 6 + ["slow", "vanish", "half-close"]))
    if how != "whole" and len(attack.data) > 100_000:
        how = "whole"
    if how == "half-close":  # a body shorter than its Content-Length: the client gives up sending
        return Attack(attack.data[: max(1, len(attack.data) - 3)], how, False, attack.method, attack.status)
    return Attack(attack.data, how, attack.may_succeed, attack.method, attack.status)


def send(port: int, attack: Attack) -> HttpResult | None:
    """Send the attack; the parsed first response, or None when there was none to read."""
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        try:
            if attack.how == "slow":
                for at in range(0, len(attack.data), 7):
                    sock.sendall(attack.data[at : at + 7])
                    time.sleep(0.001)
            elif attack.how == "vanish":
                sock.sendall(attack.data[: len(attack.data) // 2])
                return None
            else:
                sock.sendall(attack.data)
            if attack.how == "half-close":
                sock.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered and closed before reading everything (413): read the answer
        data = read_answer(sock, head_only=attack.method == "HEAD")
    return parse_response(data) if data else None


@pytest.fixture(scope="module")
def daemon(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    config = base_config(tiny_model, 0, max_tokens=2, log_level="info")
    daemon = Daemon(tmp_path_factory.mktemp("hostile"), config).start().wait_serving()
    yield daemon
    daemon.kill_all()


counts: dict[str, int] = {}


def test_the_fuzzers_malformed_requests_get_json_answers(daemon: Daemon) -> None:
    """The three shapes a raw-HTTP fuzzer found closed without a word or answered with a
    plain-text 500, each on its own connection:

    1. a valid POST with bare LF line ends: served (200) as with CRLF;
    2. binary garbage as the request line, then headers; and garbage with no line end at all
       (a TLS ClientHello): 400 ``{"Error"}``, at once;
    3. a non-ASCII method (``\\xff\\xfe / HTTP/1.1``): 400 ``{"Error"}``, not 500.

    Every answer is JSON with an ``X-Request-Id``.
    """
    body = b'{"prompt": "hi"}'
    bare = b"POST / HTTP/1.1\nHost: localhost\nContent-Type: application/json\nContent-Length: 16\n\n" + body
    served = send(daemon.port, Attack(bare))
    assert served is not None and served.status == 200, served
    assert isinstance(json.loads(served.body)["response"], str) and served.headers.get("x-request-id")

    for malformed in (
        b"\x00\x9c\xff\x01garbage\x7f\r\nHost: localhost\r\n\r\n",
        b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03",
        b"\xff\xfe / HTTP/1.1\r\nHost: localhost\r\n\r\n",
    ):
        result = send(daemon.port, Attack(malformed))
        assert result is not None, f"no answer to {malformed!r}"
        assert result.status == 400, (malformed, result.status, result.body)
        assert result.headers["content-type"].startswith("application/json") and result.headers.get("x-request-id")
        assert "malformed request line" in json.loads(result.body)["Error"]


@settings(
    max_examples=CAMPAIGN,
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
)
@given(attack=attacks())
def test_hostile_requests_get_json_4xx_and_the_daemon_stays_up(daemon: Daemon, attack: Attack) -> None:
    result = send(daemon.port, attack)
    assert daemon.proc is not None and daemon.proc.poll() is None, daemon.log_text()
    counts["sent"] = counts.get("sent", 0) + 1
    if result is None:
        counts["no answer"] = counts.get("no answer", 0) + 1
        assert attack.how in ("vanish", "half-close"), f"a complete request got no answer: {attack}"
        return
    counts[str(result.status)] = counts.get(str(result.status), 0) + 1
    assert result.status < 500, (result.status, result.body[:300])
    assert attack.status in (None, result.status), (attack, result.status, result.body[:300])
    assert result.headers.get("x-request-id"), (attack, result.status, result.headers)
    if attack.method == "HEAD":
        return
    assert result.headers.get("content-type", "").startswith("application/json"), (result.headers, result.body[:300])
    document = json.loads(result.body)
    if result.status == 200:
        assert attack.may_succeed and isinstance(document.get("response"), str), (attack, document)
    elif attack.path == b"/v1/chat/completions" and attack.status is None:  # an OpenAI endpoint: its error object
        assert 400 <= result.status < 500 and isinstance(document["error"]["message"], str), (result.status, document)
    else:
        assert 400 <= result.status < 500 and isinstance(document.get("Error"), str), (result.status, document)


def test_after_the_campaign_a_valid_request_succeeds(daemon: Daemon) -> None:
    """Runs after the campaign (file order): the daemon is up and answers a valid request."""
    result = daemon.ask("Are you still there?")
    assert result.status == 200 and result.json()["response"]
    print(f"hostile campaign: {counts}")
