"""The listening socket: bound and listening before Sanic starts, so a busy port is a clean
start-up failure (exit 4) rather than a Sanic traceback. Light enough for the supervisor, which
tries the port before it loads anything."""

from __future__ import annotations

import socket


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
