"""The engine's two paths through the real daemon: answers never depend on which one ran.

A lone request runs through mlx-lm's ``generate_step``; a second request hands it to the batch.
These scenarios drive that over real HTTP, reading the path taken from the daemon's debug log.
"""

from __future__ import annotations

import threading
import time
from typing import Callable

from daemon import Daemon, ask_in_background, post_and_hang_up

LONG = 1500


def test_answers_are_the_same_alone_handed_over_and_batched(make_daemon: Callable[..., Daemon]) -> None:
    """Scenario:
    1. a daemon without the prompt cache (so every request computes its whole prompt);
    2. two prompts asked one after the other: each runs alone; their answers are the reference;
    3. the first again, and the second while the first is still generating: the first is handed
       to the batch mid-way (logged), and both answers equal the reference;
    4. three requests at once: all answered, same answers again.
    """
    daemon = make_daemon(max_tokens=LONG, log_level="debug", prompt_cache_mb=0).start().wait_serving()
    prompts = ["Tell me about the sea.", "Tell me about the mountains."]
    reference = [daemon.ask(p).json()["response"] for p in prompts]
    assert daemon.log_text().count("sequence runs alone") == 2

    threads, results = ask_in_background(daemon, prompts[:1])
    daemon.wait_log("sequence runs alone", count=3)
    time.sleep(0.3)
    second = daemon.ask(prompts[1])
    for t in threads:
        t.join()
    assert second.json()["response"] == reference[1]
    assert results[0].json()["response"] == reference[0]  # type: ignore[attr-defined]
    handed = [line for line in daemon.log_text().splitlines() if "handed to the batch after" in line]
    assert len(handed) == 1, handed
    assert 0 < int(handed[0].split("after ")[1].split()[0]) < LONG

    threads, results = ask_in_background(daemon, [prompts[0], prompts[1], prompts[0]])
    for t in threads:
        t.join()
    answers = [results[i].json()["response"] for i in range(3)]  # type: ignore[attr-defined]
    assert answers == [reference[0], reference[1], reference[0]]


def test_hang_up_of_a_handed_over_request_frees_it(make_daemon: Callable[..., Daemon]) -> None:
    """Scenario:
    1. a long request runs alone; a second one arrives and the first is handed to the batch;
    2. the first client hangs up: its generation is cancelled (logged) while the second goes on;
    3. the second is answered in full, and the next request runs alone (the batch was emptied).
    """
    daemon = make_daemon(max_tokens=LONG, log_level="debug").start().wait_serving()
    before = daemon.log_text().count("sequence runs alone")  # the prompt cache's warm-up ran alone at start
    impatient = threading.Thread(target=post_and_hang_up, args=(daemon, "Tell me about the sea.", 1.0))
    impatient.start()
    daemon.wait_log("sequence runs alone", count=before + 1)
    time.sleep(0.3)
    threads, results = ask_in_background(daemon, ["Tell me about the mountains."])
    daemon.wait_log("handed to the batch after")
    impatient.join()
    daemon.wait_log("generation cancelled after")
    for t in threads:
        t.join()
    assert results[0].status == 200  # type: ignore[attr-defined]
    runs_alone = daemon.log_text().count("sequence runs alone")
    assert daemon.ask("hi").status == 200
    assert daemon.log_text().count("sequence runs alone") == runs_alone + 1
