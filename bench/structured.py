"""What a grammar costs: constrained answers against free ones, on the same daemon build, side by side.

Run by hand: ``bash bench/run.sh --structured [--levels 1,32] [--reps 3] [--vocab 150000]``. It
reports and asserts nothing. Two real daemons on the same model folder, both with
``max_batch_size`` = the largest level: ``free`` answers ``POST /`` as it is, ``structured`` gets
every request with ``format`` set to ``SCHEMA`` (llguidance computes a token mask per sequence per
step, inside the batch). Rounds, warm-up, rotation and the token-count check are
``compare.py``'s. ``SCHEMA`` asks for at least ``ITEMS`` objects, more than ``max_tokens`` can
hold, so the grammar never lets an answer end early and both sides generate exactly the same
number of tokens per answer.

The mask's cost grows with the vocabulary, so ``--vocab`` builds the fast shape with a byte-level
BPE of that size, trained on the Python sources of this environment's site-packages (the test
tokenizer's 488 tokens hide the cost; real models have 150k).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import site
import sys
import tempfile
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH), str(BENCH.parent / "tests"), str(BENCH.parent)]

from compare import SHAPES, DaemonSide, Round, build_model, machine, print_level, summarize  # noqa: E402
from tinymodel import never_stop, write_tiny_model  # noqa: E402

ROOT = BENCH.parent
ITEMS = 100
SCHEMA = {
    "type": "array",
    "minItems": ITEMS,
    "items": {
        "type": "object",
        "properties": {
            "color": {"enum": ["red", "green", "blue"]},
            "ok": {"type": "boolean"},
            "n": {"type": "integer", "minimum": 1, "maximum": 999},
            "name": {"type": "string", "maxLength": 12},
        },
        "required": ["color", "ok", "n", "name"],
        "additionalProperties": False,
    },
}
FREE, STRUCTURED = "free", "structured"


def large_vocab_model(cache: Path, vocab: int, corpus_mb: int = 120) -> Path:
    """The fast shape with a BPE of ``vocab`` tokens, built once into ``cache``."""
    folder = cache / f"structured-fast-v{vocab}"
    if not (folder / "model.safetensors").exists():
        print(f"training a {vocab}-token BPE and building {folder} ...", flush=True)
        texts, size = [], 0
        for path in sorted(p for folder in site.getsitepackages() for p in Path(folder).rglob("*.py")):
            text = path.read_text(errors="replace")
            texts.append(text)
            size += len(text)
            if size > corpus_mb * 2**20:
                break
        write_tiny_model(folder, seed=0, extra_corpus=texts, vocab_size=vocab, max_position_embeddings=32768,
                         **SHAPES["fast"])  # fmt: skip
        never_stop(folder)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--levels", default="1,32", help="concurrency levels")
    parser.add_argument("--reps", type=int, default=3, help="timed rounds per side and level")
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--vocab", type=int, help="train a BPE of this size for the model (default: the test's)")
    parser.add_argument("--cache", type=Path, default=ROOT / ".test-deps" / "bench")
    parser.add_argument("--out", type=Path, help="report path without suffix (default: bench/results/DATE-...)")
    args = parser.parse_args()
    levels = [int(n) for n in args.levels.split(",")]
    model = large_vocab_model(args.cache, args.vocab) if args.vocab else build_model(args.cache, "fast")
    vocab = json.loads((model / "config.json").read_text())["vocab_size"]
    print(f"fast shape, vocabulary {vocab}, {args.max_tokens} tokens per answer, levels {levels}", flush=True)
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as work:
        sides = [
            DaemonSide(model, args.max_tokens, max(levels), Path(work) / FREE, name=FREE),
            DaemonSide(model, args.max_tokens, max(levels), Path(work) / STRUCTURED, name=STRUCTURED,
                       fields={"format": SCHEMA}),
        ]  # fmt: skip
        counter = iter(range(10**9))
        try:
            for level in levels:
                rounds: dict[str, list[Round]] = {s.name: [] for s in sides}

                def prompts() -> list[str]:
                    return [f"Request {next(counter)}: list some things as JSON." for _ in range(level)]

                for side in sides:
                    side.round(prompts(), args.max_tokens)
                for rep in range(args.reps):
                    batch = prompts()
                    for side in sides[rep % 2 :] + sides[: rep % 2]:
                        rounds[side.name].append(side.round(batch, args.max_tokens))
                results[str(level)] = {name: summarize(rs, args.max_tokens) for name, rs in rounds.items()}
                print_level(level, results[str(level)])
        finally:
            for side in sides:
                side.close()
    report = {
        "date": datetime.date.today().isoformat(), "machine": machine(), "vocab_size": vocab,
        "max_tokens": args.max_tokens, "reps": args.reps, "schema": SCHEMA, "levels": results,
    }  # fmt: skip
    lines = [
        f"# Structured vs free, {report['date']}, {report['machine']}",
        f"fast shape, vocabulary {vocab}, {args.max_tokens} tokens per answer, median of {args.reps} (min–max)",
        "",
        "| clients | free tok/s | structured tok/s | structured / free |",
        "|---|---|---|---|",
    ]
    for level, sides_ in results.items():
        free, structured = sides_[FREE], sides_[STRUCTURED]
        ratio = structured["tokens_per_s"] / free["tokens_per_s"]
        lines.append(
            f"| {level} | {free['tokens_per_s']} ({free['min']}–{free['max']}) | {structured['tokens_per_s']} "
            f"({structured['min']}–{structured['max']}) | {ratio:.2f}× |"
        )
    out = args.out or ROOT / "bench" / "results" / (
        f"{report['date']}-{platform.system().lower()}-{platform.machine()}-structured-v{vocab}"
    )
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
