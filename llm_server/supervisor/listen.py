"""The listening socket, owned by the supervisor from start to exit.

It is bound once at start (a busy port is exit 4 before anything loads) and handed to each HTTP
process, which listens and accepts on it; because the supervisor keeps its own handle, the socket
stays open while an HTTP process restarts, and connections wait in the kernel's backlog for the
next one. At shutdown, once the HTTP process has stopped accepting, ``take_backlog`` takes
every connection still queued and closes the socket (new connections are refused from then on),
and ``answer_unavailable`` answers each with a 503 JSON error: nothing the kernel accepted is reset.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import uuid

from ..common.exit_codes import ExitCode
from ..common.sockets import bind_socket
from .states import Fatal

log = logging.getLogger("llm_server.supervisor")


class Listener:
    """The socket from ``bind`` to ``close``, and the thread answering its backlog."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port  # the bound port once bound (the config may say 0)
        self.sock: socket.socket | None = None
        self._answers: threading.Thread | None = None

    def bind(self) -> None:
        """Take the port for the daemon's whole life, before anything loads: a busy port fails in
        milliseconds, and nobody can take it while the model loads. (Bound, not yet listening:
        connections are refused until the HTTP process listens, after the model is loaded.)"""
        try:
            self.sock = bind_socket(self.host, self.port)
        except OSError as exc:
            raise Fatal(ExitCode.PORT, f"cannot listen on {self.host}:{self.port}: {exc.strerror or exc}") from None
        self.port = self.sock.getsockname()[1]

    def close(self) -> None:
        """Close the socket for good; connections the kernel already accepted into its backlog
        are taken first and answered 503 (on a thread: a slow client must not hold up the stop)."""
        if self.sock is None:
            return
        sock, self.sock = self.sock, None
        waiting = take_backlog(sock)
        log.info("listener closed: %d waiting connection(s) answered 503", len(waiting))
        if waiting:
            self._answers = threading.Thread(
                target=answer_unavailable, args=(waiting,), name="backlog-503", daemon=True
            )
            self._answers.start()

    def join(self, timeout: float) -> None:
        """Wait (a bounded time) for the backlog's answers to be sent."""
        if self._answers is not None:
            self._answers.join(timeout)


def take_backlog(sock: socket.socket) -> list[socket.socket]:
    """Take every connection waiting in the backlog, then close ``sock`` for good."""
    waiting = []
    sock.setblocking(False)
    try:
        while True:
            try:
                waiting.append(sock.accept()[0])
            except (BlockingIOError, InterruptedError):
                break
            except OSError:  # never listened (stopped before the HTTP process started)
                break
    finally:
        sock.close()
    return waiting


def answer_unavailable(waiting: list[socket.socket]) -> None:
    """Answer each connection 503 (reading its request first)."""
    for conn in waiting:
        _answer_unavailable(conn)


_UNAVAILABLE = json.dumps({"Error": "the server is shutting down; retry shortly"}).encode()


def _answer_unavailable(conn: socket.socket) -> None:
    """503 with Retry-After; the request is read first (closing unread data would send a reset)."""
    try:
        conn.setblocking(True)
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
