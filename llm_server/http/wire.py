"""The HTTP/1.1 wire: each request head is read and checked here before Sanic parses it.

Sanic's parser waits for a CRLF blank line and splits lines on CRLF only. So a head with bare LF
line ends waits for the request timeout (60 s, then 408), and a client that gives up first just
sees the connection close. Sanic also passes any method on to routing. Then the 405's message
repeats it, and a non-ASCII one (``\\xff\\xfe / HTTP/1.1``) cannot be encoded: a plain-text 500.
``WireHttp`` reads the head first:

- a bare LF ends a line as CRLF does (RFC 9112 §2.2), and the head is rewritten with CRLF for Sanic;
  empty lines before the request line are skipped (§2.2);
- a request line that is not ``token SP target SP HTTP/1.x`` is answered 400 as soon as its bytes
  arrive: a method byte outside ``tchar``, a target byte outside printable US-ASCII, any other
  protocol. Binary garbage is rejected at its first byte that cannot fit;
- a field line that is not ``token ":" value`` is answered 400 once the head is complete:
  whitespace before the colon or a folded line (§5.1, §5.2), control bytes or a bare CR (§2.2).

The 400 goes through the app's error handler like every other error (JSON ``{"Error"}``,
``X-Request-Id``) and closes the connection: after a malformed head, the next request's start
cannot be found.
"""

from __future__ import annotations

import re

from sanic.exceptions import BadRequest, PayloadTooLarge
from sanic.http import Http
from sanic.server.protocols.http_protocol import HttpProtocol

TCHAR = rb"!#$%&'*+\-.^_`|~0-9A-Za-z"  # RFC 9110 §5.6.2
METHOD = re.compile(b"[" + TCHAR + b"]*")
TARGET = re.compile(rb"[\x21-\x7e]*")  # Sanic takes US-ASCII targets only
FIELD_LINE = re.compile(b"[" + TCHAR + rb"]+:[\t\x20-\x7e\x80-\xff]*")  # obs-text allowed in values
VERSIONS = (b"HTTP/1.1", b"HTTP/1.0")

BAD_LINE = "malformed request line: expected 'METHOD target HTTP/1.1', single spaces"
BAD_METHOD = "malformed request line: the method must be a token (letters, digits, !#$%&'*+-.^_`|~)"
BAD_TARGET = "malformed request line: the target must be printable US-ASCII"
BAD_VERSION = "malformed request line: the protocol must be HTTP/1.1 or HTTP/1.0"
BAD_FIELD = "malformed header line: expected 'Name: value' (a token, no space before the colon, no control bytes)"


def request_line_problem(line: bytes, complete: bool) -> str | None:
    """Why ``line`` is no HTTP/1.x request line, or None. ``line`` is the request line without
    its line end; while it is still arriving (``complete`` false) only what has come is judged,
    so garbage is refused at its first byte that no request line can have."""
    parts = line.split(b" ")
    if len(parts) > 3 or (complete and len(parts) < 3):
        return BAD_LINE
    method, rest = parts[0], parts[1:]
    if not METHOD.fullmatch(method) or (not method and (rest or complete)):
        return BAD_METHOD
    if rest and (not TARGET.fullmatch(rest[0]) or (not rest[0] and (len(rest) > 1 or complete))):
        return BAD_TARGET
    if len(rest) == 2:
        version = rest[1]
        possible = version in VERSIONS or (not complete and any(v.startswith(version) for v in VERSIONS))
        if not possible:
            return BAD_VERSION
    return None


def head_end(buf: bytearray, start: int) -> int:
    """The index just past the head's blank line (CRLF or bare LF line ends), or -1."""
    ends = [at + len(blank) for blank in (b"\n\n", b"\n\r\n") if (at := buf.find(blank, start)) != -1]
    return min(ends, default=-1)


def normalized_head(head: bytes) -> bytes:
    """The head (through its blank line) with CRLF line ends; BadRequest for a bad field line."""
    lines = [line[:-1] if line.endswith(b"\r") else line for line in head.split(b"\n")[:-1]]
    for field in lines[1:-1]:
        if not FIELD_LINE.fullmatch(field):
            raise BadRequest(BAD_FIELD)
    return b"\r\n".join(lines) + b"\r\n"


class WireHttp(Http):
    """Sanic's HTTP/1.1 connection, with the request head checked and normalised first."""

    __slots__ = ()

    async def http1_request_header(self) -> None:
        """Wait for the whole head, judging the request line as it arrives; then hand Sanic's
        parser the same head with CRLF line ends."""
        buf = self.recv_buffer
        line_done = False
        searched = 0
        while True:
            if not line_done:
                while buf.startswith(b"\n") or buf.startswith(b"\r\n"):  # empty lines before a request
                    del buf[: buf.index(b"\n") + 1]
                eol = buf.find(b"\n")
                line = bytes(buf if eol == -1 else buf[:eol])
                problem = request_line_problem(line[:-1] if line.endswith(b"\r") else line, eol != -1)
                if problem is not None:
                    raise BadRequest(problem)
                line_done = eol != -1
            if line_done:
                end = head_end(buf, searched)
                if end != -1:
                    break
                searched = max(0, len(buf) - 2)
            if len(buf) > self.HEADER_MAX_SIZE:
                raise PayloadTooLarge("Request header exceeds the size limit")  # Sanic's own answer
            await self._receive_more()
        head = bytes(buf[:end])
        normalized = normalized_head(head)
        if normalized != head:
            buf[:end] = normalized  # in place: Sanic's parser reads this same buffer next
        await super().http1_request_header()


class WireProtocol(HttpProtocol):
    """The protocol ``app.run`` is given: Sanic's, with ``WireHttp`` for each connection."""

    __slots__ = ()
    HTTP_CLASS = WireHttp
