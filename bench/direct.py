"""mlx-lm's own limits, measured in a process of their own: the reference sides of ``compare.py``.

``python bench/direct.py MODEL --side stream|batch`` loads MODEL with ``mlx_lm.load`` and then
answers rounds sent as JSON lines on stdin (``{"prompts": [...], "max_tokens": N}``) with one
JSON line on stdout (seconds, per-request token counts and texts). Nothing but mlx-lm runs here:

- ``stream``: ``mlx_lm.stream_generate`` one request after another: the single-stream limit
  (``generate_step`` overlaps building step n+1 with evaluating step n, and detokenizes as it goes).
- ``batch``: one ``mlx_lm.generate.BatchGenerator`` with every request of the round inserted at
  once and ``completion_batch_size`` equal to their number: the batch limit.

Prompts are rendered exactly as the daemon renders them (the model's chat template with the same
system prompt), so every side sees the same token ids.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llm_server.common.protocol import prompt_messages  # noqa: E402
from llm_server.model_worker.chat import render  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("--side", choices=("stream", "batch"), required=True)
    parser.add_argument("--system-prompt", default="")
    args = parser.parse_args()

    import mlx.core as mx
    from mlx_lm import load, stream_generate
    from mlx_lm.generate import BatchGenerator
    from mlx_lm.sample_utils import make_sampler

    model, tokenizer = load(args.model)
    sampler = make_sampler(temp=0.0)
    eos = [[token] for token in sorted(tokenizer.eos_token_ids)]
    print(json.dumps({"ready": True, "device": str(mx.default_device())}), flush=True)

    def stream_round(prompts: list[list[int]], max_tokens: int) -> list[dict]:
        out = []
        for ids in prompts:
            text, tokens, times = "", 0, []
            started = time.perf_counter()
            for response in stream_generate(model, tokenizer, ids, max_tokens=max_tokens, sampler=sampler):
                times.append(time.perf_counter())
                text += response.text
                tokens = response.generation_tokens
            out.append({"prompt_tokens": len(ids), "completion_tokens": tokens, "text": text, **timing(started, times)})
        return out

    def batch_round(prompts: list[list[int]], max_tokens: int) -> list[dict]:
        generator = BatchGenerator(
            model, stop_tokens=eos, sampler=sampler, completion_batch_size=len(prompts), max_tokens=max_tokens
        )
        started = time.perf_counter()
        uids = generator.insert(prompts, max_tokens=[max_tokens] * len(prompts))
        tokens: dict[int, list[int]] = {uid: [] for uid in uids}
        times: dict[int, list[float]] = {uid: [] for uid in uids}
        left = len(uids)
        while left:
            for response in generator.next_generated():
                if response.finish_reason != "stop":
                    tokens[response.uid].append(response.token)
                    times[response.uid].append(time.perf_counter())
                if response.finish_reason is not None:
                    left -= 1
        generator.close()
        return [
            {"prompt_tokens": len(ids), "completion_tokens": len(tokens[uid]), "text": tokenizer.decode(tokens[uid]),
             **timing(started, times[uid])}
            for uid, ids in zip(uids, prompts)
        ]

    run_round = stream_round if args.side == "stream" else batch_round
    for line in sys.stdin:
        request = json.loads(line)
        prompts = [render(tokenizer, prompt_messages(args.system_prompt, p), None) for p in request["prompts"]]
        started = time.perf_counter()
        results = run_round(prompts, request["max_tokens"])
        seconds = time.perf_counter() - started
        print(json.dumps({"seconds": seconds, "results": results}), flush=True)


def timing(started: float, times: list[float]) -> dict:
    """Time to the first token (from the round's start) and the gaps between tokens."""
    return {"ttft": times[0] - started if times else None, "gaps": [b - a for a, b in zip(times, times[1:])]}


if __name__ == "__main__":
    main()
