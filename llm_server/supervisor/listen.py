"""The listening socket: bound and listening before Sanic starts, so a busy port is a clean
start-up failure (exit 4) rather than a Sanic traceback (light enough for the supervisor, which
tries the port before it loads anything); and at shutdown, the connections still waiting in its
backlog, which get a 503 instead of a reset."""

from __future__ import annotations

import json
import socket
import uuid


def bind_socket(host: str, port: int) -> socket.socket:
    """Bind and listen before Sanic starts, so a busy port is reported, not crashed on."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(1024)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


class Listener:
    """The listening socket handed to Sanic, plus a spare handle on it for the drain.

    When Sanic stops accepting at shutdown it closes its socket, and connections the kernel has
    already accepted into the backlog would be reset. The spare handle keeps the socket open a
    moment longer: ``answer_backlog`` takes every connection still queued, closes the socket (new
    connections are refused from then on), and answers each with a 503 JSON error.
    """

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._spare: socket.socket | None = sock.dup()

    @property
    def server_closed(self) -> bool:
        return self.sock.fileno() == -1

    def answer_backlog(self) -> int:
        """Answer 503 to every connection still in the backlog, then close; how many there were."""
        spare, self._spare = self._spare, None
        if spare is None:
            return 0
        waiting = []
        spare.setblocking(False)
        try:
            while True:
                try:
                    waiting.append(spare.accept()[0])
                except (BlockingIOError, InterruptedError):
                    break
        finally:
            spare.close()
        for conn in waiting:
            _answer_unavailable(conn)
        return len(waiting)


_UNAVAILABLE = json.dumps({"Error": "the server is shutting down; retry shortly"}).encode()


def _answer_unavailable(conn: socket.socket) -> None:
    """503 with Retry-After; the request is read first (closing unread data would send a reset)."""
    try:
        conn.settimeout(0.5)
        data = b""
        while b"\r\n\r\n" not in data:
            piece = conn.recv(65536)
            if not piece:
                break
            data += piece
        head = (
            "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(_UNAVAILABLE)}\r\nRetry-After: 1\r\nX-Request-Id: {uuid.uuid4().hex[:16]}\r\n"
            "Connection: close\r\n\r\n"
        )
        conn.sendall(head.encode() + _UNAVAILABLE)
        conn.shutdown(socket.SHUT_WR)
        while conn.recv(65536):  # the rest of the request, until the client closes
            pass
    except OSError:
        pass
    finally:
        conn.close()
