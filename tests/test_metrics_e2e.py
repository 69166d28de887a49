"""``GET /metrics`` end to end: the real daemon, the trained tool model, a real MCP server, real HTTP.

The series are read back with prometheus-client's own text parser, as a Prometheus server reads
them, and must move as requests, tool calls and a worker restart happen.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path
from typing import Callable

import psutil
from prometheus_client.parser import text_string_to_metric_families

from daemon import Daemon, base_config
from tool_model import SYSTEM_PROMPT, calc_servers

KEY = "metrics-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
CONCURRENT = 16


def scrape(daemon: Daemon) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of ``/metrics``, by name and labels."""
    result = daemon.request("GET", "/metrics", headers=AUTH, timeout=10)
    assert result.status == 200, result.body
    assert result.headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(result.body.decode()):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def ask(daemon: Daemon, prompt: str, statuses: list[int] | None = None) -> None:
    """POST ``prompt`` with the key (``statuses`` given: noted there, else asserted 200)."""
    body = json.dumps({"prompt": prompt}).encode()
    result = daemon.request("POST", "/", body, {"Content-Type": "application/json", **AUTH}, timeout=120)
    if statuses is None:
        assert result.status == 200, result.body
    else:
        statuses.append(result.status)


# A story the grammar will not let end before max_tokens: the sampled answers all run their full
# length, so the running gauge has seconds, not a lucky early EOS's milliseconds, to be read.
LONG_STORY = {"type": "json_schema", "json_schema": {"name": "story", "strict": True, "schema": {
    "type": "object", "properties": {"story": {"type": "string", "minLength": 4000}}, "required": ["story"],
    "additionalProperties": False}}}  # fmt: skip


def chat(daemon: Daemon, statuses: list[int]) -> None:
    """A question the tool model was never taught, sampled, held to max_tokens by its format."""
    document = {"messages": [{"role": "user", "content": "Tell me a long story about the sea."}],
                "max_tokens": 200, "temperature": 1.0, "response_format": LONG_STORY}  # fmt: skip
    body = json.dumps(document).encode()
    result = daemon.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json", **AUTH})
    statuses.append(result.status)


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def total(samples: dict, name: str) -> float:
    return sum(v for (n, _), v in samples.items() if n == name)


def test_metrics_move_as_requests_tools_and_a_restart_happen(make_daemon: Callable[..., Daemon], tool_model: Path) -> None:
    """Scenario:
    1. a daemon with ``api_key``, the trained tool model and the calc MCP server;
    2. ``/metrics`` without the key is 401; with it, the MCP server is up and nothing is counted;
    3. three plain questions and one that calls ``add``: tokens, requests by finish reason, the
       latency histograms, prompt-cache lookups and the tool call are all counted;
    4. while 16 sampled questions run at once, the running gauge rises above zero, and the KV usage
       stays a fraction of the budget;
    5. the worker is killed: once a new one serves, ``worker_restarts_total`` is 1 and the
       counters did not go back (a dead worker's counts still count).
    """
    config = base_config(tool_model, 0, servers=calc_servers(), system_prompt=SYSTEM_PROMPT, max_tokens=200,
                         api_key=KEY, log_level="info")  # fmt: skip
    daemon = make_daemon(config).start().wait_serving()

    assert daemon.request("GET", "/metrics").status == 401
    before = scrape(daemon)
    assert _eventually(daemon, lambda s: value(s, "llm_server_mcp_server_up", server="calc") == 1.0)
    assert total(before, "llm_server_generation_tokens_total") == 0
    assert value(before, "llm_server_worker_restarts_total") == 0

    for prompt in ("Say hello.", "Say hello.", "Say hello.", "What is 2 + 3?"):
        ask(daemon, prompt)
    after = scrape(daemon)
    assert value(after, "llm_server_request_success_total", finished_reason="stop") == 4
    assert value(after, "llm_server_e2e_request_latency_seconds_count") == 4
    generations = value(after, "llm_server_time_to_first_token_seconds_count")
    assert generations == 5  # the tool call's request took two rounds
    assert value(after, "llm_server_request_queue_time_seconds_count") == generations
    assert value(after, "llm_server_generation_tokens_total") > 5 * 3
    # One gap between each two tokens of a generation.
    itl = value(after, "llm_server_inter_token_latency_seconds_count")
    assert itl == value(after, "llm_server_generation_tokens_total") - generations
    assert value(after, "llm_server_prompt_tokens_total") == value(after, "llm_server_prefix_cache_queries_total") > 0
    assert 0 < value(after, "llm_server_prefix_cache_hits_total") < value(after, "llm_server_prefix_cache_queries_total")
    assert value(after, "llm_server_tool_calls_total", server="calc", tool="add", outcome="ok") == 1
    assert value(after, "llm_server_tool_call_seconds_count", server="calc") == 1

    statuses: list[int] = []
    threads = [threading.Thread(target=chat, args=(daemon, statuses)) for _ in range(CONCURRENT)]
    for thread in threads:
        thread.start()
    running = []
    usage = []
    while any(t.is_alive() for t in threads):
        now = scrape(daemon)
        running.append(value(now, "llm_server_num_requests_running"))
        usage.append(value(now, "llm_server_kv_cache_usage_perc"))
        time.sleep(0.02)
    assert statuses == [200] * CONCURRENT
    assert max(running) >= 1
    assert all(0 <= u < 1 for u in usage)
    settled = scrape(daemon)
    assert value(settled, "llm_server_request_success_total", finished_reason="length") == CONCURRENT
    assert _eventually(daemon, lambda s: value(s, "llm_server_num_requests_running") == 0)

    worker = next(p for p in psutil.Process(daemon.proc.pid).children() if "model-worker" in " ".join(p.cmdline()))
    os.kill(worker.pid, signal.SIGKILL)
    daemon.wait_log("linked to a new model worker", timeout=90)
    restarted = scrape(daemon)
    assert value(restarted, "llm_server_worker_restarts_total") == 1
    for name in ("llm_server_generation_tokens_total", "llm_server_prompt_tokens_total"):
        assert value(restarted, name) == value(settled, name) > 0
    assert value(restarted, "llm_server_num_requests_running") == 0
    ask(daemon, "Say hello.")
    assert total(scrape(daemon), "llm_server_request_success_total") == 4 + CONCURRENT + 1


def _eventually(daemon: Daemon, condition: Callable[[dict], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition(scrape(daemon)):
            return True
        time.sleep(0.1)
    return False
