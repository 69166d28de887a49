"""The prompt cache end to end: real daemons, the tiny model, real HTTP."""

from __future__ import annotations

import re
from typing import Callable

from daemon import Daemon

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
    4. with the cache, the first request computes everything, the second takes the shared
       system prompt and template from the cache, the third nearly all of its prompt;
       without it, nothing is ever taken from a cache.
    """
    cached_daemon = make_daemon(name="cached").start().wait_serving()
    with_cache, cached = answers_and_cached_tokens(cached_daemon)
    plain_daemon = make_daemon(name="plain", prompt_cache_mb=0).start().wait_serving()
    without_cache, uncached = answers_and_cached_tokens(plain_daemon)

    assert with_cache == without_cache
    assert uncached == [0, 0, 0]
    first, second, third = cached
    assert first == 0
    assert second > 10  # "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n..." at least
    assert third > second  # the whole earlier sea prompt but its last token
