"""Many clients at once on a default config: no rate limiting, every request queues and is answered.

The clients are raw sockets on one asyncio loop (2,000 threads would cost more than the daemon).
"""

from __future__ import annotations

import asyncio
import json
import resource
from typing import Callable

from daemon import Daemon

CLIENTS = 2000


async def _ask(port: int, body: bytes) -> int | str:
    """One ``POST /`` on its own connection: the status code, or what went wrong."""
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError as exc:
        return f"connect: {exc!r}"
    try:
        head = f"POST / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
        writer.write(f"{head}Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body)
        await writer.drain()
        answer = await reader.read()  # the server closes after its answer (Connection: close)
        status_line = answer.split(b"\r\n", 1)[0].split()
        return int(status_line[1]) if len(status_line) > 1 and answer.endswith(b"}") else f"answer: {answer[:80]!r}"
    except OSError as exc:
        return f"exchange: {exc!r}"
    finally:
        writer.close()


async def _all(port: int) -> list[int | str]:
    bodies = [json.dumps({"prompt": f"question {i}"}).encode() for i in range(CLIENTS)]
    return await asyncio.wait_for(asyncio.gather(*(_ask(port, body) for body in bodies)), 300)


def test_two_thousand_clients_at_once_are_all_answered(make_daemon: Callable[..., Daemon]) -> None:
    """Scenario (the default config, but 1-token answers to keep it short):
    1. the daemon starts with a soft limit of 1,024 open files, as many systems give (macOS: 256);
    2. 2,000 clients connect at once, each with one ``POST /``;
    3. every one gets 200: none refused, reset or answered 503 (before: ``max_pending_requests``
       defaulted to 64, and 300 clients got 219 × 503).
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(1024, hard), hard))
    try:
        daemon = make_daemon(max_tokens=1, log_level="info").start()
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    daemon.wait_serving()
    if soft < CLIENTS + 100:  # the clients' own sockets
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    try:
        results = asyncio.run(_all(daemon.port))
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    failed = [r for r in results if r != 200]
    assert not failed, f"{len(failed)} of {CLIENTS} not answered 200, e.g. {sorted(set(map(str, failed)))[:5]}"
    assert "max_pending_requests" not in daemon.log_text()
    assert daemon.ask("and one more").status == 200
