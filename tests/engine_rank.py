"""One rank of the engine, for ``test_distributed``: run alone, or under ``mlx.launch``.

Every rank builds the same ``Engine``; rank 0 (or the lone process) drives it through each path
(alone, a batch, a hand-over from alone to the batch, a cancellation, per-request settings) and
writes the tokens it got as JSON; the other ranks only follow.

    python tests/engine_rank.py MODEL OUT.json [pipeline|tensor]
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llm_server.common.protocol import prompt_messages  # noqa: E402
from llm_server.model_worker.chat import render  # noqa: E402
from llm_server.model_worker.engine import Engine  # noqa: E402
from llm_server.model_worker.jobs import CancelledGeneration, SamplingSettings  # noqa: E402

GREEDY = SamplingSettings(temperature=0.0, top_p=1.0, min_p=0.0, min_tokens_to_keep=1)
PROMPTS = ["Tell me about the sea.", "Why?", "What is the capital of France?"]


def main() -> None:
    model, out = sys.argv[1], Path(sys.argv[2])
    sharding = sys.argv[3] if len(sys.argv) > 3 else None
    engine = Engine(model, GREEDY, 8, 0, sharding=sharding)
    engine.start().result(300)
    if engine.rank != 0:
        engine.stop()  # returns once rank 0 has shared its stop
        return

    def ids(prompt: str) -> list[int]:
        return render(engine.tokenizer, prompt_messages("You are a helpful assistant.", prompt), None)

    def tokens(future: object) -> list[int]:
        return future.result(300).tokens  # type: ignore[attr-defined]

    results: dict[str, object] = {"alone": [tokens(engine.submit(ids(p), 30)) for p in PROMPTS]}
    results["together"] = [tokens(f) for f in [engine.submit(ids(p), 30) for p in PROMPTS]]
    first = engine.submit(ids(PROMPTS[0]), 400)
    time.sleep(0.3)
    joiner = engine.submit(ids(PROMPTS[1]), 30)
    results["handed_over"] = [tokens(first), tokens(joiner)]
    doomed = engine.submit(ids(PROMPTS[2]), 100_000)
    time.sleep(0.3)
    engine.cancel(doomed)
    try:
        doomed.result(300)
        results["cancelled"] = False
    except (CancelledGeneration, Exception):  # noqa: BLE001 - cancelled, as asked
        results["cancelled"] = True
    results["after_cancel"] = tokens(engine.submit(ids(PROMPTS[1]), 30))
    stop_word = engine.tokenizer.decode([results["alone"][2][10]])  # type: ignore[index]
    stopped = engine.submit(ids(PROMPTS[2]), 30, None, (stop_word,)).result(300)
    results["stopped"] = [stopped.tokens, stopped.finish_reason]
    hot = SamplingSettings(temperature=1.5, top_p=1.0, min_p=0.0, min_tokens_to_keep=1)
    # Sampled hot, the never-stopping model may still draw its end-of-turn token: answered means
    # finished either way (the random stream differs between one process and a group).
    hot_done = engine.submit(ids(PROMPTS[0]), 30, hot).result(300)
    results["hot_is_answered"] = hot_done.finish_reason in ("stop", "length") and len(hot_done.tokens) <= 30
    engine.stop()
    out.write_text(json.dumps(results))


if __name__ == "__main__":
    main()
    # Leave as a spawned worker does (multiprocessing ends its children with os._exit): MLX's
    # own threads make a normal interpreter exit after the model is freed abort (SIGABRT).
    sys.stdout.flush()
    os._exit(0)
