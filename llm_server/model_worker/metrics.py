"""The worker's Prometheus series: the engine's, the requests' and the tools' numbers.

Named as vLLM V1 names them, prefixed ``llm_server_`` instead of ``vllm:`` (so its dashboards
port by a rename), plus the tool series no peer has. The worker owns these numbers; the HTTP
process serves them (``http/metrics_route``) through prometheus-client's multiprocess mode: each
process writes its own memory-mapped files in the directory the supervisor made
(``PROMETHEUS_MULTIPROC_DIR``), and a scrape reads them all, so serving ``/metrics`` never waits
on the worker nor blocks generation, and counters survive a worker restart (a dead worker's
files still count; its gauges are dropped, ``forget_dead``).

What each series counts (README, "Metrics"): the generation series per engine generation (one
per tool-calling round, as vLLM counts one per request it is given), the request series per
client request.
"""

from __future__ import annotations

import glob
import os
import re

from prometheus_client import Counter, Gauge, Histogram

from .jobs import Completion, Load

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0)

RUNNING = Gauge("llm_server_num_requests_running", "Sequences decoding now", multiprocess_mode="livesum")
WAITING = Gauge("llm_server_num_requests_waiting", "Sequences waiting for room in the KV budget",
                multiprocess_mode="livesum")  # fmt: skip
KV_USAGE = Gauge("llm_server_kv_cache_usage_perc", "KV cache held by running sequences, as a fraction of kv_cache_mb",
                 multiprocess_mode="livesum")  # fmt: skip
PREFIX_QUERIES = Counter("llm_server_prefix_cache_queries", "Prompt tokens looked up in the prompt cache")
PREFIX_HITS = Counter("llm_server_prefix_cache_hits", "Prompt tokens found in the prompt cache")
PROMPT_TOKENS = Counter("llm_server_prompt_tokens", "Prompt tokens processed (cached ones included)")
GENERATION_TOKENS = Counter("llm_server_generation_tokens", "Tokens generated")
SUCCESS = Counter("llm_server_request_success", "Client requests answered", ["finished_reason"])
TTFT = Histogram("llm_server_time_to_first_token_seconds", "From submission to the first token",
                 buckets=_LATENCY_BUCKETS)  # fmt: skip
ITL = Histogram("llm_server_inter_token_latency_seconds", "Between one token and the next", buckets=_TOKEN_BUCKETS)
E2E = Histogram("llm_server_e2e_request_latency_seconds", "A client request, from arrival in the worker to its answer",
                buckets=_LATENCY_BUCKETS)  # fmt: skip
QUEUE = Histogram("llm_server_request_queue_time_seconds", "Waiting for room in the KV budget",
                  buckets=_LATENCY_BUCKETS)  # fmt: skip
TOOL_CALLS = Counter("llm_server_tool_calls", "MCP tool calls", ["server", "tool", "outcome"])
TOOL_SECONDS = Histogram("llm_server_tool_call_seconds", "MCP tool call duration", ["server"],
                         buckets=_LATENCY_BUCKETS)  # fmt: skip
SERVER_UP = Gauge("llm_server_mcp_server_up", "1 while the MCP server is up", ["server"], multiprocess_mode="livesum")


def generation(completion: Completion) -> None:
    """One finished engine generation."""
    PROMPT_TOKENS.inc(completion.prompt_tokens)
    GENERATION_TOKENS.inc(completion.completion_tokens)
    PREFIX_QUERIES.inc(completion.prompt_tokens)
    PREFIX_HITS.inc(completion.cached_tokens)
    QUEUE.observe(completion.queue_s)
    if completion.first_token_s is not None:
        TTFT.observe(completion.first_token_s)
    times = completion.token_times
    for earlier, later in zip(times, times[1:]):
        ITL.observe(later - earlier)


def request(finished_reason: str, seconds: float) -> None:
    """One client request answered ("stop", "length", "tool_calls"), failed ("error") or
    dropped by its client ("abort")."""
    SUCCESS.labels(finished_reason).inc()
    E2E.observe(seconds)


def tool_call(server: str, tool: str, outcome: str, seconds: float) -> None:
    TOOL_CALLS.labels(server or "-", tool, outcome).inc()
    TOOL_SECONDS.labels(server or "-").observe(seconds)


def sample(load: Load, kv_budget: int | None, servers_up: dict[str, bool]) -> None:
    """The gauges, from the engine's last turn and the MCP servers' states."""
    RUNNING.set(load.running)
    WAITING.set(load.waiting)
    KV_USAGE.set(load.kv_bytes / kv_budget if kv_budget else 0.0)
    for name, up in servers_up.items():
        SERVER_UP.labels(name).set(1 if up else 0)


def forget_dead() -> None:
    """Drop the gauges of workers that are gone (their counters stay: totals survive restarts)."""
    folder = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not folder:
        return
    from prometheus_client import multiprocess

    for path in glob.glob(os.path.join(folder, "gauge_live*_*.db")):
        match = re.search(r"_(\d+)\.db$", path)
        if match and not _alive(int(match.group(1))):
            multiprocess.mark_process_dead(int(match.group(1)), folder)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
