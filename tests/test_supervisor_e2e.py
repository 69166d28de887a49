"""The supervisor under faults, end to end: deaths during restarts, stall detection after idling,
a bug in its own loop, a signal during a spawn. Each scenario runs the real daemon; the test-only
``LLM_SERVER_FAULT`` hooks only widen a window or inject the failure named."""

from __future__ import annotations

import os
import re
import signal
import time
from typing import Callable

from daemon import Daemon, assert_gone, cmdline


def pid_of(daemon: Daemon, role: str) -> int:
    (pid,) = [p for p in daemon.descendants() if cmdline(p) == f"llm-server: {role}"]
    return pid


def test_idle_worker_with_a_low_stall_timeout_is_not_killed(make_daemon: Callable[..., Daemon]) -> None:
    """Scenario (``worker_stall_timeout_s`` 3, pinged every 0.75 s):
    1. the daemon answers a request, then idles 4 s, longer than the stall timeout;
    2. a request comes, and the idle MLX thread takes 1 s to pick it up (test-only
       ``slow-wake`` hook: it widens the moment between a submit and the thread waking, which a
       ping can fall into): before, the stall was counted from when the thread went idle, the
       worker was called stuck and killed, and the request got a 500;
    3. every request gets 200, the worker pid is unchanged, nothing is logged as stuck.
    """
    daemon = make_daemon(worker_stall_timeout_s=3, env={"LLM_SERVER_FAULT": "slow-wake"}).start().wait_serving()
    worker = pid_of(daemon, "model-worker")
    assert daemon.ask("hello").status == 200
    for prompt in ("after a pause", "after another pause"):
        time.sleep(4)
        assert daemon.ask(prompt, timeout=60).status == 200
    assert pid_of(daemon, "model-worker") == worker
    log = daemon.log_text()
    assert "is stuck" not in log and log.count("spawned model-worker") == 1
    daemon.signal()
    assert daemon.wait_exit() == 0


def test_a_death_while_the_other_child_restarts_restarts_both(make_daemon: Callable[..., Daemon]) -> None:
    """Scenario (``worker_restarts`` 10):
    1. the worker is SIGKILLed; while its successor loads, the HTTP process is SIGKILLed too
       (before: the daemon gave up with exit 6, its restart budget not spent);
    2. both are restarted and a request gets 200;
    3. the other way round: the HTTP process is SIGKILLed, and while its successor starts the
       worker is SIGKILLed: both are restarted and a request gets 200;
    4. SIGTERM: exit 0, nothing left running.
    """
    daemon = make_daemon(worker_restarts=10).start().wait_serving()
    os.kill(pid_of(daemon, "model-worker"), signal.SIGKILL)
    daemon.wait_log("spawned model-worker", count=2)
    os.kill(pid_of(daemon, "http"), signal.SIGKILL)
    daemon.wait_log("serving on", count=2, timeout=90)
    assert daemon.ask("are you back?").status == 200
    log = daemon.log_text()
    assert "restarting the http process once the model worker is up" in log
    assert log.find("http process (pid") < log.rfind("model worker ready"), log  # died while it loaded

    os.kill(pid_of(daemon, "http"), signal.SIGKILL)
    daemon.wait_log("spawned http", count=3)
    os.kill(pid_of(daemon, "model-worker"), signal.SIGKILL)
    daemon.wait_log("serving on", count=3, timeout=90)
    assert daemon.ask("and now?").status == 200
    assert "restarting the model worker once the http process is up" in daemon.log_text()

    children = daemon.descendants()
    daemon.signal()
    assert daemon.wait_exit() == 0
    assert_gone(children)


def spawned_pids(log: str) -> list[int]:
    return [int(pid) for pid in re.findall(r"spawned [\w-]+ \(pid (\d+)\)", log)]


def test_a_bug_in_the_supervisor_loop_still_stops_in_order(make_daemon: Callable[..., Daemon]) -> None:
    """Scenario:
    1. the supervisor's watch loop raises once serving (test-only ``supervisor-bug`` hook: at
       the first answer to its ping); before, the children were left running and the
       supervisor hung at exit waiting for them;
    2. the traceback is logged and the ordered stop runs: HTTP drained, worker stopped (model
       unloaded), every step in the log;
    3. exit code 1, no child left.
    """
    daemon = make_daemon(env={"LLM_SERVER_FAULT": "supervisor-bug"}).start()
    assert daemon.wait_exit(90) == 1
    log = daemon.log_text()
    assert "internal error in the supervisor" in log and "injected fault" in log and "Traceback" in log
    position = 0
    for step in ("serving on", "step 1/3", "http stopped", "step 2/3", "model unloaded", "exiting with code 1"):
        found = log.find(step, position)
        assert found >= 0, f"{step!r} missing after position {position}:\n{log}"
        position = found
    pids = spawned_pids(log)
    assert len(pids) == 2
    assert_gone(pids)


def test_sigint_while_a_child_is_spawned_is_not_lost(make_daemon: Callable[..., Daemon]) -> None:
    """Scenario:
    1. a Ctrl+C (SIGINT to the whole process group) arrives while the supervisor spawns the
       worker (test-only ``signal-at-spawn`` hook: sent from inside the spawn's window, so the
       timing is exact); before, the supervisor ignored SIGINT there and it was lost;
    2. the supervisor takes it as the stop: exit 0 before anything serves;
    3. the child just spawned was not killed by it (no traceback, no KeyboardInterrupt) and is
       stopped in order; nothing is left running.
    """
    daemon = make_daemon(env={"LLM_SERVER_FAULT": "signal-at-spawn"}).start()
    assert daemon.wait_exit(90) == 0
    log = daemon.log_text()
    assert "received SIGINT while starting: stopping" in log
    assert "serving on" not in log
    assert "Traceback" not in log and "KeyboardInterrupt" not in log
    assert re.search(r"model-worker \(pid \d+\) exited with code 0", log), log
    assert_gone(spawned_pids(log))
