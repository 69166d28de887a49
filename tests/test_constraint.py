"""The batch's grammar masks (``constraint.BatchMasks``) against mlx-lm's per-row logits processors.

``BatchMasks`` applies every constrained row's mask in the rows' shared sampler and reads
mlx-lm's private ``GenerationBatch`` fields for the tokens each row was fed. This runs a real
``BatchGenerator`` on the tiny model, greedily, with free and constrained rows joining a running
batch and leaving it, three ways: each constrained row through mlx-lm's own per-row
``logits_processors`` (the reference), through ``BatchMasks`` with one sampler for all rows (one
batched call per step), and with a sampler per row (mlx-lm then samples row by row). Every row's
tokens must be the same all three ways, so a misread token, a mask on the wrong row or a renamed
field in a new mlx-lm fails here; the constrained answers, ended by the grammar, must be valid.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import jsonschema

from llm_server.common import grammars
from llm_server.model_worker.constraint import BatchMasks, Grammars

SCHEMA = {
    "type": "object",
    "properties": {
        "ok": {"type": "boolean"},
        "color": {"enum": ["red", "green"]},
        "n": {"type": "integer", "minimum": 0, "maximum": 9},
    },
    "required": ["ok", "color", "n"],
    "additionalProperties": False,
}
ROWS = [  # (prompt, constrained, max_tokens, the step it joins at)
    ("one two three", True, 40, 0),
    ("four", False, 9, 0),
    ("five six", True, 40, 3),
    ("seven", False, 30, 3),
    ("eight nine ten", True, 40, 6),
]


def run(model: Any, tokenizer: Any, way: str) -> dict[int, list[int]]:
    import mlx.core as mx
    from mlx_lm.generate import BatchGenerator

    eos = frozenset(tokenizer.eos_token_ids)
    made = Grammars(tokenizer, eos)
    grammar = grammars.answer(SCHEMA)
    generator = BatchGenerator(model, stop_tokens=[[t] for t in eos], completion_batch_size=8, prefill_batch_size=2)
    active: dict[int, Any] = {}
    masks = BatchMasks(generator, active)

    def shared(logprobs: Any) -> Any:
        return mx.argmax(logprobs, axis=-1)

    rows: dict[int, int] = {}  # uid -> row
    tokens: dict[int, list[int]] = {row: [] for row in range(len(ROWS))}

    def insert(row: int) -> None:
        prompt, constrained, max_tokens, _ = ROWS[row]
        processor = made.processor(grammar) if constrained else None
        sampler = shared if way != "per-row sampler" else (lambda logprobs: mx.argmax(logprobs, axis=-1))
        if way == "mlx-lm processors":
            (uid,) = generator.insert([tokenizer.encode(prompt)], max_tokens=[max_tokens], samplers=[sampler],
                                      logits_processors=[[processor.enter()]] if processor else None)  # fmt: skip
        else:
            # as ``Batch.enter`` does: the processor for the row's first step, then the batch's masks
            (uid,) = generator.insert([tokenizer.encode(prompt)], max_tokens=[max_tokens],
                                      samplers=[masks.sampler(sampler)],
                                      logits_processors=[[processor.enter()]] if processor else None)  # fmt: skip
            active[uid] = SimpleNamespace(processor=processor)
        rows[uid] = row

    step, finished = 0, 0
    while finished < len(ROWS):
        for row, (_, _, _, joins) in enumerate(ROWS):
            if joins == step:
                insert(row)
        masks.begin()
        _, responses = generator.next()
        if way != "mlx-lm processors":
            masks.settle()
        for response in responses:
            if response.finish_reason != "stop":
                tokens[rows[response.uid]].append(response.token)
            if response.finish_reason is not None:
                finished += 1
                active.pop(response.uid, None)
        step += 1
        assert step < 200
    generator.close()
    mx.clear_cache()
    return tokens


def test_batch_masks_match_mlx_lms_per_row_processors(tiny_model: Path) -> None:
    from mlx_lm import load

    model, tokenizer = load(str(tiny_model))
    reference = run(model, tokenizer, "mlx-lm processors")
    for row, (_, constrained, _, _) in enumerate(ROWS):
        if constrained:
            jsonschema.validate(json.loads(tokenizer.decode(reference[row])), SCHEMA)
    assert run(model, tokenizer, "one sampler") == reference
    assert run(model, tokenizer, "per-row sampler") == reference
