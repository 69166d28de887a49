"""Admission by KV memory end to end: a flood of long prompts against a small budget.

The real daemon, the tiny model, real HTTP; the KV usage and the waiting line are read from
``GET /metrics`` while the flood runs, as an operator would watch them.
"""

from __future__ import annotations

import json
import re
import threading
import time
from typing import Callable

from prometheus_client.parser import text_string_to_metric_families

from daemon import Daemon

FLOOD = 32
KV_CACHE_MB = 4


def gauges(daemon: Daemon) -> dict[str, float]:
    result = daemon.request("GET", "/metrics", timeout=10)
    assert result.status == 200, result.body
    return {
        sample.name: sample.value
        for family in text_string_to_metric_families(result.body.decode())
        for sample in family.samples
        if not sample.labels
    }


def long_prompt(i: int) -> str:
    """About 2,000 tokens of the tiny model's vocabulary, different from the first word on."""
    return f"Question {i}. " + "Tell me about the sea and the mountains. " * 90


def test_a_flood_of_long_prompts_waits_for_memory_and_never_crashes(make_daemon: Callable[..., Daemon]) -> None:
    """Scenario:
    1. a daemon with ``kv_cache_mb: 4`` (room for ~3 of these sequences at once);
    2. 32 clients each send a ~2,000-token prompt at once;
    3. all 32 are answered 200; while they run, the KV usage never exceeds the budget and
       requests wait for room; the worker never restarts;
    4. one request whose prompt plus max_tokens could never fit alone is a 400 that names the
       sizes, at once.
    """
    daemon = make_daemon(kv_cache_mb=KV_CACHE_MB, max_tokens=16, log_level="info").start().wait_serving()
    budget = re.search(r"KV cache budget ([\d.]+) MB \(kv_cache_mb\), (\d+) bytes per token", daemon.log_text())
    assert budget and float(budget.group(1)) == KV_CACHE_MB

    statuses: dict[int, int] = {}
    prompt_tokens: dict[int, int] = {}

    def client(i: int) -> None:
        document = {"messages": [{"role": "user", "content": long_prompt(i)}], "max_tokens": 16}
        result = daemon.request("POST", "/v1/chat/completions", json.dumps(document).encode(),
                                {"Content-Type": "application/json"}, timeout=600)  # fmt: skip
        statuses[i] = result.status
        if result.status == 200:
            prompt_tokens[i] = result.json()["usage"]["prompt_tokens"]

    threads = [threading.Thread(target=client, args=(i,)) for i in range(FLOOD)]
    for thread in threads:
        thread.start()
    usage, waiting, running = [], [], []
    while any(thread.is_alive() for thread in threads):
        now = gauges(daemon)
        usage.append(now["llm_server_kv_cache_usage_perc"])
        waiting.append(now["llm_server_num_requests_waiting"])
        running.append(now["llm_server_num_requests_running"])
        time.sleep(0.05)
    for thread in threads:
        thread.join()

    assert statuses == {i: 200 for i in range(FLOOD)}
    assert min(prompt_tokens.values()) > 1500
    assert 0.3 < max(usage) <= 1.0
    assert max(waiting) > 0
    assert 1 < max(running) < FLOOD
    log = daemon.log_text()
    assert log.count("spawned model-worker") == 1 and "restarting" not in log
    assert gauges(daemon)["llm_server_worker_restarts_total"] == 0

    started = time.monotonic()
    document = {"messages": [{"role": "user", "content": long_prompt(0)}], "max_tokens": 8000}
    result = daemon.request("POST", "/v1/chat/completions", json.dumps(document).encode(),
                            {"Content-Type": "application/json"})  # fmt: skip
    assert result.status == 400, result.body
    message = result.json()["error"]["message"]
    assert re.search(r"needs [\d.]+ MB of KV cache \(\d+ prompt tokens \+ 8000 max_tokens, \d+ bytes per token\)", message)
    assert f"kv_cache_mb {KV_CACHE_MB:.1f} MB" in message
    assert time.monotonic() - started < 5
