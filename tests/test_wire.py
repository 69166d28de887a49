"""The request-head checks of ``llm_server.http.wire`` as pure functions (the daemon's answers to
these shapes are tested end to end in test_hostile.py)."""

from __future__ import annotations

import pytest
from sanic.exceptions import BadRequest

from llm_server.http.wire import (
    BAD_FIELD,
    BAD_LINE,
    BAD_METHOD,
    BAD_TARGET,
    BAD_VERSION,
    head_end,
    normalized_head,
    request_line_problem,
)


@pytest.mark.parametrize(
    ("line", "complete", "problem"),
    [
        (b"POST / HTTP/1.1", True, None),
        (b"GET /v1/models?x=%00 HTTP/1.0", True, None),
        (b"", False, None),  # nothing yet
        (b"PO", False, None),
        (b"POST / HTTP/1.", False, None),  # still arriving
        (b"POST / HTTP/1.", True, BAD_VERSION),
        (b"\xff\xfe / HTTP/1.1", True, BAD_METHOD),
        (b"\x16", False, BAD_METHOD),  # a TLS ClientHello: refused at its first byte
        (b"G(T / HTTP/1.1", True, BAD_METHOD),
        (b" / HTTP/1.1", True, BAD_METHOD),
        (b"GET /caf\xc3\xa9 HTTP/1.1", True, BAD_TARGET),
        (b"GET /a\tb", False, BAD_TARGET),
        (b"GET / HTTP/2.0", True, BAD_VERSION),
        (b"GET / http", False, BAD_VERSION),
        (b"GET / HTTP/1.1 extra", False, BAD_LINE),
        (b"GET /", True, BAD_LINE),
    ],
)
def test_request_lines(line: bytes, complete: bool, problem: str | None) -> None:
    assert request_line_problem(line, complete) == problem


def test_a_head_ends_at_its_first_blank_line_whatever_the_line_ends() -> None:
    assert head_end(bytearray(b"GET / HTTP/1.1\r\nA: b\r\n\r\nbody\n\n"), 0) == 24
    assert head_end(bytearray(b"GET / HTTP/1.1\nA: b\n\nbody"), 0) == 21
    assert head_end(bytearray(b"GET / HTTP/1.1\nA: b\r\n\r\n"), 0) == 23
    assert head_end(bytearray(b"GET / HTTP/1.1\r\nA: b\r\n"), 0) == -1


def test_bare_lf_heads_are_rewritten_with_crlf() -> None:
    head = b"POST / HTTP/1.1\nHost: x\r\nContent-Length: 2\n\n"
    assert normalized_head(head) == b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n"
    assert normalized_head(b"GET / HTTP/1.1\r\nX-Utf8: caf\xc3\xa9\r\n\r\n").endswith(b"caf\xc3\xa9\r\n\r\n")


@pytest.mark.parametrize(
    "field", [b"Host : x", b" folded", b"\tfolded", b"X: a\rb", b"X: a\x00", b"X: a\x7f", b"no colon", b": x", b"X(: y"]
)
def test_broken_header_lines_are_refused(field: bytes) -> None:
    with pytest.raises(BadRequest, match="malformed header line"):
        normalized_head(b"GET / HTTP/1.1\r\nHost: x\r\n" + field + b"\r\n\r\n")
    assert BAD_FIELD.startswith("malformed header line")
