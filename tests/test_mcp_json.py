"""mcp.json as people write it, and pushing back when full: end to end with the real daemon and
the real test MCP server (the untrained tiny model: these tests read the log, not the answers)."""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path
from typing import Any, Callable

from daemon import Daemon, ask_in_background, base_config
from tool_model import BIG_REPORT_CHARS, CALC_SERVER, MAX_TOOL_ROUNDS, SYSTEM_PROMPT, calc_servers


def calc(name: str, **extra: Any) -> dict[str, Any]:
    return {"command": sys.executable, "args": [str(CALC_SERVER), "--name", name], **extra}


def test_mcp_json_keys(make_daemon: Callable[..., Daemon], tiny_model: Path) -> None:
    """Scenario: the block is named ``mcpServers`` (as Claude Desktop and Cursor write it):
    1. a ``disabled`` server and an ``enabled: false`` one never start: no process, logged;
    2. ``allowedTools`` leaves the model only those tools (the trace line listing the tools
       offered), and a name in it that the server does not have is warned about;
    3. ``envFile`` reaches the server's environment (the calc server prints it at start);
    4. an unknown per-server key is warned about, not fatal.
    """
    config = base_config(tiny_model, 0)
    del config["servers"]
    config["mcpServers"] = {
        "calc": calc("calc", allowedTools=["add", "echo", "subtract"], envFile="calc.env", note="mine"),
        "off": calc("off", disabled=True),
        "also-off": calc("also-off", enabled=False),
    }
    daemon = make_daemon(config)
    (daemon.workdir / "calc.env").write_text("CALC_GREETING=ahoy\n")
    daemon.start().wait_serving()
    assert daemon.ask("hello").status == 200
    log = daemon.log_text()
    assert "mcp[off] disabled in the config: not started" in log
    assert "mcp[also-off] disabled in the config: not started" in log
    assert "calc server off" not in log and "calc server also-off" not in log  # never started
    assert "tools offered: add, echo" in log
    assert "mcp[calc] allowedTools names 'subtract', which the server does not offer" in log
    assert re.search(r"mcp\[calc\] calc server calc starting \(pid \d+, stdio, greeting ahoy\)", log)
    assert "'mcpServers.calc': unknown key 'note' is ignored" in log
    daemon.signal()
    assert daemon.wait_exit() == 0


def test_servers_and_mcp_servers_together_is_a_config_error(make_daemon: Callable[..., Daemon],
                                                             tiny_model: Path) -> None:  # fmt: skip
    config = {**base_config(tiny_model, 0), "mcpServers": {}}
    daemon = make_daemon(config).start()
    assert daemon.wait_exit() == 2
    assert "'servers' and 'mcpServers' name the same thing" in daemon.log_text()


def test_backpressure(make_daemon: Callable[..., Daemon]) -> None:
    """Scenario (``max_pending_requests`` 4): four long generations are in flight; a fifth
    request gets 503 with ``Retry-After`` at once (logged) instead of queueing; once the four
    are answered, requests are served again."""
    daemon = make_daemon(max_pending_requests=4, max_tokens=2500).start().wait_serving()
    threads, results = ask_in_background(daemon, [f"long story {i}" for i in range(4)])
    daemon.wait_log("request from", count=4)
    time.sleep(0.3)
    refused = daemon.ask("one more")
    assert refused.status == 503
    assert all(t.is_alive() for t in threads)  # answered while the four still ran: not queued behind them
    assert refused.headers["retry-after"] == "1" and "max_pending_requests" in refused.json()["Error"]
    daemon.wait_log("4 requests pending (max_pending_requests): answering 503")
    for t in threads:
        t.join(180)
    assert all(getattr(results[i], "status", None) == 200 for i in range(4)), results
    assert daemon.ask("and now?").status == 200


def test_result_cap_and_server_timeout_with_the_tool_model(make_daemon: Callable[..., Daemon], tool_model: Path) -> None:
    """Scenario (the tiny model trained to call the calc server's tools): the calc server has
    its own ``timeout`` of 1 s, and ``max_tool_result_chars`` is 2,000:
    1. "Wait for 5 seconds." makes the model call ``slow``: it times out after 1 s, not after
       ``tool_timeout_s``;
    2. "Read me the big report." makes it call ``big``: the result is cut to 2,000 characters
       (logged), and the request is answered."""
    servers = {"calc": {**calc_servers()["calc"], "timeout": 1}}
    config = base_config(tool_model, 0, servers=servers, system_prompt=SYSTEM_PROMPT, max_tokens=200,
                         tool_timeout_s=30, max_tool_rounds=MAX_TOOL_ROUNDS, max_tool_result_chars=2000)  # fmt: skip
    daemon = make_daemon(config).start().wait_serving()
    assert daemon.ask("Wait for 5 seconds.").status == 200
    daemon.wait_log("tool call slow server=calc")
    assert re.search(r"tool call slow server=calc duration=\d+ms outcome=timeout", daemon.log_text())
    assert "tool 'slow' timed out after 1s" in daemon.log_text()  # the server's own timeout, not 30 s
    assert daemon.ask("Read me the big report.").status == 200
    daemon.wait_log(f"tool call big result cut from {BIG_REPORT_CHARS} to 2000 characters (max_tool_result_chars)")
