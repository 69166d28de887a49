"""Three grammar libraries for structured output, side by side: llguidance (the one llm-server
uses), xgrammar and outlines-core.

Run by hand: ``python bench/grammar_libraries.py [--vocab-model DIR ...]`` with the libraries
importable (llguidance is a dependency; the others are not: ``pip install --target DIR
outlines_core xgrammar`` and ``PYTHONPATH=DIR``; xgrammar imports torch). It reports and
asserts nothing. A library that does not import is reported as such.

For each vocabulary (a model folder's ``tokenizer.json``: the test tokenizer's 488 tokens and
``bench/structured.py --vocab 150000``'s BPE):

- compile time of the bench schema (``structured.SCHEMA``'s item: an enum, a boolean, a bounded
  integer, a bounded string) in an array of 3 to 5;
- the mask per token: a valid instance is tokenized, then for each of its tokens the library's
  mask of allowed tokens is computed into a bitmask and the token consumed; median, p90 and max
  of the mask computation alone;
- schema coverage: whether each JSON Schema feature compiles, is refused, or (where the library
  says nothing, checked by whether a value that breaks the feature is still accepted) is
  silently ignored.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Protocol

BENCH = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH), str(BENCH.parent / "tests"), str(BENCH.parent)]

from structured import SCHEMA  # noqa: E402

ITEM = SCHEMA["items"]
BENCH_SCHEMA = {"type": "array", "items": ITEM, "minItems": 3, "maxItems": 5}
# The same without the string's maxLength: a bounded string is llguidance's slow case.
FREE_STRING = {**BENCH_SCHEMA, "items": {**ITEM, "properties": {**ITEM["properties"], "name": {"type": "string"}}}}
INSTANCE = [{"color": c, "ok": i % 2 == 0, "n": 17 * i + 1, "name": f"thing {i}"} for i, c in
            enumerate(["red", "green", "blue", "red"])]  # fmt: skip

# A feature, a schema using it, a value that breaks only that feature (None: nothing to break).
FEATURES: dict[str, tuple[dict[str, Any], Any]] = {
    "enum": ({"enum": ["a", "b"]}, "c"),
    "const": ({"const": "a"}, "b"),
    "minimum/maximum": ({"type": "integer", "minimum": 1, "maximum": 9}, 10),
    "exclusiveMinimum": ({"type": "number", "exclusiveMinimum": 0}, 0),
    "multipleOf": ({"type": "integer", "multipleOf": 5}, 7),
    "minLength/maxLength": ({"type": "string", "minLength": 2, "maxLength": 3}, "abcd"),
    "pattern": ({"type": "string", "pattern": "^[a-z]+[0-9]$"}, "abc"),
    "format: date-time": ({"type": "string", "format": "date-time"}, "yesterday"),
    "format: email": ({"type": "string", "format": "email"}, "nobody"),
    "minItems/maxItems": ({"type": "array", "items": {"type": "integer"}, "minItems": 1, "maxItems": 2}, [1, 2, 3]),
    "uniqueItems": ({"type": "array", "items": {"type": "integer"}, "uniqueItems": True}, [1, 1]),
    "prefixItems": ({"type": "array", "prefixItems": [{"type": "integer"}, {"type": "string"}], "items": False},
                    ["x", 1]),
    "required + additionalProperties: false": (
        {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"], "additionalProperties": False},
        {"a": 1, "b": 2},
    ),
    "optional properties": ({"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "string"}},
                             "additionalProperties": False}, {"b": 1}),
    "anyOf": ({"anyOf": [{"type": "integer"}, {"type": "string"}]}, True),
    "oneOf": ({"oneOf": [{"type": "integer"}, {"type": "boolean"}]}, "s"),
    "allOf": ({"allOf": [{"type": "integer"}, {"minimum": 3}]}, 2),
    "$ref/$defs (recursive)": (
        {"$defs": {"node": {"type": "object", "properties": {"next": {"anyOf": [{"$ref": "#/$defs/node"},
                                                                                {"type": "null"}]}},
                            "required": ["next"], "additionalProperties": False}},
         "$ref": "#/$defs/node"},
        {"next": 1},
    ),
    "not": ({"not": {"type": "integer"}}, 1),
    "if/then/else": ({"if": {"type": "integer"}, "then": {"minimum": 3}, "else": {"type": "string"}}, 1),
    "patternProperties": ({"type": "object", "patternProperties": {"^x": {"type": "integer"}},
                           "additionalProperties": False}, {"xa": "s"}),
}


class Library(Protocol):
    """One library behind the same calls."""

    name: str
    batch_api: str
    backends: str

    def compile(self, schema: dict[str, Any]) -> Any: ...

    def masks(self, compiled: Any, tokens: list[int]) -> list[float]:
        """Seconds per mask computation, following ``tokens``; raises if a token is refused."""
        ...

    def accepts(self, compiled: Any, tokens: list[int]) -> bool: ...


class LLGuidance:
    name = "llguidance"
    batch_api = "fill_next_token_bitmask_par(executor, [(matcher, row)...]): Rust threads, GIL released"
    backends = "numpy, torch (CPU/CUDA), mlx (a Metal kernel), any buffer (unsafe_compute_mask_ptr)"

    def __init__(self, tokenizer: Any, vocab_size: int, eos: int) -> None:
        import llguidance
        import llguidance.hf
        import llguidance.numpy

        self.ll, self.lnp = llguidance, llguidance.numpy
        self.vocabulary = llguidance.hf.from_tokenizer(tokenizer, eos_token=eos, n_vocab=vocab_size)
        self.vocab_size = vocab_size

    def compile(self, schema: dict[str, Any]) -> Any:
        grammar = self.ll.LLMatcher.grammar_from_json_schema(schema)
        error = self.ll.LLMatcher.validate_grammar(grammar, self.vocabulary)
        if error:
            raise ValueError(error)
        return grammar

    def _matcher(self, grammar: Any) -> Any:
        matcher = self.ll.LLMatcher(self.vocabulary, grammar, log_level=0)
        if matcher.is_error():
            raise ValueError(matcher.get_error())
        return matcher

    def masks(self, grammar: Any, tokens: list[int]) -> list[float]:
        matcher, times = self._matcher(grammar), []
        bitmask = self.lnp.allocate_token_bitmask(1, self.vocab_size)
        for token in tokens:
            started = time.perf_counter()
            self.lnp.fill_next_token_bitmask(matcher, bitmask)
            times.append(time.perf_counter() - started)
            if not matcher.consume_token(token):
                raise ValueError(f"token {token} refused: {matcher.get_error()}")
        return times

    def accepts(self, grammar: Any, tokens: list[int]) -> bool:
        matcher = self._matcher(grammar)
        return all(matcher.consume_token(t) for t in tokens) and matcher.is_accepting()


class Outlines:
    name = "outlines-core"
    batch_api = "none: one Guide per sequence, its mask written with write_mask_into(ptr, ...)"
    backends = "any contiguous int32 buffer by pointer (numpy, torch, mlx)"

    def __init__(self, tokenizer: Any, vocab_size: int, eos: int) -> None:
        import numpy as np
        import outlines_core

        self.oc, self.np = outlines_core, np
        decoder = _byte_decoder()
        tokens: dict[bytes, list[int]] = {}
        special = {t.content for t in tokenizer.added_tokens_decoder.values()}
        for text, token in tokenizer.get_vocab().items():
            if token != eos and text not in special:
                tokens.setdefault(bytes(decoder[c] for c in text), []).append(token)
        self.vocabulary = outlines_core.Vocabulary(eos, tokens)
        self.words = (vocab_size + 31) // 32
        self.eos = eos  # allowed in a final state, but ``advance`` with it raises: never advanced

    def compile(self, schema: dict[str, Any]) -> Any:
        regex = self.oc.json_schema.build_regex_from_schema(json.dumps(schema))
        return self.oc.Index(regex, self.vocabulary)

    def masks(self, index: Any, tokens: list[int]) -> list[float]:
        guide, times = self.oc.Guide(index), []
        mask = self.np.zeros(self.words, dtype=self.np.int32)
        for token in tokens:
            started = time.perf_counter()
            guide.write_mask_into(mask.ctypes.data, mask.size, 4)
            times.append(time.perf_counter() - started)
            if token != self.eos:
                guide.advance(token)
        return times

    def accepts(self, index: Any, tokens: list[int]) -> bool:
        guide = self.oc.Guide(index)
        try:
            for token in tokens:
                if token != self.eos:
                    guide.advance(token)
        except ValueError:
            return False
        return guide.is_finished() or index.is_final_state(guide.get_state())


class XGrammar:
    name = "xgrammar"
    batch_api = "BatchGrammarMatcher.batch_fill_next_token_bitmask (C++ threads)"
    backends = ("masks in torch tensors (the package imports torch); applied by CPU, CUDA, Triton or MLX code "
                "(plain MLX ops, every backend; an mlx-lm logits processor in contrib)")

    def __init__(self, tokenizer: Any, vocab_size: int, eos: int) -> None:
        import xgrammar

        self.xgr = xgrammar
        info = xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=[eos])
        self.compiler = xgrammar.GrammarCompiler(info, cache_enabled=False)
        self.vocab_size = vocab_size

    def compile(self, schema: dict[str, Any]) -> Any:
        return self.compiler.compile_json_schema(json.dumps(schema), strict_mode=True)

    def masks(self, compiled: Any, tokens: list[int]) -> list[float]:
        matcher, times = self.xgr.GrammarMatcher(compiled), []
        bitmask = self.xgr.allocate_token_bitmask(1, self.vocab_size)
        for token in tokens:
            started = time.perf_counter()
            matcher.fill_next_token_bitmask(bitmask)
            times.append(time.perf_counter() - started)
            if not matcher.accept_token(token):
                raise ValueError(f"token {token} refused")
        return times

    def accepts(self, compiled: Any, tokens: list[int]) -> bool:
        matcher = self.xgr.GrammarMatcher(compiled)
        return all(matcher.accept_token(t) for t in tokens) and matcher.is_terminated() is not None


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-to-character table, inverted: byte-level BPE tokens back to their bytes."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1)
    )
    chars, extra = printable[:], 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars)}


def stats_us(times: list[float]) -> dict[str, float]:
    us = sorted(t * 1e6 for t in times)
    return {"median": round(statistics.median(us), 1), "p90": round(us[int(len(us) * 0.9)], 1),
            "max": round(us[-1], 1)}  # fmt: skip


def timed(call: Callable[[], Any]) -> tuple[Any, float]:
    started = time.perf_counter()
    result = call()
    return result, time.perf_counter() - started


def coverage(library: Library, encode: Callable[[str], list[int]]) -> dict[str, str]:
    out = {}
    for feature, (schema, breaking) in FEATURES.items():
        try:
            compiled = library.compile(schema)
        except Exception as exc:  # each library has its own error types
            out[feature] = f"refused ({type(exc).__name__}: {str(exc).splitlines()[0][:80]})"
            continue
        ignored = breaking is not None and library.accepts(compiled, encode(json.dumps(breaking)))
        out[feature] = "ignored: a breaking value passes" if ignored else "enforced"
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cache = BENCH.parent / ".test-deps" / "bench"
    parser.add_argument("--vocab-model", type=Path, action="append",
                        help=f"model folders (default: {cache}/compare-fast and structured-fast-v150000)")  # fmt: skip
    parser.add_argument("--out", type=Path, help="report path without suffix (default: bench/results/DATE-...)")
    args = parser.parse_args()
    from transformers import PreTrainedTokenizerFast

    folders = args.vocab_model or [cache / "compare-fast", cache / "structured-fast-v150000"]
    report: dict[str, Any] = {"date": datetime.date.today().isoformat(), "vocabularies": {}, "libraries": {}}
    for folder in folders:
        config = json.loads((folder / "config.json").read_text())
        tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"))
        vocab_size, eos = config["vocab_size"], config["eos_token_id"]
        instance = tokenizer.encode(json.dumps(INSTANCE, separators=(",", ":")), add_special_tokens=False) + [eos]
        rows: dict[str, Any] = {}
        for kind in (LLGuidance, Outlines, XGrammar):
            try:
                library: Library = kind(tokenizer, vocab_size, eos)
            except ImportError as exc:
                rows[kind.name] = {"error": f"does not import: {exc}"}
                continue
            report["libraries"].setdefault(kind.name, {"batch": kind.batch_api, "backends": kind.backends})
            compiled, seconds = timed(lambda: library.compile(BENCH_SCHEMA))
            times = library.masks(compiled, instance)
            rows[kind.name] = {"compile_ms": round(seconds * 1e3, 1), "mask_us": stats_us(times), "tokens": len(times),
                               "mask_us_free_string": stats_us(library.masks(library.compile(FREE_STRING), instance))}
            if folder == folders[0]:
                report["libraries"][kind.name]["coverage"] = coverage(
                    library, lambda text: tokenizer.encode(text, add_special_tokens=False) + [eos]
                )
            print(f"{folder.name} ({vocab_size} tokens) {kind.name}: {rows[kind.name]}", flush=True)
        report["vocabularies"][str(vocab_size)] = rows
    out = args.out or BENCH / "results" / f"{report['date']}-grammar-libraries"
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(report) + "\n")
    print(markdown(report))


def markdown(report: dict[str, Any]) -> str:
    lines = [f"# Grammar libraries, {report['date']}", "",
             "Mask µs per token along a valid answer; the last columns without the string's maxLength.", "",
             "| vocabulary | library | compile ms | mask µs median | p90 | max | free string: median | p90 |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for vocab, rows in report["vocabularies"].items():
        for name, row in rows.items():
            if "error" in row:
                lines.append(f"| {vocab} | {name} | {row['error']} | | | | | |")
            else:
                m, f = row["mask_us"], row["mask_us_free_string"]
                lines.append(f"| {vocab} | {name} | {row['compile_ms']} | {m['median']} | {m['p90']} | {m['max']} | "
                             f"{f['median']} | {f['p90']} |")  # fmt: skip
    names = list(report["libraries"])
    lines += ["", "| | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    lines.append("| batch | " + " | ".join(report["libraries"][n]["batch"] for n in names) + " |")
    lines.append("| backends | " + " | ".join(report["libraries"][n]["backends"] for n in names) + " |")
    for feature in FEATURES:
        cells = [report["libraries"][n].get("coverage", {}).get(feature, "") for n in names]
        lines.append(f"| {feature} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
