"""Throughput, latency and memory of the real daemon under concurrent load.

Run by hand (``bash bench/run.sh``, which preloads OpenBLAS on Linux); it reports, it asserts
nothing. It builds
a random-weight model with the body of Qwen2.5-0.5B (24 layers, hidden 896, MLP 4864, 14 heads,
2 KV heads) and the test tokenizer's small vocabulary (no hub here; the real model's 151,936-row
embedding is left out, so absolute speeds are somewhat higher than the real model's), makes its
end-of-turn token unreachable so every answer is exactly ``--max-tokens`` long, and then, in one
run on one machine, starts the daemon twice: once with ``max_batch_size`` 1 (one generation at a
time) and once with the default batching. Each is driven through real HTTP by 1, 4 and 8
concurrent clients. Token counts come from the daemon's own log lines, memory from /proc.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "bench"), str(ROOT / "tests"), str(ROOT)]

from compare import build_model as build_shape  # noqa: E402
from daemon import Daemon, base_config, cmdline, free_port, serving  # noqa: E402

PROMPT = "Write a short story about a lighthouse keeper number {n}."


@dataclass
class Level:
    """One concurrency level against one daemon."""

    daemon: str
    concurrency: int
    requests: int
    seconds: float
    completion_tokens: int
    tokens_per_s: float
    requests_per_s: float
    latency_p50_s: float
    latency_max_s: float


def build_model(cache: Path, layers: int) -> Path:
    """The Qwen2.5-0.5B body (``compare.py``'s ``qwen0.5b`` shape) with ``layers`` layers."""
    return build_shape(cache, "qwen0.5b", layers)


def worker_memory_mib(daemon: Daemon) -> dict[str, float]:
    """RSS now and at its peak (VmHWM) of the model worker, from /proc."""
    for pid in daemon.descendants():
        if "model-worker" in cmdline(pid):
            status = Path(f"/proc/{pid}/status").read_text()
            fields = dict(re.findall(r"^(VmRSS|VmHWM):\s+(\d+) kB", status, re.M))
            return {key: int(value) / 1024 for key, value in fields.items()}
    return {}


def drive(daemon: Daemon, name: str, concurrency: int, per_client: int) -> Level:
    """`concurrency` clients, each sending `per_client` requests back to back."""
    latencies: list[float] = []
    ids: list[str] = []
    errors: list[str] = []
    lock = threading.Lock()

    def client(c: int) -> None:
        for k in range(per_client):
            started = time.monotonic()
            result = daemon.ask(PROMPT.format(n=c * 1000 + k), timeout=3600)
            with lock:
                if result.status != 200:
                    errors.append(result.body.decode(errors="replace"))
                latencies.append(time.monotonic() - started)
                ids.append(result.headers.get("x-request-id", ""))

    threads = [threading.Thread(target=client, args=(c,)) for c in range(concurrency)]
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.monotonic() - started
    if errors:
        raise SystemExit(f"{len(errors)} request(s) failed: {errors[:3]}")
    tokens = completion_tokens(daemon, ids)
    return Level(
        name, concurrency, len(ids), round(seconds, 2), tokens, round(tokens / seconds, 1),
        round(len(ids) / seconds, 3), round(statistics.median(latencies), 2), round(max(latencies), 2),
    )  # fmt: skip


def completion_tokens(daemon: Daemon, ids: list[str]) -> int:
    """Sum of the tokens the daemon logged for these requests."""
    return sum(int(re.search(r"completion_tokens=(\d+)", daemon.response_line(i)).group(1)) for i in ids)


def run(model: Path, name: str, batch: int, levels: list[int], per_client: int, max_tokens: int, work: Path) -> dict:
    config = base_config(model, free_port(), max_tokens=max_tokens, max_batch_size=batch, log_level="info")
    with serving(work / name, config, timeout=600) as daemon:
        daemon.ask("warm up", timeout=600)
        idle = worker_memory_mib(daemon)
        results = []
        for concurrency in levels:
            level = drive(daemon, name, concurrency, per_client)
            results.append(level)
            print(
                f"  c={level.concurrency}: {level.tokens_per_s:7.1f} tok/s, {level.requests_per_s:6.3f} req/s, "
                f"latency p50 {level.latency_p50_s:6.2f} s, max {level.latency_max_s:6.2f} s",
                flush=True,
            )
        return {
            "levels": [asdict(r) for r in results],
            "memory_mib": {"idle": idle, "after": worker_memory_mib(daemon)},
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=24, help="transformer layers (24 = Qwen2.5-0.5B)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--per-client", type=int, default=2, help="requests each client sends")
    parser.add_argument("--levels", default="1,4,8", help="client counts")
    parser.add_argument("--cache", type=Path, default=ROOT / ".test-deps" / "bench")
    parser.add_argument("--json", type=Path, help="also write the report here")
    args = parser.parse_args()
    levels = [int(n) for n in args.levels.split(",")]
    model = build_model(args.cache, args.layers)
    blas = os.environ.get(
        "LLM_SERVER_BENCH_BLAS", "openblas (preloaded)" if os.environ.get("LD_PRELOAD") else "builtin"
    )
    print(f"model {model.name}, max_tokens {args.max_tokens}, BLAS: {blas}", flush=True)
    report: dict = {"model": str(model), "max_tokens": args.max_tokens, "per_client": args.per_client, "blas": blas}
    with tempfile.TemporaryDirectory() as work:
        for name, batch in (("unbatched", 1), ("batched", 8)):
            print(f"{name} (max_batch_size={batch}):", flush=True)
            report[name] = run(model, name, batch, levels, args.per_client, args.max_tokens, Path(work))
    print("\nbatched / unbatched throughput, measured side by side in this run:")
    for one, other in zip(report["batched"]["levels"], report["unbatched"]["levels"]):
        ratio = one["tokens_per_s"] / other["tokens_per_s"]
        report.setdefault("ratios", {})[str(one["concurrency"])] = round(ratio, 2)
        print(f"  c={one['concurrency']}: {ratio:.2f}x")
    for name in ("unbatched", "batched"):
        memory = report[name]["memory_mib"]
        print(f"{name} worker memory: {json.dumps(memory)}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
