"""Soak: many mixed requests against one daemon; nothing fails and nothing grows.

``LLM_SERVER_SOAK`` requests (default 300 in CI; the full soak is
``LLM_SERVER_SOAK=2000 bash tests/run.sh tests/test_soak.py``), in waves that alternate one
client at a time with 8 concurrent clients, every prompt different. After a warm-up (the first
tenth, during which the prompt cache, bounded here at 2 MB, fills) the model worker's resident
memory must stay within 5%, and the open file descriptors and threads of every daemon process
must not change.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Callable

import psutil

from daemon import Daemon, cmdline

REQUESTS = int(os.environ.get("LLM_SERVER_SOAK", "300"))


def sample(daemon: Daemon) -> dict[str, dict[str, int]]:
    """RSS (KiB), open fds and threads of the supervisor and each child, by role."""
    assert daemon.proc is not None
    time.sleep(0.5)  # the server's ends of the clients' closed connections close too
    out = {}
    for pid in [daemon.proc.pid, *daemon.descendants()]:
        role = cmdline(pid).removeprefix("llm-server: ")
        if role not in ("supervisor", "model-worker", "http"):
            continue
        process = psutil.Process(pid)
        out[role] = {
            "rss_kib": process.memory_info().rss // 1024,
            "threads": process.num_threads(),
            "fds": process.num_fds(),
        }
    return out


def test_soak_no_errors_memory_fds_threads_flat(make_daemon: Callable[..., Daemon]) -> None:
    """Scenario:
    1. a daemon on the tiny model (8 tokens per answer, prompt cache bounded at 2 MB);
    2. REQUESTS requests, in waves of 8: one at a time, then 8 at once, alternating;
    3. every answer is 200;
    4. from the end of the warm-up to the end: worker RSS within 5%, fds and threads of the
       supervisor, worker and HTTP process unchanged.
    """
    daemon = make_daemon(max_tokens=8, prompt_cache_mb=2, log_level="info").start().wait_serving()
    failures: list[str] = []
    sent = 0
    warm: dict[str, dict[str, int]] | None = None

    def ask(n: int) -> None:
        result = daemon.ask(f"Soak request {n}: tell me something about the number {n * 7}.", timeout=120)
        if result.status != 200:
            failures.append(f"{n}: {result.status} {result.body[:200]!r}")

    wave = 0
    while sent < REQUESTS:
        size = min(8, REQUESTS - sent)
        if wave % 2 == 0:
            for k in range(size):
                ask(sent + k)
        else:
            threads = [threading.Thread(target=ask, args=(sent + k,)) for k in range(size)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        sent += size
        wave += 1
        if warm is None and sent >= REQUESTS // 10:
            warm = sample(daemon)
    end = sample(daemon)
    assert not failures, failures[:5]
    assert warm is not None
    print(f"soak: {sent} requests; after warm-up {warm}; at the end {end}")
    growth = end["model-worker"]["rss_kib"] / warm["model-worker"]["rss_kib"] - 1
    assert abs(growth) <= 0.05, (growth, warm, end)
    for role in ("supervisor", "model-worker", "http"):
        assert end[role]["fds"] == warm[role]["fds"], (role, warm, end)
        assert end[role]["threads"] == warm[role]["threads"], (role, warm, end)
