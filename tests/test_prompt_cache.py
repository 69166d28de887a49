"""The prompt cache end to end: real daemons, the tiny model, real HTTP."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Callable

import psutil

from daemon import Daemon, base_config
from tool_model import SYSTEM_PROMPT, calc_servers

PROMPTS = ["Tell me about the sea.", "Tell me about the mountains.", "Tell me about the sea."]


def answers_and_cached_tokens(daemon: Daemon) -> tuple[list[str], list[int]]:
    """Ask PROMPTS one after another; the answers and each response's logged cached_tokens."""
    answers, cached = [], []
    for prompt in PROMPTS:
        result = daemon.ask(prompt)
        assert result.status == 200, result.body
        answers.append(result.json()["response"])
        line = daemon.response_line(result.headers["x-request-id"])
        match = re.search(r" response 200 .* cached_tokens=(\d+) ", line)
        assert match, line
        cached.append(int(match.group(1)))
    return answers, cached


def test_prompt_cache_reuses_prefixes_without_changing_answers(make_daemon: Callable[..., Daemon]) -> None:
    """Scenario:
    1. one daemon with the prompt cache (the default) and one with ``prompt_cache_mb: 0``;
    2. each gets the same three prompts in turn: sea, mountains, sea again;
    3. the answers are the same from both (greedy decoding: the cache changes no result);
    4. with the cache, the first request takes the system turn from it (warmed at start, before
       the daemon listened), the second as much or more of the shared template, the third
       nearly all of its prompt; without it, nothing is ever taken from a cache.
    """
    cached_daemon = make_daemon(name="cached").start().wait_serving()
    with_cache, cached = answers_and_cached_tokens(cached_daemon)
    plain_daemon = make_daemon(name="plain", prompt_cache_mb=0).start().wait_serving()
    without_cache, uncached = answers_and_cached_tokens(plain_daemon)

    assert with_cache == without_cache
    assert uncached == [0, 0, 0]
    first, second, third = cached
    warmed = re.search(r"prompt cache warmed with the system prompt and \d+ tool\(s\): (\d+) tokens", cached_daemon.log_text())
    assert warmed and first == int(warmed.group(1)) > 10  # "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    assert second >= first
    assert third > second  # the whole earlier sea prompt but its last token


def test_first_request_is_warm(make_daemon: Callable[..., Daemon]) -> None:
    """A long system prompt is prefilled at start: a fresh daemon's very first request takes it
    from the prompt cache, as every later one does (usage reports it, here through OpenAI's
    ``cached_tokens``); with the cache off nothing is warmed."""
    import openai

    system = " ".join(f"Rule {i}: answer plainly and keep to the facts." for i in range(60))
    daemon = make_daemon(system_prompt=system, max_tokens=4).start().wait_serving()
    warmed = re.search(r"prompt cache warmed with the system prompt and \d+ tool\(s\): (\d+) tokens", daemon.log_text())
    assert warmed and int(warmed.group(1)) > 500
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{daemon.port}/v1", api_key="unused", max_retries=0)
    first = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "Hi"}], max_tokens=4)
    assert first.usage.prompt_tokens_details.cached_tokens == int(warmed.group(1))
    assert first.usage.prompt_tokens > first.usage.prompt_tokens_details.cached_tokens


def test_a_changed_tool_list_is_warmed_again(make_daemon: Callable[..., Daemon], tool_model: Path) -> None:
    """Scenario:
    1. a daemon with the calc MCP server warms the system turn with its tools at start;
    2. the server is killed: its tools are withdrawn, and the worker warms the system turn
       without them in the background (the metrics show the server down meanwhile);
    3. the server is started again by the host: the list changes back and is warmed again, and
       a request then takes that whole system turn from the cache.
    """
    daemon = make_daemon(base_config(tool_model, 0, servers=calc_servers(), system_prompt=SYSTEM_PROMPT,
                                     max_tokens=8, log_level="info")).start().wait_serving()  # fmt: skip
    warmed = re.compile(r"prompt cache warmed with the system prompt and (\d+) tool\(s\): (\d+) tokens")
    first = warmed.findall(daemon.log_text())
    assert len(first) == 1 and int(first[0][0]) > 0
    tools, with_tools = first[0]

    server = next(p for p in psutil.Process(daemon.proc.pid).children(recursive=True)
                  if "calc_server.py" in " ".join(p.cmdline()))  # fmt: skip
    server.kill()
    daemon.wait_log(f"the tool list changed ({tools} -> 0 tools): warming the prompt cache again")
    daemon.wait_log("prompt cache warmed with the system prompt and 0 tool(s)")
    daemon.wait_log(f"the tool list changed (0 -> {tools} tools): warming the prompt cache again", timeout=60)
    daemon.wait_log(f"prompt cache warmed with the system prompt and {tools} tool(s)", count=2)
    counts = [match for match in warmed.findall(daemon.log_text())]
    assert counts[1][0] == "0" and int(counts[1][1]) < int(with_tools) and counts[2] == (tools, with_tools)

    result = daemon.ask("Say hello.")
    assert result.status == 200
    line = daemon.response_line(result.headers["x-request-id"])
    assert int(re.search(r"cached_tokens=(\d+)", line).group(1)) >= int(with_tools)
