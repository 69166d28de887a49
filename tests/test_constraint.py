"""The batch's fed tokens (``batch.FedTokens``) against what mlx-lm hands each logits processor.

``FedTokens`` reads mlx-lm's private ``GenerationBatch`` fields to save each constrained row an
``eval`` per step; this checks, on a real ``BatchGenerator`` with rows joining and leaving, that
every read agrees with the token the processor's own context ends with, and that the fast read
is really taken (so a renamed field in a new mlx-lm fails here, not silently slower).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llm_server.model_worker.batch import FedTokens


def test_fed_tokens_match_each_rows_context(tiny_model: Path) -> None:
    import mlx.core as mx
    from mlx_lm import load
    from mlx_lm.generate import BatchGenerator

    model, tokenizer = load(str(tiny_model))
    generator = BatchGenerator(model, stop_tokens=[], completion_batch_size=4, prefill_batch_size=2)
    fed = FedTokens(generator)
    seen: list[tuple[int, int | None, int]] = []  # (the row's call number, read, context's last)

    def recorder(holder: dict[str, int]) -> Any:
        calls = iter(range(10**6))

        def processor(tokens: Any, logits: Any) -> Any:
            seen.append((next(calls), fed.token(holder["uid"], logits), int(tokens[-1].item())))
            return logits

        return processor

    def insert(prompt: str, max_tokens: int) -> None:
        holder: dict[str, int] = {}
        (holder["uid"],) = generator.insert(
            [tokenizer.encode(prompt)], max_tokens=[max_tokens], logits_processors=[[recorder(holder)]]
        )

    insert("one two three", 12)
    insert("four", 5)
    steps = 0
    while steps < 40:
        fed.begin()
        _, responses = generator.next()
        steps += 1
        if steps == 3:
            insert("five six", 8)  # joins a running batch
        if not responses and not generator._generation_batch.uids and steps > 3:
            break
    generator.close()
    later = [(read, context) for call, read, context in seen if call > 0]  # the first brings no new token
    assert len(later) > 20
    assert all(read == context for read, context in later), seen
    mx.clear_cache()
