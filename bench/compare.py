"""llm-server against mlx-lm's own limits and against ``mlx_lm.server``, side by side in one run.

Run by hand: ``bash bench/run.sh --compare`` (OpenBLAS preloaded on Linux, as for every bench).
It reports and asserts nothing. For each model shape it starts four sides on the same model
folder, each in its own process, all loaded at once:

- ``stream_generate``: ``bench/direct.py --side stream`` (mlx-lm's single-stream limit; level 1 only);
- ``BatchGenerator``: ``bench/direct.py --side batch``, every request of a round inserted at once;
- ``llm-server``: the real daemon over HTTP (``POST /``), ``max_batch_size`` = the largest level;
- ``mlx_lm.server``: over ``/v1/chat/completions``, ``--decode-concurrency`` = the largest level.

A round at concurrency C is C requests sent at once (C client threads, one request each); its
throughput is all generated tokens over the wall time from the first send to the last answer.
Every side is warmed up at every level (MLX compiles kernels for new batch shapes) before
``--reps`` timed rounds, the order of the sides rotating from one repetition to the next. Every
round uses fresh prompts (the same ones on every side); every answer must be exactly
``max_tokens`` long (the model's end-of-turn token is made unreachable) and every side must see the
same prompt token count, or the round is marked. Errors and connection resets are counted per side.

Shapes: ``fast`` (Qwen2 with 4 layers, hidden 256: a step as short as a small model's on a Mac
GPU, so per-token overhead shows on a CPU), ``qwen0.5b`` (the Qwen2.5-0.5B body), and ``tiny``
(the test fixture's 2 layers × 64, for ``--quick``). All use the test tokenizer's small vocabulary.
"""

from __future__ import annotations

import argparse
import datetime
import http.client
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT)]

from daemon import Daemon, base_config, free_port, port_open  # noqa: E402
from tinymodel import never_stop, write_tiny_model  # noqa: E402

SHAPES: dict[str, dict[str, int]] = {
    "tiny": dict(
        hidden_size=64, num_hidden_layers=2, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2
    ),
    "fast": dict(
        hidden_size=256, num_hidden_layers=4, intermediate_size=1024, num_attention_heads=4, num_key_value_heads=2
    ),
    "qwen0.5b": dict(
        hidden_size=896, num_hidden_layers=24, intermediate_size=4864, num_attention_heads=14, num_key_value_heads=2
    ),
}
DEFAULT_TOKENS = {"tiny": 32, "fast": 256, "qwen0.5b": 32}
LATENCY_ANSWERS = 8  # streamed answers per HTTP side and level, at least, for the latency percentiles
SYSTEM_PROMPT = "You are a helpful assistant."
_RESPONSE = re.compile(r" (\w+) response 200 .*?prompt_tokens=(\d+) completion_tokens=(\d+)")
STREAM, BATCH, OURS, PEER = "stream_generate", "BatchGenerator", "llm-server", "mlx_lm.server"


@dataclass
class Round:
    """One timed (or warm-up) round of one side at one level."""

    seconds: float
    completion_tokens: list[int]
    prompt_tokens: list[int]
    errors: int = 0
    resets: int = 0
    latencies: list[float] = field(default_factory=list)
    ttft: list[float] = field(default_factory=list)  # time to each answer's first token
    gaps: list[float] = field(default_factory=list)  # between one token and the next, all answers

    @property
    def tokens_per_s(self) -> float:
        return sum(self.completion_tokens) / self.seconds if self.seconds else 0.0


class Side(Protocol):
    name: str

    def round(self, prompts: list[str], max_tokens: int) -> Round: ...

    def close(self) -> None: ...


class DirectSide:
    """``bench/direct.py`` in its own process, driven over its stdin/stdout."""

    def __init__(self, name: str, mode: str, model: Path) -> None:
        self.name = name
        self.proc = subprocess.Popen(
            [sys.executable, str(ROOT / "bench" / "direct.py"), str(model), "--side", mode,
             "--system-prompt", SYSTEM_PROMPT],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        self.device = json.loads(self._line())["device"]

    def _line(self) -> str:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"{self.name} exited with {self.proc.wait()}")
        return line

    def round(self, prompts: list[str], max_tokens: int) -> Round:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"prompts": prompts, "max_tokens": max_tokens}) + "\n")
        self.proc.stdin.flush()
        answer = json.loads(self._line())
        results = answer["results"]
        return Round(
            answer["seconds"], [r["completion_tokens"] for r in results], [r["prompt_tokens"] for r in results],
            ttft=[r["ttft"] for r in results if r["ttft"] is not None], gaps=[g for r in results for g in r["gaps"]],
        )  # fmt: skip

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(60)


def all_at_once(client: Callable[..., None], jobs: list[tuple]) -> float:
    """``client(*job)`` for every job, each on its own thread, all released together; the wall
    time from the release to the last one's end."""
    barrier = threading.Barrier(len(jobs) + 1)

    def run(*job: Any) -> None:
        barrier.wait()
        client(*job)

    threads = [threading.Thread(target=run, args=job) for job in jobs]
    for t in threads:
        t.start()
    barrier.wait()
    started = time.perf_counter()
    for t in threads:
        t.join()
    return time.perf_counter() - started


def http_round(
    port: int, requests: list[tuple[str, bytes]], parse: Callable[[bytes, dict], tuple[int, int] | None]
) -> Round:
    """Send every request at once, one client thread each. ``parse`` gives an answer's (prompt,
    completion) token counts, or None when the caller counts them another way."""
    outcomes: list[Any] = [None] * len(requests)

    def client(i: int, path: str, body: bytes) -> None:
        started = time.perf_counter()
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=3600)
        try:
            conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
            response = conn.getresponse()
            data = response.read()
            outcomes[i] = (response.status, data, dict(response.getheaders()), time.perf_counter() - started)
        except (ConnectionError, http.client.RemoteDisconnected) as exc:
            outcomes[i] = exc
        finally:
            conn.close()

    result = Round(all_at_once(client, [(i, *r) for i, r in enumerate(requests)]), [], [])
    for outcome in outcomes:
        if isinstance(outcome, BaseException):
            result.resets += 1
        elif outcome[0] != 200:
            result.errors += 1
        else:
            counts = parse(outcome[1], outcome[2])
            if counts is not None:
                result.prompt_tokens.append(counts[0])
                result.completion_tokens.append(counts[1])
            result.latencies.append(outcome[3])
    return result


def stream_round(port: int, bodies: list[bytes]) -> Round:
    """Send every streamed chat request at once (one client thread each) and time each answer's
    Server-Sent Events: the first content piece, then the gaps between pieces."""
    timings: list[Any] = [None] * len(bodies)

    def client(i: int, body: bytes) -> None:
        started = time.perf_counter()
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=3600)
        try:
            conn.request("POST", "/v1/chat/completions", body=body, headers={"Content-Type": "application/json"})
            response = conn.getresponse()
            times = [at for at, _ in content_pieces(response)]
            timings[i] = (response.status, started, times)
        except (ConnectionError, http.client.HTTPException) as exc:
            timings[i] = exc
        finally:
            conn.close()

    result = Round(all_at_once(client, list(enumerate(bodies))), [], [])
    for timing in timings:
        if isinstance(timing, BaseException):
            result.resets += 1
        elif timing[0] != 200 or not timing[2]:
            result.errors += 1
        else:
            _, begun, times = timing
            result.ttft.append(times[0] - begun)
            result.gaps += [b - a for a, b in zip(times, times[1:])]
    return result


def content_pieces(response: http.client.HTTPResponse) -> Iterator[tuple[float, str]]:
    """Each content piece of a streamed chat completion, with when it came."""
    for line in response:
        if line.startswith(b"data: {"):
            piece = (json.loads(line[6:]).get("choices") or [{}])[0].get("delta", {}).get("content")
            if piece:
                yield time.perf_counter(), piece


def chat_body(messages: list[dict], max_tokens: int, stream: bool) -> bytes:
    return json.dumps({"messages": messages, "max_tokens": max_tokens, "temperature": 0.0, "stream": stream}).encode()


def chat_prompt(prompt: str) -> list[dict]:
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": prompt}]


class DaemonSide:
    """The real llm-server over HTTP; token counts come from its own response log lines."""

    def __init__(
        self, model: Path, max_tokens: int, batch: int | None, work: Path, name: str = OURS, fields: dict | None = None
    ) -> None:
        self.name, self.fields = name, fields or {}  # fields: added to every request body
        tuning = {} if batch is None else {"max_batch_size": batch}  # None: the shipped default
        config = base_config(
            model, free_port(), max_tokens=max_tokens, log_level="info", system_prompt=SYSTEM_PROMPT,
            shutdown_timeout_s=30, **tuning,
        )  # fmt: skip
        self.daemon = Daemon(work / "llm-server", config).start().wait_serving(600)

    def round(self, prompts: list[str], max_tokens: int) -> Round:
        ids: list[str] = []

        def parse(body: bytes, headers: dict) -> None:
            ids.append({k.lower(): v for k, v in headers.items()}["x-request-id"])  # counted from the log

        bodies = [("/", json.dumps({"prompt": p, **self.fields}).encode()) for p in prompts]
        result = http_round(self.daemon.port, bodies, parse)
        deadline = time.monotonic() + 60
        while ids:  # the log catches up with the answers a moment later
            counts = {
                m.group(1): (int(m.group(2)), int(m.group(3))) for m in _RESPONSE.finditer(self.daemon.log_text())
            }
            if all(i in counts for i in ids) or time.monotonic() > deadline:
                result.prompt_tokens = [counts.get(i, (0, 0))[0] for i in ids]
                result.completion_tokens = [counts.get(i, (0, 0))[1] for i in ids]
                break
            time.sleep(0.05)
        return result

    @property
    def port(self) -> int:
        return self.daemon.port

    def close(self) -> None:
        self.daemon.signal()
        self.daemon.wait_exit(120)


class PeerSide:
    """``mlx_lm.server`` (same mlx-lm) over ``/v1/chat/completions``."""

    name = PEER

    def __init__(self, model: Path, max_tokens: int, concurrency: int | None) -> None:
        self.port = free_port()
        tuning = [] if concurrency is None else ["--decode-concurrency", str(concurrency), "--prompt-concurrency", "8"]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlx_lm.server", "--model", str(model), "--port", str(self.port),
             "--temp", "0", "--max-tokens", str(max_tokens), *tuning],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
        deadline = time.monotonic() + 600
        while not port_open(self.port):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"mlx_lm.server did not start (exit {self.proc.poll()})")
            time.sleep(0.2)

    def round(self, prompts: list[str], max_tokens: int) -> Round:
        def parse(data: bytes, headers: dict) -> tuple[int, int]:
            usage = json.loads(data)["usage"]
            return usage["prompt_tokens"], usage["completion_tokens"]

        bodies = [("/v1/chat/completions", chat_body(chat_prompt(p), max_tokens, False)) for p in prompts]
        return http_round(self.port, bodies, parse)

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(60)


def percentile(values: list[float], p: int) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return round(values[0], 4)
    return round(statistics.quantiles(values, n=100, method="inclusive")[p - 1], 4)


def latency(rounds: list[Round]) -> dict[str, Any]:
    """Time to first token and inter-token latency, p50 and p99, over ``rounds``."""
    ttft = [x for r in rounds for x in r.ttft]
    gaps = [x for r in rounds for x in r.gaps]
    return {"ttft_p50_s": percentile(ttft, 50), "ttft_p99_s": percentile(ttft, 99),
            "itl_p50_s": percentile(gaps, 50), "itl_p99_s": percentile(gaps, 99),
            "latency_errors": sum(r.errors + r.resets for r in rounds)}  # fmt: skip


def summarize(rounds: list[Round], max_tokens: int) -> dict[str, Any]:
    rates = [r.tokens_per_s for r in rounds]
    latencies = [x for r in rounds for x in r.latencies]
    return {
        "tokens_per_s": round(statistics.median(rates), 1),
        "min": round(min(rates), 1),
        "max": round(max(rates), 1),
        "runs": [round(x, 1) for x in rates],
        "errors": sum(r.errors for r in rounds),
        "resets": sum(r.resets for r in rounds),
        "wrong_token_counts": sum(1 for r in rounds for n in r.completion_tokens if n != max_tokens),
        "prompt_tokens": sorted({n for r in rounds for n in r.prompt_tokens}),
        "latency_p50_s": round(statistics.median(latencies), 3) if latencies else None,
    }


def run_shape(shape: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    model = build_model(args.cache, shape)
    max_tokens = args.max_tokens or DEFAULT_TOKENS[shape]
    top = None if args.defaults else max(args.levels)  # --defaults: each server as shipped
    print(f"\n== {shape}: {model}, {max_tokens} tokens per answer, levels {args.levels}", flush=True)
    sides: list[Side] = [DirectSide(STREAM, "stream", model), DirectSide(BATCH, "batch", model)]
    sides.append(DaemonSide(model, max_tokens, top, work / shape))
    if not args.no_peer:
        sides.append(PeerSide(model, max_tokens, top))
    device = sides[0].device  # type: ignore[attr-defined]
    counter = iter(range(10**9))
    levels: dict[str, Any] = {}
    try:
        for level in args.levels:
            present = [s for s in sides if level == 1 or s.name != STREAM]
            rounds: dict[str, list[Round]] = {s.name: [] for s in present}

            def prompts() -> list[str]:
                return [
                    f"Request {next(counter)}: write a short story about a lighthouse keeper." for _ in range(level)
                ]

            for side in present:  # warm-up: kernels for this batch size, untimed
                side.round(prompts(), max_tokens)
            for rep in range(args.reps):
                batch = prompts()
                for side in present[rep % len(present) :] + present[: rep % len(present)]:
                    rounds[side.name].append(side.round(batch, max_tokens))
            levels[str(level)] = {name: summarize(rs, max_tokens) for name, rs in rounds.items()}
            # The HTTP sides stream more rounds to be timed per token, interleaved, at least
            # LATENCY_ANSWERS answers each (one answer is no percentile); in-process sides time
            # every round per token.
            streamed: dict[str, list[Round]] = {s.name: [] for s in present if not isinstance(s, DirectSide)}
            for _ in range(-(-LATENCY_ANSWERS // level)):
                batch = [chat_body(chat_prompt(p), max_tokens, True) for p in prompts()]
                for side in present:
                    if side.name in streamed:
                        streamed[side.name].append(stream_round(side.port, batch))
            for side in present:
                levels[str(level)][side.name].update(latency(streamed.get(side.name, rounds[side.name])))
            print_level(level, levels[str(level)])
        agent = {} if args.agent_turns == 0 else {
            side.name: agent_loop(side.port, args.agent_turns) for side in sides if side.name in (OURS, PEER)
        }  # fmt: skip
        if agent:
            print_agent(agent)
    finally:
        for side in sides:
            side.close()
    return {"model": str(model), "shape": SHAPES[shape], "max_tokens": max_tokens, "device": device,
            "levels": levels, "agent_loop": agent}  # fmt: skip


AGENT_ANSWER_TOKENS = 16
TOOL_RESULT = "Tool result {turn}: " + "the lighthouse log lists ships, weather and lamp hours for the night. " * 5


def agent_loop(port: int, turns: int) -> list[float]:
    """An agent's conversation: each turn re-sends the whole history, grown by the last answer and
    a tool result (as a user turn: every template renders that), streamed; the time to the first
    token of each turn. A server that keeps the conversation's prefix cached answers in the time
    the new part takes to prefill; one that does not, in the time of the whole history."""
    messages = chat_prompt("Plan the lighthouse keeper's night, step by step, using the tools.")
    ttft = []
    for turn in range(turns):
        body = chat_body(messages, AGENT_ANSWER_TOKENS, True)
        started = time.perf_counter()
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=3600)
        try:
            conn.request("POST", "/v1/chat/completions", body=body, headers={"Content-Type": "application/json"})
            pieces = list(content_pieces(conn.getresponse()))
        finally:
            conn.close()
        ttft.append(round((pieces[0][0] if pieces else time.perf_counter()) - started, 4))
        messages += [{"role": "assistant", "content": "".join(piece for _, piece in pieces)},
                     {"role": "user", "content": TOOL_RESULT.format(turn=turn)}]  # fmt: skip
    return ttft


def print_agent(agent: dict[str, list[float]]) -> None:
    for name, ttft in agent.items():
        print(f"  agent loop {name:16} TTFT per turn (s): {' '.join(f'{t:.3f}' for t in ttft)}", flush=True)


def print_level(level: int, sides: dict[str, Any]) -> None:
    for name, s in sides.items():
        flags = "".join(f", {s[k]} {k}" for k in ("errors", "resets", "wrong_token_counts") if s[k])
        print(f"  c={level:<3} {name:16} {s['tokens_per_s']:9.1f} tok/s ({s['min']}–{s['max']}){flags}"
              f"  TTFT p50/p99 {_ms(s.get('ttft_p50_s'))}/{_ms(s.get('ttft_p99_s'))} ms"
              f"  ITL p50/p99 {_ms(s.get('itl_p50_s'))}/{_ms(s.get('itl_p99_s'))} ms", flush=True)  # fmt: skip


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.1f}"


def targets(levels: dict[str, Any], defaults: bool = False) -> list[dict[str, Any]]:
    """The issues' targets, each with the figures it is judged on (``defaults``: every server as
    shipped, judged on "Defaults that win")."""
    out = []
    lo, hi = str(min(map(int, levels))), str(max(map(int, levels)))

    def add(what: str, level: str, ours: float, ref: float, goal: float) -> None:
        ratio = ours / ref if ref else 0.0
        out.append({"target": what, "level": int(level), "ratio": round(ratio, 2), "goal": goal, "met": ratio >= goal})

    if defaults:
        for level, sides in levels.items():
            if PEER in sides:
                goal = 1.0 if int(level) >= 64 else 1.1
                add(f"{OURS} / {PEER}", level, sides[OURS]["tokens_per_s"], sides[PEER]["tokens_per_s"], goal)
            if int(level) >= 32:
                add(f"{OURS} / {BATCH}", level, sides[OURS]["tokens_per_s"], sides[BATCH]["tokens_per_s"], 0.9)
            errors = sides[OURS]["errors"] + sides[OURS]["resets"] + sides[OURS]["wrong_token_counts"]
            out.append({"target": f"{OURS} errors", "level": int(level), "count": errors, "goal": 0, "met": errors == 0})
        return out
    one = levels[lo]
    if STREAM in one:
        add(f"{OURS} / {STREAM}", lo, one[OURS]["tokens_per_s"], one[STREAM]["tokens_per_s"], 0.95)
    top = levels[hi]
    add(f"{OURS} / {BATCH}", hi, top[OURS]["tokens_per_s"], top[BATCH]["tokens_per_s"], 0.8)
    if PEER in top:
        add(f"{OURS} / {PEER}", hi, top[OURS]["tokens_per_s"], top[PEER]["tokens_per_s"], 1.5)
    for level, sides in levels.items():
        if PEER in sides and level != hi:
            add(f"{OURS} / {PEER}", level, sides[OURS]["tokens_per_s"], sides[PEER]["tokens_per_s"], 1.1)
        errors = sides[OURS]["errors"] + sides[OURS]["resets"] + sides[OURS]["wrong_token_counts"]
        out.append({"target": f"{OURS} errors", "level": int(level), "count": errors, "goal": 0, "met": errors == 0})
    return out


def markdown(report: dict[str, Any]) -> str:
    lines = [f"# llm-server against mlx-lm and mlx_lm.server ({report['date']})", "",
             f"Machine: {report['machine']}. Backend: {report['backend']}. BLAS: {report['blas']}. "
             f"mlx {report['versions']['mlx']}, mlx-lm {report['versions']['mlx_lm']}. "
             f"Median tokens/s of {report['reps']} timed rounds (min–max), after a warm-up round per side and level. "
             + ("Every server at its shipped defaults (no batch-width flags)." if report.get("defaults") else
                "Tuned alike: llm-server's max_batch_size and mlx_lm.server's --decode-concurrency = the largest level."),
             ""]  # fmt: skip
    for shape, result in report["shapes"].items():
        sides = [STREAM, BATCH, OURS, PEER]
        lines += [f"## {shape}: {result['max_tokens']} tokens per answer", "",
                  "| clients | " + " | ".join(sides) + " |", "|---" * (len(sides) + 1) + "|"]  # fmt: skip
        for level, by_side in result["levels"].items():
            cells = []
            for name in sides:
                s = by_side.get(name)
                if s is None:
                    cells.append("")
                    continue
                cell = f"{s['tokens_per_s']:,} ({s['min']:,}–{s['max']:,})"
                bad = s["errors"] + s["resets"]
                cells.append(cell + (f", {bad} failed" if bad else ""))
            lines.append(f"| {level} | " + " | ".join(cells) + " |")
        lines += ["", "Latency, ms: time to first token p50 / p99, inter-token latency p50 / p99 (the HTTP sides "
                  f"from streamed rounds, at least {LATENCY_ANSWERS} answers per level).", "",
                  "| clients | " + " | ".join(sides) + " |", "|---" * (len(sides) + 1) + "|"]  # fmt: skip
        for level, by_side in result["levels"].items():
            cells = []
            for name in sides:
                s = by_side.get(name)
                cells.append("" if s is None or "ttft_p50_s" not in s else
                             f"{_ms(s['ttft_p50_s'])} / {_ms(s['ttft_p99_s'])}, {_ms(s['itl_p50_s'])} / {_ms(s['itl_p99_s'])}")
            lines.append(f"| {level} | " + " | ".join(cells) + " |")
        if result.get("agent_loop"):
            agent = result["agent_loop"]
            lines += ["", f"Agent loop: time to first token per turn, s ({len(next(iter(agent.values())))} turns, "
                      "the history re-sent each turn, grown by a tool result).", "",
                      "| turn | " + " | ".join(agent) + " |", "|---" * (len(agent) + 1) + "|"]  # fmt: skip
            for turn, row in enumerate(zip(*agent.values()), 1):
                lines.append(f"| {turn} | " + " | ".join(f"{t:.3f}" for t in row) + " |")
        lines += ["", "| target | clients | figure | goal | met |", "|---|---|---|---|---|"]
        for t in result["targets"]:
            figure = f"{t['ratio']}×" if "ratio" in t else str(t["count"])
            goal = f"≥ {t['goal']}×" if "ratio" in t else "0"
            lines.append(f"| {t['target']} | {t['level']} | {figure} | {goal} | {'yes' if t['met'] else '**no**'} |")
        lines.append("")
    return "\n".join(lines)


def build_model(cache: Path, shape: str, layers: int | None = None) -> Path:
    """The random-weight model of ``shape`` (optionally with another layer count), built once
    into ``cache``; its end-of-turn token is unreachable, so every answer is max_tokens long."""
    params = {**SHAPES[shape], **({"num_hidden_layers": layers} if layers else {})}
    suffix = "" if params == SHAPES[shape] else f"-{params['num_hidden_layers']}l"
    folder = cache / f"compare-{shape}{suffix}"
    if not (folder / "model.safetensors").exists():
        print(f"building the {shape}{suffix} model in {folder} ...", flush=True)
        write_tiny_model(folder, seed=0, max_position_embeddings=32768, **params)
        never_stop(folder)
    return folder


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        cpu = re.search(r"model name\s*:\s*(.*)", Path("/proc/cpuinfo").read_text()).group(1)  # type: ignore[union-attr]
    except (OSError, AttributeError):
        pass
    return f"{platform.system()} {platform.machine()}, {os.cpu_count()} cores ({cpu})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="fast,qwen0.5b", help=f"comma-separated, of {', '.join(SHAPES)}")
    parser.add_argument("--levels", default="1,8,32,64", help="concurrency levels")
    parser.add_argument("--reps", type=int, default=3, help="timed rounds per side and level")
    parser.add_argument("--max-tokens", type=int, help="tokens per answer (default per shape: %s)" % DEFAULT_TOKENS)
    parser.add_argument("--no-peer", action="store_true", help="leave mlx_lm.server out")
    parser.add_argument("--defaults", action="store_true",
                        help="no batch-width tuning: llm-server's max_batch_size and mlx_lm.server's concurrency flags "
                             "at their shipped defaults")  # fmt: skip
    parser.add_argument("--agent-turns", type=int, default=10, help="turns of the agent-loop scenario (0: none)")
    parser.add_argument("--quick", action="store_true", help="smoke test: tiny model, levels 1,4, one round")
    parser.add_argument("--cache", type=Path, default=ROOT / ".test-deps" / "bench")
    parser.add_argument("--out", type=Path, help="report path without suffix (default: bench/results/DATE-...)")
    args = parser.parse_args()
    if args.quick:
        args.shapes, args.levels, args.reps, args.agent_turns = "tiny", "1,4", 1, min(args.agent_turns, 3)
    args.levels = [int(n) for n in args.levels.split(",")]
    import mlx.core as mx
    import mlx_lm

    blas = os.environ.get(
        "LLM_SERVER_BENCH_BLAS", "openblas (preloaded)" if os.environ.get("LD_PRELOAD") else "builtin"
    )
    report: dict[str, Any] = {
        "date": datetime.date.today().isoformat(), "machine": machine(), "blas": blas, "reps": args.reps,
        "versions": {"mlx": mx.__version__, "mlx_lm": mlx_lm.__version__, "python": platform.python_version()},
        "shapes": {}, "defaults": args.defaults,
    }  # fmt: skip
    with tempfile.TemporaryDirectory() as work:
        for shape in args.shapes.split(","):
            result = run_shape(shape, args, Path(work))
            result["targets"] = targets(result["levels"], args.defaults)
            report["shapes"][shape] = result
    report["backend"] = next(iter(report["shapes"].values()))["device"]
    out = args.out or ROOT / "bench" / "results" / (
        f"{report['date']}-{platform.system().lower()}-{platform.machine()}-{os.cpu_count()}core-{blas.split()[0]}"
        f"-compare{'-defaults' if args.defaults else ''}{'-quick' if args.quick else ''}"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(report) + "\n")
    print("\n" + markdown(report))
    print(f"report: {out.with_suffix('.json')} and .md")


if __name__ == "__main__":
    main()
