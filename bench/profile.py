"""Where the daemon's time goes under load: py-spy on the model worker and the HTTP process.

Run by hand: ``bash bench/run.sh --profile [--shape fast] [--clients 1] [--seconds 15]``. It starts
the real daemon on one of ``compare.py``'s model shapes, keeps ``--clients`` clients busy with
back-to-back requests, records both children with ``py-spy record --threads`` at 200 Hz, and
prints, per process, the share of samples per thread (samples of threads blocked on a queue,
pipe or socket counted apart: py-spy reports C-level waits as activity) and, for the MLX thread,
the share per innermost frame (which tells time waiting in MLX's ``eval`` from Python work per
token). The raw profiles (py-spy's ``raw`` format, one stack per line) are kept in ``--out``.
"""

from __future__ import annotations

import argparse
import collections
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH), str(BENCH.parent / "tests"), str(BENCH.parent)]

from compare import DEFAULT_TOKENS, SHAPES, SYSTEM_PROMPT, build_model  # noqa: E402
from daemon import base_config, cmdline, free_port, serving  # noqa: E402
from structured import SCHEMA, large_vocab_model  # noqa: E402

ROOT = BENCH.parent


# Innermost frames of a thread blocked in a C call: py-spy cannot tell those from work.
WAITS = ("concurrent/futures/thread.py", "Connection._recv", "Condition.wait", "selectors.py", "runners.py")


def summarize(raw: Path, top: int = 8) -> str:
    """Share of samples per thread (blocked ones apart), and per innermost frame on the MLX thread."""
    threads: collections.Counter[str] = collections.Counter()
    mlx_leaves: collections.Counter[str] = collections.Counter()
    blocked = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        if any(wait in frames[-1] for wait in WAITS):
            blocked += int(count)
            continue
        threads[frames[0]] += int(count)
        if "mlx" in frames[0]:
            mlx_leaves[frames[-1]] += int(count)
    total, on_mlx = (sum(threads.values()) + blocked) or 1, sum(mlx_leaves.values()) or 1
    lines = [f"{raw.name}: {total} samples, {blocked / total:.1%} in threads blocked on a queue, pipe or socket"]
    lines += [f"  {n / total:6.1%}  {name}" for name, n in threads.most_common(top)]
    if mlx_leaves:
        lines.append("  MLX thread, innermost frames:")
        lines += [f"  {n / on_mlx:6.1%}  {frame}" for frame, n in mlx_leaves.most_common(top)]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="fast", choices=sorted(SHAPES))
    parser.add_argument("--clients", type=int, default=1)
    parser.add_argument("--seconds", type=int, default=15)
    parser.add_argument("--max-tokens", type=int)
    parser.add_argument("--structured", action="store_true", help="every request with structured.py's format")
    parser.add_argument("--vocab", type=int, help="structured.py's model with a BPE of this size")
    parser.add_argument("--cache", type=Path, default=ROOT / ".test-deps" / "bench")
    parser.add_argument("--out", type=Path, default=ROOT / ".test-deps" / "profiles")
    args = parser.parse_args()
    model = large_vocab_model(args.cache, args.vocab) if args.vocab else build_model(args.cache, args.shape)
    fields = {"format": SCHEMA} if args.structured else {}
    tokens = args.max_tokens or DEFAULT_TOKENS[args.shape]
    args.out.mkdir(parents=True, exist_ok=True)
    config = base_config(
        model, free_port(), max_tokens=tokens, max_batch_size=max(args.clients, 8), log_level="info",
        system_prompt=SYSTEM_PROMPT,
    )  # fmt: skip
    with tempfile.TemporaryDirectory() as work, serving(Path(work) / "d", config, timeout=600) as daemon:
        daemon.ask("warm up", timeout=600)
        children = {cmdline(pid).split(": ")[-1]: pid for pid in daemon.descendants() if "llm-server:" in cmdline(pid)}
        until = time.monotonic() + args.seconds + 3
        answered = [0]

        def client(c: int) -> None:
            k = 0
            while time.monotonic() < until:
                body = {"prompt": f"Request {c}-{k}: write a story", **fields}
                assert daemon.post_json(body, timeout=600).status == 200
                k += 1
                answered[0] += 1

        threads = [threading.Thread(target=client, args=(c,)) for c in range(args.clients)]
        for t in threads:
            t.start()
        time.sleep(1)
        kind = f"{args.shape}{'-structured' if args.structured else ''}{f'-v{args.vocab}' if args.vocab else ''}"
        raws = {role: args.out / f"{kind}-{args.clients}c-{role}.txt" for role in ("model-worker", "http")}
        spies = [
            subprocess.Popen(
                [
                    str(Path(sys.executable).with_name("py-spy")),
                    "record",
                    "-d",
                    str(args.seconds),
                    "-r",
                    "200",
                    "--threads",
                    "-f",
                    "raw",
                    "-o",
                    str(raw),
                    "--pid",
                    str(children[role]),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )  # fmt: skip
            for role, raw in raws.items()
        ]
        for spy in spies:
            spy.wait()
        for t in threads:
            t.join()
    print(f"{args.shape}, {tokens} tokens per answer, {args.clients} client(s), {answered[0]} requests answered")
    for raw in raws.values():
        print(summarize(raw))


if __name__ == "__main__":
    main()
