"""Start-up, shutdown and failure scenarios of the whole daemon, as a user would see them."""

from __future__ import annotations

import collections
import json
import os
import re
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Callable

import pytest
from daemon import (
    Daemon,
    HttpResult,
    ask_in_background,
    assert_gone,
    base_config,
    cmdline,
    free_port,
    parse_response,
    port_open,
    post_and_hang_up,
    read_answer,
)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_drains_in_flight_requests_then_exits_0(make_daemon: Callable[..., Daemon], signum: int) -> None:
    """Scenario:
    1. start the daemon with long generations (max_tokens 1500);
    2. send 4 requests and wait until the log shows all 4 arrived;
    3. send the signal to the supervisor;
    4. once the supervisor logs that the listener is closed, a new connection is refused;
    5. all 4 in-flight requests get 200 with a response;
    6. the daemon exits 0, the log shows the shutdown steps in order, no process is left.
    """
    daemon = make_daemon(max_tokens=1500).start().wait_serving()
    children = daemon.descendants()
    assert len(children) >= 2
    threads, results = ask_in_background(daemon, [f"tell me a long story number {i}" for i in range(4)])
    daemon.wait_log("request from", count=4)
    daemon.signal(signum)
    daemon.wait_log("listener closed")
    refused = not port_open(daemon.port)
    for t in threads:
        t.join(180)
    assert daemon.wait_exit(120) == 0
    assert refused, "a new connection was accepted after shutdown began"
    for i in range(4):
        result = results[i]
        assert isinstance(result, HttpResult), result
        assert result.status == 200, result.body
        assert result.json()["response"]
    log = daemon.log_text()
    steps = [
        f"received {signal.Signals(signum).name}",
        "step 1/3",
        # written by two processes at the same moment (the HTTP child, the supervisor): either order
        (
            "http draining: stopped accepting, 4 request(s) in flight",
            "listener closed: 0 waiting connection(s) answered 503",
        ),
        "response 200",
        "http stopped",
        "step 2/3",
        "model unloaded",
        "step 3/3",
    ]
    position = 0
    for step in steps:  # each step (or group of concurrent ones) appears after the one before it
        found = [log.find(line, position) for line in (step if isinstance(step, tuple) else (step,))]
        assert min(found) >= 0, f"{step!r} missing after position {position}:\n{log}"
        position = max(found)
    assert "exiting with code 0" in log
    assert log.count("completion_tokens=1500") == 4  # every answer ran to the end
    assert_gone(children)


def test_drain_of_400_loses_nothing(make_daemon: Callable[..., Daemon]) -> None:
    """Scenario:
    1. 400 clients connect and send a request (the tiny model, 64 tokens each);
    2. SIGTERM as soon as the last one has sent, while many requests run and many connections
       still wait unread in the server or in the kernel's accept backlog (before: some of
       those got a connection reset);
    3. every client gets a complete HTTP answer: 200 for the requests the server took, 503 JSON
       with Retry-After for the ones it had not; none is reset; the daemon exits 0.
    """
    daemon = make_daemon(max_tokens=64, max_batch_size=32, log_level="info").start().wait_serving()
    answers: list[object] = [None] * 400
    sent = threading.Semaphore(0)

    def client(i: int) -> None:
        body = json.dumps({"prompt": f"request {i}"}).encode()
        try:
            with socket.create_connection(("127.0.0.1", daemon.port), timeout=120) as sock:
                sock.sendall(b"POST / HTTP/1.1\r\nHost: localhost\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
                sent.release()
                answers[i] = parse_response(read_answer(sock))
        except Exception as exc:  # noqa: BLE001 - a reset (or no answer) is what this test counts
            answers[i] = exc
            sent.release()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(400)]
    for t in threads:
        t.start()
    for _ in threads:
        sent.acquire(timeout=60)
    daemon.signal()
    for t in threads:
        t.join(180)
    assert daemon.wait_exit(120) == 0
    failed = [a for a in answers if not isinstance(a, HttpResult)]
    statuses = collections.Counter(a.status for a in answers if isinstance(a, HttpResult))
    assert not failed, (len(failed), failed[:3], statuses)
    assert set(statuses) <= {200, 503}, statuses
    for a in answers:
        assert isinstance(a, HttpResult) and "response" in a.json() if a.status == 200 else "Error" in a.json()
        if a.status == 503:
            assert a.headers.get("retry-after") == "1"
    print(f"drain of 400: {dict(statuses)}")


def test_client_that_hangs_up_cancels_its_generation(make_daemon: Callable[..., Daemon]) -> None:
    """Scenario:
    1. start the daemon with long generations (max_tokens 3000);
    2. a client posts a prompt and hangs up once its generation has begun;
    3. the HTTP process tells the worker, which drops the generation from the batch;
    4. the daemon goes on serving.
    """
    daemon = make_daemon(max_tokens=3000).start().wait_serving()
    post_and_hang_up(daemon, "tell me a very long story", until="sequence runs alone")
    daemon.wait_log("client went away: cancelling")
    daemon.wait_log("generation cancelled after")
    assert daemon.post_json({"prompt": "hi"}).status == 200


def test_process_titles_are_visible_in_ps(make_daemon: Callable[..., Daemon]) -> None:
    daemon = make_daemon().start().wait_serving()
    assert daemon.proc is not None
    ps = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True, check=True).stdout
    titles = {}
    for line in ps.splitlines()[1:]:
        pid, _, args = line.strip().partition(" ")
        titles[int(pid)] = args.strip()
    ours = [daemon.proc.pid, *daemon.descendants()]
    seen = {titles.get(pid) for pid in ours}
    assert {"llm-server: supervisor", "llm-server: model-worker", "llm-server: http"} <= seen, seen
    assert titles[daemon.proc.pid] == "llm-server: supervisor"


def test_model_that_fails_to_load_exits_3_without_opening_the_port(
    make_daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "no-such-architecture"}')
    port = free_port()
    daemon = make_daemon(base_config(broken, port)).start()
    opened = False
    while daemon.proc.poll() is None:
        opened = opened or port_open(port)
        time.sleep(0.05)
    assert daemon.wait_exit() == 3
    assert not opened
    log = daemon.log_text()
    assert "cannot load model" in log and "No safetensors found" in log
    assert "serving on" not in log
    assert "exit code 3" in daemon.output()


def worker_pid(daemon: Daemon) -> int:
    (pid,) = [p for p in daemon.descendants() if cmdline(p) == "llm-server: model-worker"]
    return pid


def http_pid(daemon: Daemon) -> int:
    (pid,) = [p for p in daemon.descendants() if cmdline(p) == "llm-server: http"]
    return pid


def test_http_crash_restarts_only_http(make_daemon: Callable[..., Daemon]) -> None:
    """Scenario:
    1. a long generation is in flight; the HTTP process is killed with SIGKILL;
    2. the in-flight request's connection dies with it, and the worker cancels its generation;
    3. only the HTTP process is restarted (before: the worker too, reloading the model): the
       worker's pid is unchanged and the model was loaded once;
    4. the port never closed: a request sent right after the kill waits in the backlog and
       gets 200 from the new HTTP process.
    """
    daemon = make_daemon(max_tokens=3000).start().wait_serving()
    worker = worker_pid(daemon)
    threads, results = ask_in_background(daemon, ["a long story please"])
    daemon.wait_log("request from")
    os.kill(http_pid(daemon), signal.SIGKILL)
    assert daemon.ask("are you there?", timeout=90).status == 200
    threads[0].join(30)
    assert not isinstance(results[0], HttpResult), results[0]  # its connection died with the process
    daemon.wait_log("the http process went away: cancelling its 1 request(s)")
    daemon.wait_log("generation cancelled after")
    assert worker_pid(daemon) == worker
    log = daemon.log_text()
    assert "restarting the http process" in log and log.count("model worker ready") == 1
    assert log.count("spawned model-worker") == 1
    daemon.signal()
    assert daemon.wait_exit() == 0


def test_sigterm_during_a_restart_stops_the_daemon(make_daemon: Callable[..., Daemon]) -> None:
    """Scenario:
    1. the model worker is killed: the supervisor starts restarting the children;
    2. SIGTERM arrives during the restart (before, it was taken for a "second signal", the
       restart went on and the daemon kept serving);
    3. the daemon stops in order and exits 0, and never serves again.
    """
    daemon = make_daemon().start().wait_serving()
    os.kill(worker_pid(daemon), signal.SIGKILL)
    daemon.wait_log("restarting the model worker")
    daemon.signal()
    assert daemon.wait_exit() == 0
    log = daemon.log_text()
    assert "received SIGTERM while restarting: stopping" in log
    assert log.count("serving on") == 1
    assert "killing" not in log


def test_two_signals_in_one_wake_up_kill_at_once(make_daemon: Callable[..., Daemon]) -> None:
    """Scenario:
    1. a long generation is in flight (20,000 tokens: far longer than this test waits);
    2. SIGTERM and SIGINT back to back (two different signals: the kernel merges a pending signal
       with its own repeat), so both are pending at the same wake-up (before, the second was
       dropped and the drain waited for the generation);
    3. the first starts the ordered stop, the second kills the children at once: the daemon is
       gone within seconds, exit 0, and the client gets no answer.
    """
    daemon = make_daemon(max_tokens=20_000).start().wait_serving()
    threads, results = ask_in_background(daemon, ["a very long story"])
    daemon.wait_log("request from")
    time.sleep(0.5)
    daemon.signal(signal.SIGTERM)
    daemon.signal(signal.SIGINT)
    assert daemon.wait_exit(30) == 0
    # Killed, not drained: the children died by SIGKILL and the generation never finished.
    assert "exited with code -9" in daemon.log_text() and "completion_tokens=20000" not in daemon.log_text()
    threads[0].join(10)
    assert not isinstance(results[0], HttpResult) or results[0].status != 200
    log = daemon.log_text()
    # Both pending at once: the kernel delivers them in its own order (SIGINT first, usually).
    assert re.search(r"received SIG(TERM|INT) while serving: stopping", log), log
    assert re.search(r"received SIG(TERM|INT) while (serving|stopping): killing the children now", log), log


def test_restart_budget_is_spent_then_the_daemon_gives_up(make_daemon: Callable[..., Daemon]) -> None:
    """Scenario (``worker_restarts`` 1 within ``worker_restart_window_s`` 60):
    1. the worker is killed: restarted (the one restart of the window), and it answers;
    2. killed once more within the window: no restart left, exit 5.
    That the budget refills once a restart is older than the window is the ``RestartBudget``'s,
    unit-tested with a fake clock in ``test_liveness`` (no sleeping through a window here).
    """
    daemon = make_daemon(worker_restarts=1, worker_restart_window_s=60).start().wait_serving()
    os.kill(worker_pid(daemon), signal.SIGKILL)
    daemon.wait_log("serving on", count=2, timeout=90)
    assert daemon.ask("still here?").status == 200
    os.kill(worker_pid(daemon), signal.SIGKILL)
    assert daemon.wait_exit() == 5
    assert "no restarts left (1 in the last 60 s" in daemon.log_text()


@pytest.mark.parametrize(
    ("fault", "why"),
    [
        ("engine-stall", "its MLX thread has had work without progress"),
        ("loop-stall", "its event loop has not answered a ping"),
    ],
)
def test_stuck_worker_is_dumped_killed_and_restarted(make_daemon: Callable[..., Daemon], fault: str, why: str) -> None:
    """Scenario (``worker_stall_timeout_s`` 2, test-only fault hook):
    1. a request makes the worker stuck though alive: its MLX thread blocks in a step, or its
       event loop blocks (before, the request waited 24 h and nobody noticed);
    2. within seconds the supervisor logs why, and the worker's thread stacks (faulthandler);
    3. it kills the worker: the request gets a 500, and the children are restarted;
    4. SIGTERM still stops the daemon with exit 0.
    """
    daemon = make_daemon(worker_stall_timeout_s=2, env={"LLM_SERVER_FAULT": fault}).start().wait_serving()
    result = daemon.ask("hello", timeout=60)  # a hang would raise here, not answer
    assert result.status == 500, result
    daemon.wait_log("restarting the model worker")
    log = daemon.log_text()
    assert "is stuck: " + why in log
    assert "most recent call first" in log and "worker/engine.py" in log and "worker/process.py" in log
    daemon.wait_log("serving on", count=2, timeout=90)
    daemon.signal()
    assert daemon.wait_exit() == 0


def test_request_longer_than_request_timeout_gets_503_and_is_cancelled(make_daemon: Callable[..., Daemon]) -> None:
    """Scenario (``request_timeout_s`` 2):
    1. a request whose generation takes far longer (20,000 tokens);
    2. after 2 s it is answered 503 with a JSON error (before: a fixed 24 h deadline);
    3. its generation is cancelled in the worker, and the daemon goes on serving (the next
       request is cut at the same deadline).
    """
    daemon = make_daemon(max_tokens=20_000, request_timeout_s=2).start().wait_serving()
    result = daemon.ask("a very long story", timeout=60)  # the old 24 h deadline would raise here
    assert result.status == 503 and "Error" in result.json(), result
    daemon.wait_log("generation cancelled after")
    assert daemon.ask("another long story", timeout=60).status == 503
    daemon.wait_log("generation cancelled after", count=2)


def test_internal_error_while_starting_exits_1(make_daemon: Callable[..., Daemon]) -> None:
    """Scenario: the worker hits a bug (test-only fault hook) before the model loads: exit 1
    (internal error), not 5 (worker died), with the traceback in the log."""
    daemon = make_daemon(env={"LLM_SERVER_FAULT": "internal"}).start()
    assert daemon.wait_exit() == 1
    log = daemon.log_text()
    assert "internal error while starting the model worker" in log and "Traceback" in log
    assert "serving on" not in log


def test_failure_while_preparing_the_loaded_model_exits_3(make_daemon: Callable[..., Daemon]) -> None:
    """Scenario:
    1. the model loads, then preparing it for generation fails (test-only fault hook);
    2. the daemon exits 3, as for a model that cannot be loaded, with the reason in the log.
    """
    daemon = make_daemon(env={"LLM_SERVER_FAULT": "prepare"}).start()
    assert daemon.wait_exit() == 3
    log = daemon.log_text()
    assert "cannot prepare model" in log and "injected fault" in log
    assert "serving on" not in log


def test_death_of_the_engine_thread_fails_requests_and_restarts_the_worker(
    make_daemon: Callable[..., Daemon],
) -> None:
    """Scenario:
    1. the MLX thread raises when a generation finishes, outside any decode step (test-only
       fault hook): before, the thread died silently and every request waited forever;
    2. three concurrent requests all get a 500 JSON error naming the cause, within seconds;
    3. the worker exits non-zero, the supervisor logs it and restarts the children;
    4. SIGTERM still stops the daemon with exit 0.
    """
    daemon = make_daemon(max_tokens=200, env={"LLM_SERVER_FAULT": "engine-death"}).start().wait_serving()
    threads, results = ask_in_background(daemon, ["one", "two", "three"])
    for t in threads:
        t.join(60)  # a request left waiting would leave its result missing below
    for result in results.values():
        assert isinstance(result, HttpResult) and result.status == 500, result
        assert "engine died" in result.json()["Error"] and "injected fault" in result.json()["Error"]
    daemon.wait_log("the MLX thread died")
    daemon.wait_log("died with exit code 70")
    daemon.wait_log("restarting the model worker")
    daemon.wait_log("serving on", count=2, timeout=90)
    daemon.signal()
    assert daemon.wait_exit() == 0


def test_missing_listening_port_is_logged_and_exits_2(make_daemon: Callable[..., Daemon], tiny_model: Path) -> None:
    config = base_config(tiny_model, 1)
    del config["listening_port"]
    daemon = make_daemon(config).start()
    assert daemon.wait_exit() == 2
    assert "listening_port" in daemon.log_text()


def test_missing_log_filename_goes_to_stderr_and_exits_2(make_daemon: Callable[..., Daemon], tiny_model: Path) -> None:
    config = base_config(tiny_model, 0)
    del config["log_filename"]
    daemon = make_daemon(config).start()
    assert daemon.wait_exit() == 2
    assert "log_filename" in daemon.output()
    assert not list(daemon.workdir.glob("*.log*"))


@pytest.mark.parametrize(
    ("bad", "fragment"),
    [
        ({"listening_port": 70000}, "listening_port"),
        ({"temperature": -1}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"min_p": 1.5}, "min_p"),
        ({"min_tokens_to_keep": 0}, "min_tokens_to_keep"),
        ({"log_level": "verbose"}, "log_level"),
        ({"servers": []}, "servers"),
    ],
)
def test_invalid_values_are_named_in_the_log(
    make_daemon: Callable[..., Daemon], tiny_model: Path, bad: dict, fragment: str
) -> None:
    daemon = make_daemon(base_config(tiny_model, 0, **bad)).start()
    assert daemon.wait_exit() == 2
    assert f"'{fragment}'" in daemon.log_text()


def test_port_in_use_exits_4(make_daemon: Callable[..., Daemon], tiny_model: Path) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        daemon = make_daemon(base_config(tiny_model, port)).start()
        assert daemon.wait_exit() == 4
    assert f"cannot listen on 127.0.0.1:{port}" in daemon.log_text()
    assert "spawned model-worker" not in daemon.log_text()  # failed before loading anything


def test_port_is_held_from_the_start(make_daemon: Callable[..., Daemon], tiny_model: Path) -> None:
    """Scenario: the supervisor binds the port before the model loads (before: the HTTP process
    bound it only afterwards, so another program could take it meanwhile and the daemon exited 4
    after a long load). Another program cannot bind it while the model loads, connections are
    refused until the model is loaded (start order: MCP servers, model, listen), then served."""
    daemon = make_daemon(base_config(tiny_model, free_port())).start()  # the port, known before serving
    daemon.wait_log("spawned model-worker")
    with socket.socket() as squatter, pytest.raises(OSError):
        squatter.bind(("127.0.0.1", daemon.port))
    if "serving on" not in daemon.log_text():
        assert not port_open(daemon.port)
    daemon.wait_serving()
    assert daemon.ask("hello").status == 200
    daemon.signal()
    assert daemon.wait_exit() == 0


def test_variables_come_from_environment(make_daemon: Callable[..., Daemon], tiny_model: Path) -> None:
    config = base_config("${TINY_MODEL_DIR}", 0, system_prompt="The secret is ${SECRET_WORD}.")
    daemon = make_daemon(config, env={"TINY_MODEL_DIR": str(tiny_model), "SECRET_WORD": "hunter2-env"})
    daemon.start().wait_serving()
    assert daemon.ask("hi").status == 200
    daemon.signal()
    assert daemon.wait_exit() == 0
    assert "hunter2-env" not in daemon.log_text()
    assert str(tiny_model) in daemon.log_text()  # the model name is not a secret


def test_variables_come_from_dotenv_beside_config(make_daemon: Callable[..., Daemon], tiny_model: Path) -> None:
    config = base_config("${TINY_MODEL_DIR}", 0, system_prompt="The secret is ${SECRET_WORD}.")
    daemon = make_daemon(config)
    (daemon.workdir / ".env").write_text(f"TINY_MODEL_DIR={tiny_model}\nSECRET_WORD=hunter2-dotenv\n")
    daemon.env.pop("TINY_MODEL_DIR", None)
    daemon.start().wait_serving()
    assert daemon.ask("hi").status == 200
    daemon.signal()
    assert daemon.wait_exit() == 0
    assert "hunter2-dotenv" not in daemon.log_text()
    assert sorted(p.name for p in daemon.workdir.iterdir()) == [".env", "config.json", "llm-server.log"]


def test_missing_variable_is_logged_and_exits_2(make_daemon: Callable[..., Daemon], tiny_model: Path) -> None:
    config = base_config(
        tiny_model, 0, servers={"x": {"command": "x", "env": {"TOKEN": "${NOT_SET_ANYWHERE}"}}}
    )
    daemon = make_daemon(config)
    daemon.env.pop("NOT_SET_ANYWHERE", None)
    daemon.start()
    assert daemon.wait_exit() == 2
    log = daemon.log_text()
    assert "NOT_SET_ANYWHERE" in log and "servers.x.env.TOKEN" in log


def test_log_rolls_over_to_dated_name(make_daemon: Callable[..., Daemon]) -> None:
    """Scenario: a log file last written yesterday is rolled over to NAME-YYYYMMDD when the
    daemon next writes, and the new lines go to a fresh NAME."""
    daemon = make_daemon()
    old = daemon.log_path
    old.write_text("old line from yesterday\n")
    yesterday = time.time() - 86400
    os.utime(old, (yesterday, yesterday))
    daemon.start().wait_serving()
    daemon.signal()
    assert daemon.wait_exit() == 0
    stamp = time.strftime("%Y%m%d", time.localtime(yesterday))
    rotated = old.with_name(f"{old.name}-{stamp}")
    assert rotated.read_text() == "old line from yesterday\n"
    assert "serving on" in old.read_text()
    assert not list(old.parent.glob(f"{old.name}.*"))


def test_worker_crash_fails_pending_requests_and_is_restarted(make_daemon: Callable[..., Daemon]) -> None:
    """Scenario:
    1. a request is in flight (long generation);
    2. the model worker is killed with SIGKILL;
    3. the request gets a 500 with a JSON error;
    4. while the new worker starts, the port stays open and requests get 503 JSON with
       Retry-After, from the same HTTP process (before: both children were restarted and the
       port was closed meanwhile);
    5. once the new worker is ready, a new request gets 200.
    """
    daemon = make_daemon(max_tokens=3000).start().wait_serving()
    threads, results = ask_in_background(daemon, ["a long story please"])
    daemon.wait_log("request from")
    worker = [p for p in daemon.descendants() if cmdline(p) == "llm-server: model-worker"]
    assert len(worker) == 1
    os.kill(worker[0], signal.SIGKILL)
    threads[0].join(60)
    result = results[0]
    assert isinstance(result, HttpResult) and result.status == 500, result
    assert "worker" in result.json()["Error"]
    http_before = http_pid(daemon)
    daemon.wait_log("restarting the model worker")
    unavailable = daemon.ask("are you back?")
    assert unavailable.status == 503, unavailable
    assert unavailable.headers.get("retry-after") == "1" and "restarting" in unavailable.json()["Error"]
    daemon.wait_log("serving on", count=2, timeout=90)
    assert daemon.ask("are you back?").status == 200
    assert http_pid(daemon) == http_before
    daemon.signal()
    assert daemon.wait_exit() == 0
