"""The daemon with its model worker as a two-rank MLX distributed group (``mlx.launch``, ring
backend over loopback): the same answers as one process, batching, a tool call, a rank's death,
and an ordered stop that leaves no rank behind."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Callable

import mlx.core as mx
import pytest
from daemon import Daemon, HttpResult, ask_in_background, base_config, cmdline, free_port, pid_alive
from tool_model import MAX_TOOL_ROUNDS, SYSTEM_PROMPT, TOOL_TIMEOUT_S, calc_servers

PIRATE = {"prompt": "Why?", "system_prompt": "You are a pirate."}
PROMPTS = ["What is the capital of France?", "Tell me a story", "hello", "Why?"]


def with_weight_index(model: Path, folder: Path) -> Path:
    """A copy of ``model`` with the weight index mlx-lm's ``sharded_load`` reads."""
    shutil.copytree(model, folder)
    names = mx.load(str(folder / "model.safetensors")).keys()
    index = {"metadata": {}, "weight_map": {name: "model.safetensors" for name in names}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return folder


def group(mode: str) -> dict:
    # A ring port of its own, so that groups of tests run side by side (pytest-xdist) do not meet.
    return {"hosts": ["127.0.0.1"], "ranks_per_host": 2, "mode": mode, "starting_port": free_port()}


def rank_pids(daemon: Daemon) -> list[int]:
    return [p for p in daemon.descendants() if cmdline(p).startswith("llm-server: model-worker rank")]


@pytest.fixture(scope="module")
def reference(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """One process's greedy answers."""
    daemon = Daemon(tmp_path_factory.mktemp("one"), base_config(tiny_model, 0, max_tokens=30))
    try:
        daemon.start().wait_serving()
        answers = {p: daemon.ask(p).json()["response"] for p in PROMPTS}
        answers["pirate"] = daemon.post_json(PIRATE).json()["response"]
        return answers
    finally:
        daemon.kill_all()


@pytest.mark.parametrize("mode", ["pipeline", "tensor"])
def test_two_ranks_answer_as_one_process(make_daemon: Callable[..., Daemon], tiny_model: Path,
                                          reference: dict[str, str], mode: str) -> None:  # fmt: skip
    """Scenario: two ranks, each with its shard of the tiny model as it is (one weights file and
    no weight index, which pipeline mode derives); alone and four at once (one batch), the
    greedy answers are one process's; SIGTERM stops every rank, exit 0, and the model folder is
    left as it was."""
    before = sorted(p.name for p in tiny_model.iterdir())
    daemon = make_daemon(base_config(tiny_model, 0, max_tokens=30, distributed=group(mode)))
    daemon.start().wait_serving(180)
    assert len(rank_pids(daemon)) == 2
    assert daemon.post_json(PIRATE).json()["response"] == reference["pirate"]
    threads, results = ask_in_background(daemon, PROMPTS)
    for t in threads:
        t.join(120)
    assert [results[i].json()["response"] for i in range(len(PROMPTS))] == [reference[p] for p in PROMPTS]
    log = daemon.log_text()
    assert re.search(r"INFO model-worker\.rank0\[\d+\] - model .* loaded", log)
    assert re.search(r"INFO rank1\[\d+\] - model .* loaded", log)  # the follower's lines reach the log
    ranks = rank_pids(daemon)
    daemon.signal()
    assert daemon.wait_exit(120) == 0
    assert not any(pid_alive(pid) for pid in ranks)
    assert sorted(p.name for p in tiny_model.iterdir()) == before


def test_a_rank_dying_mid_generation(make_daemon: Callable[..., Daemon], tiny_model: Path) -> None:
    """Scenario (pipeline mode, a generation of 100,000 tokens in flight): rank 1 is killed; the
    launcher stops the group, the request gets a 500, the group is started again (new ranks),
    the HTTP process answers 503 meanwhile, and the next request succeeds."""
    daemon = make_daemon(base_config(tiny_model, 0, max_tokens=30, distributed=group("pipeline")))
    daemon.start().wait_serving(180)
    long_story: list[object] = []
    thread = threading.Thread(
        target=lambda: long_story.append(daemon.post_json({"prompt": "A long story.", "max_tokens": 100_000}))
    )
    thread.start()
    daemon.wait_log("sequence runs alone")
    time.sleep(0.5)
    (follower,) = [p for p in rank_pids(daemon) if cmdline(p).endswith("rank 1")]
    os.kill(follower, signal.SIGKILL)
    thread.join(120)
    assert isinstance(long_story[0], HttpResult) and long_story[0].status == 500, long_story
    daemon.wait_log("restarting the model worker")
    daemon.wait_log("serving on", count=2, timeout=180)
    assert daemon.post_json(PIRATE).status == 200
    assert follower not in rank_pids(daemon) and len(rank_pids(daemon)) == 2
    daemon.signal()
    assert daemon.wait_exit(120) == 0


def test_tool_call_through_the_group(make_daemon: Callable[..., Daemon], tool_model: Path, tmp_path: Path) -> None:
    """The tiny model trained to call the calc server's tools, pipeline mode, from a folder with
    a weight index (as the Hub's sharded models have): "What is 2 + 3?" goes through a tool call
    and is answered as on one machine."""
    model = with_weight_index(tool_model, tmp_path / "tool-model")
    config = base_config(
        model, 0, servers=calc_servers(), system_prompt=SYSTEM_PROMPT, max_tokens=200,
        tool_timeout_s=TOOL_TIMEOUT_S, max_tool_rounds=MAX_TOOL_ROUNDS, distributed=group("pipeline"),
    )  # fmt: skip
    daemon = make_daemon(config).start().wait_serving(180)
    answer = daemon.ask("What is 2 + 3?")
    assert answer.status == 200 and answer.json()["response"] == "2 + 3 = 5."
    assert "tool call add server=calc" in daemon.log_text()
    daemon.signal()
    assert daemon.wait_exit(120) == 0
