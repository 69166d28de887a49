"""Tools end to end: the real daemon, a tiny model trained to call tools, real MCP servers.

Every test here goes through HTTP to a daemon subprocess whose worker starts the MCP servers,
renders their tools into the model's chat template, parses the model's native tool calls with
mlx-lm's parser, calls the servers and feeds the results back.
"""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

import pytest
from daemon import (
    Daemon,
    HttpResult,
    ask_in_background,
    assert_gone,
    base_config,
    cmdline,
    free_port,
    post_and_hang_up,
    serving,
)
from tool_model import (
    CALC_SERVER,
    MAX_TOOL_ROUNDS,
    SYSTEM_PROMPT,
    TOOL_TIMEOUT_S,
    calc_servers,
    files_servers,
    time_servers,
)


def tool_config(model: Path, servers: dict, **overrides: object) -> dict:
    settings: dict = {"tool_timeout_s": TOOL_TIMEOUT_S, "max_tool_rounds": MAX_TOOL_ROUNDS, **overrides}
    return base_config(model, 0, servers=servers, system_prompt=SYSTEM_PROMPT, max_tokens=200, **settings)


def request_lines(daemon: Daemon, request_id: str) -> list[str]:
    return [line for line in daemon.log_text().splitlines() if f" {request_id} " in line]


def ask_ok(daemon: Daemon, prompt: str) -> tuple[str, str]:
    result = daemon.ask(prompt)
    assert result.status == 200, result.body
    text = result.json()["response"]
    assert "<tool_call>" not in text and "</tool_call>" not in text
    request_id = result.headers["x-request-id"]
    assert " response 200 " in daemon.response_line(request_id)
    return text, request_id


@pytest.fixture(scope="module")
def calc_daemon(tmp_path_factory: pytest.TempPathFactory, tool_model: Path) -> Iterator[Daemon]:
    with serving(tmp_path_factory.mktemp("calc"), tool_config(tool_model, calc_servers())) as daemon:
        yield daemon


def test_model_calls_add_and_the_sum_is_in_the_response(calc_daemon: Daemon) -> None:
    text, request_id = ask_ok(calc_daemon, "What is 2 + 3?")
    assert text == "2 + 3 = 5."
    lines = "\n".join(request_lines(calc_daemon, request_id))
    assert re.search(r"tool call add server=calc duration=\d+ms outcome=ok", lines)
    assert 'tool call add arguments: {"a": 2, "b": 3}' in lines  # trace level
    assert "tool call add result: 5" in lines
    assert "tool_calls=1" in lines
    # The server's own stderr reaches the one log file, named by server.
    assert re.search(r"WARNING .*mcp\[calc\] calc server calc starting \(pid \d+, stdio\)", calc_daemon.log_text())


def test_plain_question_needs_no_tool(calc_daemon: Daemon) -> None:
    text, request_id = ask_ok(calc_daemon, "Say hello.")
    assert text == "Hello! How can I help you today?"
    assert "tool call" not in "\n".join(request_lines(calc_daemon, request_id))


def test_slow_tool_times_out_and_the_request_is_still_answered(calc_daemon: Daemon) -> None:
    text, request_id = ask_ok(calc_daemon, "Wait for 5 seconds.")
    assert text == "The wait did not finish in time."
    assert re.search(r"tool call slow server=calc duration=\d+ms outcome=timeout",
                     "\n".join(request_lines(calc_daemon, request_id)))


def test_round_limit_stops_tool_calls(calc_daemon: Daemon) -> None:
    """The model would call echo three times; max_tool_rounds=2 makes it answer after two."""
    text, request_id = ask_ok(calc_daemon, "Echo hello again and again.")
    assert text == "I echoed hello twice."  # answered in the prompt rendered without tools
    lines = "\n".join(request_lines(calc_daemon, request_id))
    assert len(re.findall(r"tool call echo server=calc .* outcome=ok", lines)) == MAX_TOOL_ROUNDS
    assert f"tool round limit ({MAX_TOOL_ROUNDS}) reached" in lines
    assert f"tool_calls={MAX_TOOL_ROUNDS}" in lines


def test_tool_result_too_large_for_the_context_is_withdrawn(calc_daemon: Daemon) -> None:
    """`big` returns more than the context window holds: the model is told, answers without tools."""
    text, request_id = ask_ok(calc_daemon, "Read me the big report.")
    assert text == "The report is too large for me to read."
    lines = "\n".join(request_lines(calc_daemon, request_id))
    assert re.search(r"tool call big server=calc .* outcome=ok", lines)
    assert "tool results do not fit the context window (16384 tokens)" in lines


def test_concurrent_tool_requests(calc_daemon: Daemon) -> None:
    prompts = ["What is 2 + 3?"] * 6 + ["Wait for 5 seconds."]
    threads, results = ask_in_background(calc_daemon, prompts)
    for t in threads:
        t.join(120)
    answers = sorted(results[i].json()["response"] for i in range(len(prompts)))  # type: ignore[attr-defined]
    assert answers == ["2 + 3 = 5."] * 6 + ["The wait did not finish in time."]


def test_sigterm_waits_for_the_tool_call_in_flight(make_daemon: Callable[..., Daemon], tool_model: Path) -> None:
    """Scenario:
    1. a request makes the model call `slow` (the 1 s tool timeout ends it);
    2. SIGTERM as soon as the request has arrived, while its tool call runs;
    3. the request is still answered 200 with the model's answer, and the daemon exits 0;
    4. the tool call finished before the MCP servers were stopped, and no server is left.
    """
    daemon = make_daemon(tool_config(tool_model, calc_servers())).start().wait_serving()
    everything = daemon.descendants()
    threads, results = ask_in_background(daemon, ["Wait for 5 seconds."])
    daemon.wait_log("request from")
    daemon.signal(signal.SIGTERM)
    threads[0].join(60)
    assert daemon.wait_exit(60) == 0
    result = results[0]
    assert isinstance(result, HttpResult) and result.status == 200, result
    assert result.json()["response"] == "The wait did not finish in time."
    log = daemon.log_text()
    assert log.index("tool call slow server=calc") < log.index("stopping MCP servers") < log.index("MCP servers stopped")
    assert_gone(everything)


def test_client_that_hangs_up_cancels_the_tool_call(make_daemon: Callable[..., Daemon], tool_model: Path) -> None:
    """Scenario:
    1. with a 30 s tool timeout, a request makes the model call `slow` for 5 s;
    2. its client hangs up while the call runs;
    3. the call is cancelled and logged as such; the server stays up and serves the next request.
    """
    daemon = make_daemon(tool_config(tool_model, calc_servers(), tool_timeout_s=30)).start().wait_serving()
    post_and_hang_up(daemon, "Wait for 5 seconds.", linger_s=1.5)
    daemon.wait_log("client went away: cancelling")
    daemon.wait_log("outcome=cancelled")
    assert re.search(r"tool call slow server=calc duration=\d+ms outcome=cancelled", daemon.log_text())
    text, _ = ask_ok(daemon, "What is 2 + 3?")
    assert text == "2 + 3 = 5."
    assert "server died" not in daemon.log_text()


def test_crash_mid_request_is_survived_and_the_server_comes_back(
    make_daemon: Callable[..., Daemon], tool_model: Path
) -> None:
    """Scenario:
    1. a request makes the model call `crash`, which kills the calc server mid-request;
    2. the request is still answered 200 and the log has the server's death;
    3. while the server is down, a request sees no calc tools (no tool call is made);
    4. the host restarts the server in the background; its tools come back and `add` works.
    """
    daemon = make_daemon(tool_config(tool_model, calc_servers())).start().wait_serving()
    text, request_id = ask_ok(daemon, "Please crash the calculator.")
    assert text == "The calculator crashed."
    log = daemon.log_text()
    assert re.search(r"tool call crash server=calc .* outcome=(dead|error)", log)
    assert "mcp[calc] server died" in log and "tools are withdrawn" in log
    up_before = log.count("mcp[calc] up")
    daemon.wait_log("mcp[calc] up", count=up_before + 1, timeout=30)
    assert "mcp[calc] restart attempt 1" in daemon.log_text()
    text, _ = ask_ok(daemon, "What is 2 + 3?")
    assert text == "2 + 3 = 5."


def test_tools_stay_withdrawn_while_the_server_cannot_restart(
    make_daemon: Callable[..., Daemon], tool_model: Path, tmp_path: Path
) -> None:
    """Scenario: the calc server starts once, then every restart fails (its launcher refuses to
    run twice). After `crash`, later requests are rendered without its tools: the model makes
    no tool call, the request is still answered, and each failed restart is logged."""
    marker = tmp_path / "started-once"
    launcher = f'[ -e "{marker}" ] && exit 1; touch "{marker}"; exec "{sys.executable}" "{CALC_SERVER}"'
    servers = {"calc": {"command": "sh", "args": ["-c", launcher]}}
    daemon = make_daemon(tool_config(tool_model, servers)).start().wait_serving()
    ask_ok(daemon, "Please crash the calculator.")
    daemon.wait_log("tools are withdrawn")
    daemon.wait_log("mcp[calc] restart attempt 1")
    text, request_id = ask_ok(daemon, "What is 2 + 3?")
    assert text == "I cannot add right now."  # the model was shown no tools
    lines = "\n".join(request_lines(daemon, request_id))
    assert "tool_calls=0" in lines and "tool call add" not in lines
    daemon.wait_log("mcp[calc] failed to start", count=1)


def test_real_time_server(make_daemon: Callable[..., Daemon], tool_model: Path) -> None:
    daemon = make_daemon(tool_config(tool_model, time_servers())).start().wait_serving()
    text, request_id = ask_ok(daemon, "What time is it in Tokyo when it is 12:00 in UTC?")
    assert "21:00" in text
    assert re.search(r"tool call convert_time server=time .* outcome=ok", "\n".join(request_lines(daemon, request_id)))


def test_real_filesystem_server(make_daemon: Callable[..., Daemon], tool_model: Path, files_folder: Path) -> None:
    daemon = make_daemon(tool_config(tool_model, files_servers(files_folder))).start().wait_serving()
    text, request_id = ask_ok(daemon, "What does notes.txt say?")
    assert "4242" in text
    assert re.search(r"tool call read_text_file server=files .* outcome=ok",
                     "\n".join(request_lines(daemon, request_id)))
    text, request_id = ask_ok(daemon, "Which files are in the folder?")
    assert "notes.txt" in text
    assert "tool call list_directory server=files" in "\n".join(request_lines(daemon, request_id))


def test_servers_that_fail_to_start_are_skipped(make_daemon: Callable[..., Daemon], tool_model: Path) -> None:
    servers = {
        **calc_servers(),
        "missing": {"command": "/nonexistent/mcp-server"},
        "hangs": {"command": "sleep", "args": ["600"]},
    }
    daemon = make_daemon(tool_config(tool_model, servers, mcp_startup_timeout_s=3)).start().wait_serving()
    log = daemon.log_text()
    assert "mcp[missing] failed to start" in log
    assert "mcp[hangs] failed to start" in log
    text, _ = ask_ok(daemon, "What is 2 + 3?")
    assert text == "2 + 3 = 5."


def test_streamable_http_server(make_daemon: Callable[..., Daemon], tool_model: Path) -> None:
    port = free_port()
    server = subprocess.Popen([sys.executable, str(CALC_SERVER), "--transport", "streamable-http", "--port", str(port)],
                              stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                time.sleep(0.1)
        servers = {"calc": {"type": "http", "url": f"http://127.0.0.1:{port}/mcp"}}
        daemon = make_daemon(tool_config(tool_model, servers)).start().wait_serving()
        text, _ = ask_ok(daemon, "What is 2 + 3?")
        assert text == "2 + 3 = 5."
    finally:
        server.kill()
        server.wait(10)


def test_no_mcp_process_left_after_sigterm(
    make_daemon: Callable[..., Daemon], tool_model: Path, files_folder: Path
) -> None:
    servers = {**calc_servers(), **time_servers(), **files_servers(files_folder)}
    daemon = make_daemon(tool_config(tool_model, servers)).start().wait_serving()
    everything = daemon.descendants()
    mcp = [p for p in everything if "calc_server" in cmdline(p) or "mcp_server_time" in cmdline(p)
           or "mcp-server-filesystem" in cmdline(p)]
    assert len(mcp) >= 3, [cmdline(p) for p in everything]
    daemon.signal(signal.SIGTERM)
    assert daemon.wait_exit(60) == 0
    assert_gone(everything, grace_s=10)
    assert "MCP servers stopped" in daemon.log_text()
