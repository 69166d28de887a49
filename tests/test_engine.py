"""The engine driven directly: real MLX, the tiny model, every path a sequence can take.

A sequence runs alone (mlx-lm's ``generate_step``), in the batch (``BatchGenerator``), is handed
from the first to the second when another request arrives, or starts from the prompt cache.
Greedy decoding must give the same tokens on every path, and a cancelled sequence must leave the
engine free on every path.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Iterator

import pytest

from llm_server.common.protocol import prompt_messages
from llm_server.model_worker.chat import render
from llm_server.model_worker.engine import Engine
from llm_server.model_worker.jobs import CancelledGeneration, Completion, EngineDead, SamplingSettings

GREEDY = SamplingSettings(temperature=0.0, top_p=1.0, min_p=0.0, min_tokens_to_keep=1)
PROMPTS = ["Tell me about the sea.", "Tell me about the mountains.", "What is the capital of France?"]
LONG = 1500  # tokens: long enough that a second request arrives while the first still runs


@pytest.fixture(scope="module")
def engines(tiny_model: Path) -> Iterator[dict[str, Engine]]:
    """Two engines on the tiny model: without and with the prompt cache."""
    made = {"plain": Engine(str(tiny_model), GREEDY, 8, 0), "cached": Engine(str(tiny_model), GREEDY, 8, 64)}
    for engine in made.values():
        engine.start().result(120)
    yield made
    for engine in made.values():
        engine.stop(60)


def ids(engine: Engine, prompt: str) -> list[int]:
    return render(engine.tokenizer, prompt_messages("You are a helpful assistant.", prompt), None)


def result(future: Future[Completion]) -> Completion:
    return future.result(120)


def test_every_path_gives_the_same_greedy_tokens(engines: dict[str, Engine], caplog: pytest.LogCaptureFixture) -> None:
    """Scenario:
    1. each prompt alone, one after another (the single-sequence path): the reference;
    2. all three submitted at once (they start together in the batch): same tokens;
    3. a long generation alone, and a second request 0.2 s later: the first is handed to the
       batch mid-way (logged with how far it got) and both still match their reference;
    4. with the prompt cache, the same prompt twice: the second starts from the cache and matches.
    """
    engine = engines["plain"]
    alone = [result(engine.submit(ids(engine, p), 40)).tokens for p in PROMPTS]
    assert all(len(tokens) == 40 for tokens in alone)

    together = [engine.submit(ids(engine, p), 40) for p in PROMPTS]
    assert [result(f).tokens for f in together] == alone

    long_alone = result(engine.submit(ids(engine, PROMPTS[0]), LONG)).tokens
    with caplog.at_level(logging.DEBUG, logger="llm_server.engine"):
        first = engine.submit(ids(engine, PROMPTS[0]), LONG)
        time.sleep(0.2)
        second = engine.submit(ids(engine, PROMPTS[1]), 40)
        assert result(second).tokens == alone[1]
        assert result(first).tokens == long_alone
    handed = [r.getMessage() for r in caplog.records if "handed to the batch" in r.getMessage()]
    assert len(handed) == 1, handed
    done = int(handed[0].split("after ")[1].split()[0])
    assert 0 < done < LONG

    cached = engines["cached"]
    first_time = result(cached.submit(ids(cached, PROMPTS[2]), 40))
    second_time = result(cached.submit(ids(cached, PROMPTS[2]), 40))
    assert first_time.tokens == second_time.tokens == alone[2]
    assert first_time.cached_tokens == 0 and second_time.cached_tokens == len(ids(cached, PROMPTS[2])) - 1


def test_per_request_settings_share_the_batch_and_stream(engines: dict[str, Engine]) -> None:
    """Scenario:
    1. alone: ``on_token`` sees exactly the completion's tokens, in order, before it resolves;
    2. three requests at once in one batch, each with its own settings: a hot sampler
       (temperature 5) next to two greedy ones, one of which has a stop word: the greedy ones
       still match their reference (a sampler is per sequence), the hot one differs from it;
    3. the stop word (the text of a token the reference generates) ends its sequence right
       before that token, with finish reason "stop"; alone, the same happens.
    """
    engine = engines["plain"]
    reference = [result(engine.submit(ids(engine, p), 40)) for p in PROMPTS]
    seen: list[int] = []
    streamed = result(engine.submit(ids(engine, PROMPTS[0]), 40, on_token=seen.append))
    assert seen == streamed.tokens == reference[0].tokens

    stop_at = next(i for i in range(5, 40) if engine.tokenizer.decode([reference[2].tokens[i]]).strip())
    stop_word = engine.tokenizer.decode([reference[2].tokens[stop_at]])
    hot = SamplingSettings(temperature=5.0, top_p=1.0, min_p=0.0, min_tokens_to_keep=1)
    batch = [
        engine.submit(ids(engine, PROMPTS[0]), 40, hot),
        engine.submit(ids(engine, PROMPTS[1]), 40, GREEDY),
        engine.submit(ids(engine, PROMPTS[2]), 40, None, (stop_word,)),
    ]
    got = [result(f) for f in batch]
    assert got[0].tokens != reference[0].tokens
    assert got[1].tokens == reference[1].tokens
    first_stop = next(i for i, t in enumerate(reference[2].tokens) if engine.tokenizer.decode([t]) == stop_word)
    assert got[2].finish_reason == "stop" and got[2].tokens == reference[2].tokens[: first_stop + 1]
    alone = result(engine.submit(ids(engine, PROMPTS[2]), 40, None, (stop_word,)))
    assert alone.tokens == got[2].tokens and alone.finish_reason == "stop"


def test_cancellation_frees_the_sequence_on_every_path(
    engines: dict[str, Engine], caplog: pytest.LogCaptureFixture
) -> None:
    """Scenario:
    1. a long generation alone is cancelled: it stops early, and the next request runs alone
       (nothing was left in the batch);
    2. two long generations in the batch, one cancelled: the other still finishes in full;
    3. a long generation handed to the batch and then cancelled: the request that joined it
       finishes, and the next one runs alone again (the batch is empty).
    """
    engine = engines["plain"]
    with caplog.at_level(logging.DEBUG, logger="llm_server.engine"):
        lone = engine.submit(ids(engine, PROMPTS[0]), 100_000)
        time.sleep(0.2)
        engine.cancel(lone)
        assert_cancelled(lone)

        pair = [engine.submit(ids(engine, p), LONG) for p in PROMPTS[:2]]
        time.sleep(0.2)
        engine.cancel(pair[0])
        assert_cancelled(pair[0])
        assert result(pair[1]).completion_tokens == LONG

        handed = engine.submit(ids(engine, PROMPTS[0]), 100_000)
        time.sleep(0.2)
        joiner = engine.submit(ids(engine, PROMPTS[1]), 40)
        assert len(result(joiner).tokens) == 40
        engine.cancel(handed)
        assert_cancelled(handed)

        caplog.clear()
        assert len(result(engine.submit(ids(engine, PROMPTS[2]), 40)).tokens) == 40
    messages = [r.getMessage() for r in caplog.records]
    assert "sequence runs alone" in messages, messages  # the batch was left empty


def assert_cancelled(future: Future[Completion]) -> None:
    started = time.monotonic()
    while not future.done() and time.monotonic() - started < 30:
        time.sleep(0.01)
    assert future.done()
    assert future.cancelled() or isinstance(future.exception(), CancelledGeneration)


def test_death_of_the_mlx_thread_fails_everything_at_once(tiny_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Scenario:
    1. an engine whose MLX thread raises when a generation finishes (the test-only fault hook),
       outside any decode step;
    2. three requests in flight (one alone, two joining it): all fail with ``EngineDead`` naming
       the cause, none is left waiting;
    3. ``died`` resolves with the cause, and a later ``submit`` fails at once.
    """
    monkeypatch.setenv("LLM_SERVER_FAULT", "engine-death")
    engine = Engine(str(tiny_model), GREEDY, 8, 0)
    engine.start().result(120)
    prompts = [ids(engine, p) for p in PROMPTS]  # the tokenizer goes with the dead thread
    futures = [engine.submit(prompts[0], 400)]
    time.sleep(0.1)
    futures += [engine.submit(p, 30) for p in prompts[1:]]
    for future in futures:
        with pytest.raises(EngineDead, match="injected fault"):
            future.result(60)
    assert "injected fault" in str(engine.died.result(10))
    later = engine.submit(prompts[0], 5)
    assert later.done() and isinstance(later.exception(), EngineDead)
    engine.stop(10)


def test_idle_time_before_a_submit_is_no_stall(tiny_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Scenario:
    1. an engine idles 3 s after a first generation (``stalled_for`` 0 while idle);
    2. a request is submitted, and the idle thread takes a moment (1 s, the test-only
       ``slow-wake`` hook) to pick it up: ``stalled_for`` counts from the submit, never the
       idle time (before, it said 3 s and more: a lowered ``worker_stall_timeout_s`` killed
       a healthy worker);
    3. the request completes.
    """
    monkeypatch.setenv("LLM_SERVER_FAULT", "slow-wake")
    engine = Engine(str(tiny_model), GREEDY, 8, 0)
    engine.start().result(120)
    try:
        assert len(result(engine.submit(ids(engine, PROMPTS[0]), 10)).tokens) == 10
        time.sleep(3.0)
        assert engine.stalled_for() == 0.0
        future = engine.submit(ids(engine, PROMPTS[1]), 10)
        readings = []
        while not future.done():
            readings.append(engine.stalled_for())
            time.sleep(0.05)
        assert len(result(future).tokens) == 10
        assert readings and max(readings) < 2.5, readings
    finally:
        engine.stop(30)
