"""The engine as a two-rank MLX group over loopback against one process, for scale.

    bash bench/run.sh --distributed [--shape fast] [--tokens 200] [--reps 3]

Runs this file alone (one process), then under ``mlx.launch --backend ring -n 2 --hosts
127.0.0.1`` in pipeline and in tensor mode, on the same random-weight model (bench/compare's
shapes, with the weight index ``sharded_load`` reads). Each run times, after a warm-up, one
sequence alone and eight at once, ``--reps`` times, and reports generated tokens per second
(median, min–max). On one machine the ranks share its cores and talk over loopback, so this
measures the cost of the group, not the gain of a second Mac's memory and compute.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tests"))

PROMPT = [1, 2, 3, 4, 5, 6, 7, 8] * 4


def rank_main(model: str, sharding: str | None, tokens: int, reps: int, out: str) -> None:
    from llm_server.model_worker.engine import Engine
    from llm_server.model_worker.jobs import SamplingSettings

    engine = Engine(model, SamplingSettings(0.0, 1.0, 0.0, 1), 8, 0, sharding=sharding)
    engine.start().result(600)
    if engine.rank != 0:
        engine.stop()
        return

    def timed(n: int) -> float:
        started = time.perf_counter()
        futures = [engine.submit(PROMPT + [i], tokens) for i in range(n)]
        done = sum(f.result(600).completion_tokens for f in futures)
        return done / (time.perf_counter() - started)

    timed(1), timed(8)  # warm-up
    results = {str(n): [timed(n) for _ in range(reps)] for n in (1, 8)}
    engine.stop()
    Path(out).write_text(json.dumps(results))


def with_index(model: Path) -> Path:
    import mlx.core as mx

    folder = model.parent / f"{model.name}-sharded"
    if not (folder / "model.safetensors.index.json").exists():
        shutil.rmtree(folder, ignore_errors=True)
        shutil.copytree(model, folder)
        names = mx.load(str(folder / "model.safetensors")).keys()
        index = {"metadata": {}, "weight_map": {name: "model.safetensors" for name in names}}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="fast")
    parser.add_argument("--tokens", type=int, default=200)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--cache", type=Path, default=ROOT / ".test-deps" / "bench")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()
    from compare import build_model, machine

    model = with_index(build_model(args.cache, args.shape))
    runs: dict[str, dict[str, list[float]]] = {}
    for name, sharding in (("one process", None), ("2 ranks, pipeline", "pipeline"), ("2 ranks, tensor", "tensor")):
        out = args.cache / "distributed.json"
        out.unlink(missing_ok=True)
        program = [
            sys.executable,
            __file__,
            "--rank",
            str(model),
            sharding or "-",
            str(args.tokens),
            str(args.reps),
            str(out),
        ]
        if sharding is not None:
            program = [str(Path(sys.executable).parent / "mlx.launch"), "--backend", "ring", "-n", "2",
                       "--hosts", "127.0.0.1", "--", *program]  # fmt: skip
        subprocess.run(program, check=True, timeout=1800)
        runs[name] = json.loads(out.read_text())
        print(name, {n: round(statistics.median(v), 1) for n, v in runs[name].items()}, flush=True)
    lines = [
        f"# Engine as a 2-rank MLX group over loopback vs one process ({args.shape} shape, {args.tokens} tokens)",
        "",
        f"Machine: {machine()}; BLAS: {os.environ.get('LLM_SERVER_BENCH_BLAS', '?')}; reps: {args.reps} after a warm-up.",
        "",
        "| run | 1 sequence, tok/s (median, min–max) | 8 at once, tok/s (median, min–max) |",
        "|---|---|---|",
    ]
    for name, result in runs.items():
        cells = [f"{statistics.median(v):.1f} ({min(v):.1f}–{max(v):.1f})" for v in (result["1"], result["8"])]
        lines.append(f"| {name} | {cells[0]} | {cells[1]} |")
    report = "\n".join(lines) + "\n"
    stamp = time.strftime("%Y-%m-%d")
    (args.out / f"{stamp}-distributed-loopback.md").write_text(report)
    (args.out / f"{stamp}-distributed-loopback.json").write_text(json.dumps(runs, indent=2))
    print(report)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--rank":
        model, sharding, tokens, reps, out = sys.argv[2:7]
        rank_main(model, None if sharding == "-" else sharding, int(tokens), int(reps), out)
        sys.stdout.flush()
        os._exit(0)  # as engine ranks leave (see llm_server.model_worker.rank)
    main()
