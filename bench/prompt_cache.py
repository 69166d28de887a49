"""What the prompt cache saves: latency of requests that share a long system prompt.

Run by hand (``bash bench/run.sh`` runs the throughput bench; this one is
``bash bench/run.sh --prompt-cache`` or ``.venv/bin/python bench/prompt_cache.py`` with the same
environment). In one run on one machine it starts the daemon twice on the same random-weight
Qwen2.5-0.5B-body model as ``throughput.py``: with ``prompt_cache_mb: 0`` and with the default
cache. Each gets the same requests one after another: a long system prompt (standing in for
tool schemas) and a different short question each time, 8 tokens of answer. The first request
is cold on both sides; the others can reuse the system prompt's KV cache. Reports, asserts
nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH), str(BENCH.parent / "tests"), str(BENCH.parent)]

from daemon import base_config, free_port, serving  # noqa: E402
from throughput import ROOT, build_model  # noqa: E402

QUESTIONS = [f"Question {n}: what is rule {n * 7} about?" for n in range(1, 100)]


def system_prompt(rules: int) -> str:
    return "You follow these rules.\n" + "".join(
        f"Rule {n}: answer questions about topic {n} briefly.\n" for n in range(rules)
    )


def run(model: Path, name: str, cache_mb: int, requests: int, rules: int, work: Path) -> dict:
    config = base_config(
        model, free_port(), max_tokens=8, system_prompt=system_prompt(rules), prompt_cache_mb=cache_mb, log_level="info"
    )
    with serving(work / name, config, timeout=600) as daemon:
        latencies, cached, prompt_tokens = [], [], 0
        for question in QUESTIONS[:requests]:
            started = time.monotonic()
            result = daemon.ask(question, timeout=3600)
            latencies.append(round(time.monotonic() - started, 2))
            assert result.status == 200, result.body
            line = re.search(
                r" response 200 .* prompt_tokens=(\d+) .* cached_tokens=(\d+)",
                daemon.response_line(result.headers["x-request-id"]),
            )
            assert line is not None
            prompt_tokens = int(line.group(1))
            cached.append(int(line.group(2)))
        warm = statistics.mean(latencies[1:])
        print(f"  {name}: prompt {prompt_tokens} tokens; latency first {latencies[0]:.2f} s, then mean {warm:.2f} s; "
              f"cached tokens per request {cached}", flush=True)  # fmt: skip
        return {"latencies_s": latencies, "cached_tokens": cached, "prompt_tokens": prompt_tokens, "warm_mean_s": warm}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--requests", type=int, default=4)
    parser.add_argument("--rules", type=int, default=60, help="lines of system prompt (about 12 tokens each)")
    parser.add_argument("--cache", type=Path, default=ROOT / ".test-deps" / "bench")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    model = build_model(args.cache, args.layers)
    blas = os.environ.get(
        "LLM_SERVER_BENCH_BLAS", "openblas (preloaded)" if os.environ.get("LD_PRELOAD") else "builtin"
    )
    print(f"model {model.name}, BLAS: {blas}", flush=True)
    report: dict = {"model": str(model), "blas": blas, "requests": args.requests, "rules": args.rules}
    with tempfile.TemporaryDirectory() as work:
        for name, cache_mb in (("no cache", 0), ("cache", 1024)):
            report[name] = run(model, name, cache_mb, args.requests, args.rules, Path(work))
    ratio = report["no cache"]["warm_mean_s"] / report["cache"]["warm_mean_s"]
    report["speedup_after_first"] = round(ratio, 2)
    print(f"\nlatency after the first request, no cache / cache, measured side by side: {ratio:.2f}x")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
