"""A stop at any moment of start-up, and how MCP servers are stopped, against the real daemon.

The MCP server is ``tests/servers/signal_server.py``: a real stdio server that writes down its
pid, the close of its stdin and a SIGTERM, and (as ``sh`` does) keeps a SIGTERM it inherited as
ignored. Each start-up scenario uses waits far longer than the daemon needs but far shorter than
what it waited before (the MCP start-up timeout, the model load, the 630 s kill).
"""

from __future__ import annotations

import signal
import sys
import time
from pathlib import Path
from typing import Callable

import pytest
from daemon import Daemon, assert_gone, base_config
from fake_hub import FakeHub

SIGNAL_SERVER = Path(__file__).resolve().parent / "servers" / "signal_server.py"
STOP_WAIT_S = 20  # generous; the daemon needs a few seconds, the old code minutes


def signal_servers(record: Path, start_delay: float = 0.0) -> dict[str, object]:
    args = [str(SIGNAL_SERVER), "--record", str(record), "--start-delay", str(start_delay)]
    return {"signals": {"command": sys.executable, "args": args}}


def recorded_pid(record: Path, timeout: float = 60.0) -> int:
    """The server's pid, once it has started and written it down."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if record.exists() and (lines := record.read_text().splitlines()):
            return int(lines[0].split()[1])
        time.sleep(0.05)
    raise AssertionError(f"the MCP server did not start within {timeout} s")


def ignored_signals(pid: int) -> set[int]:
    """The signals ``pid`` ignores, from ``SigIgn`` in /proc/PID/status (Linux)."""
    status = Path(f"/proc/{pid}/status")
    if not Path("/proc/self/status").exists():
        pytest.skip("needs /proc/PID/status (Linux) to read a process's ignored signals")
    mask = next(int(line.split()[1], 16) for line in status.read_text().splitlines() if line.startswith("SigIgn:"))
    return {signum for signum in range(1, 65) if mask & (1 << (signum - 1))}


def test_mcp_server_gets_sigterm_and_a_grace_at_a_normal_stop(
    make_daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    """Scenario:
    1. the daemon serves with one stdio MCP server;
    2. the server ignores neither SIGTERM nor SIGINT (before, both were ignored, inherited through
       exec from the worker, and it could only be SIGKILLed);
    3. SIGTERM to the daemon: the server's stdin is closed, and as it keeps running it gets SIGTERM
       and time to act on it (it writes it down and exits); the stop sequence is in the log;
    4. the daemon exits 0 and no process is left.
    """
    record = tmp_path / "signals.txt"
    daemon = make_daemon(servers=signal_servers(record)).start().wait_serving()
    pid = recorded_pid(record)
    assert not ignored_signals(pid) & {signal.SIGTERM, signal.SIGINT}
    children = daemon.descendants()
    daemon.signal(signal.SIGTERM)
    assert daemon.wait_exit(STOP_WAIT_S) == 0
    assert record.read_text().splitlines()[1:] == ["stdin closed", "SIGTERM"]
    log = daemon.log_text()
    assert f"mcp[signals] stopping pid {pid}: closing its stdin; SIGTERM to its process group" in log
    assert f"mcp[signals] pid {pid} exited after" in log
    assert "sending SIGKILL" not in log and "killing" not in log
    assert_gone([*children, pid])


def test_stop_while_mcp_servers_start(make_daemon: Callable[..., Daemon], tmp_path: Path) -> None:
    """Scenario:
    1. the MCP server takes minutes to start (mcp_startup_timeout_s 300);
    2. SIGINT (as Ctrl+C) once it runs (before, the worker waited out the whole start-up timeout);
    3. the start-up is abandoned, the server stopped: exit 0 within seconds, nothing left, the
       model never loaded and the port never served.
    """
    record = tmp_path / "signals.txt"
    daemon = make_daemon(servers=signal_servers(record, start_delay=600), mcp_startup_timeout_s=300).start()
    pid = recorded_pid(record)
    children = daemon.descendants()
    daemon.signal(signal.SIGINT)
    assert daemon.wait_exit(STOP_WAIT_S) == 0
    assert_gone([*children, pid])
    log = daemon.log_text()
    assert "received SIGINT while starting: stopping" in log
    assert "shutdown requested while MCP servers start: abandoning the start-up" in log
    assert "loading model" not in log and "serving on" not in log
    assert "exiting with code 0" in log


def test_stop_while_the_model_loads(make_daemon: Callable[..., Daemon], tmp_path: Path) -> None:
    """Scenario:
    1. the MCP server is up, the model load takes forever (test fault ``load-stall``);
    2. SIGTERM (before, the supervisor waited shutdown_timeout_s + 30 s and then killed the
       worker, whose MCP server was left running);
    3. the load is abandoned, the MCP server stopped (it got its SIGTERM): exit 0 within seconds,
       nothing left.
    """
    record = tmp_path / "signals.txt"
    daemon = make_daemon(servers=signal_servers(record), env={"LLM_SERVER_FAULT": "load-stall"}).start()
    daemon.wait_log("loading model")
    pid = recorded_pid(record)
    children = daemon.descendants()
    daemon.signal(signal.SIGTERM)
    assert daemon.wait_exit(STOP_WAIT_S) == 0
    assert_gone([*children, pid])
    assert record.read_text().splitlines()[1:] == ["stdin closed", "SIGTERM"]
    log = daemon.log_text()
    assert "shutdown requested while the model loads: abandoning the load" in log
    assert "stopped: start-up abandoned while the model loaded; MCP servers stopped" in log
    assert "killing" not in log and "serving on" not in log


def test_stop_during_a_download(make_daemon: Callable[..., Daemon], tmp_path: Path, tiny_model: Path) -> None:
    """Scenario:
    1. the model comes from a (stand-in) Hub that sends 64 KB every 10 s (the weights would take a minute);
    2. SIGTERM once the download is under way (before, the worker waited for the whole download
       and the load);
    3. exit 0 within seconds, no process left.
    """
    with FakeHub("acme/tiny", tiny_model, chunk_delay_s=10.0) as hub:
        config = base_config("acme/tiny", 0)
        env = {"HF_ENDPOINT": hub.endpoint, "HF_HUB_OFFLINE": "0", "HF_HUB_CACHE": str(tmp_path / "hub")}
        daemon = make_daemon(config, env=env).start()
        assert hub.sending.wait(60), daemon.log_text()
        children = daemon.descendants()
        daemon.signal(signal.SIGTERM)
        assert daemon.wait_exit(STOP_WAIT_S) == 0
        assert_gone(children)
        log = daemon.log_text()
        assert "shutdown requested while the model loads: abandoning the load" in log
        assert "model acme/tiny loaded" not in log



def test_stop_while_a_distributed_group_loads(make_daemon: Callable[..., Daemon], tmp_path: Path,
                                              tiny_model: Path) -> None:  # fmt: skip
    """Scenario:
    1. the model worker is a two-rank group (mlx.launch, loopback) with one MCP server on rank 0;
       both ranks' loads take forever (test fault ``load-stall``);
    2. SIGTERM once rank 0 loads (before, the supervisor waited shutdown_timeout_s + 30 s);
    3. rank 0 stops its MCP server and leaves; the rank still loading goes with the group: exit 0
       within seconds, no rank, launcher or MCP server left.
    """
    record = tmp_path / "signals.txt"
    distributed = {"hosts": ["127.0.0.1"], "ranks_per_host": 2, "mode": "tensor"}
    config = base_config(tiny_model, 0, servers=signal_servers(record), distributed=distributed)
    daemon = make_daemon(config, env={"LLM_SERVER_FAULT": "load-stall"}).start()
    daemon.wait_log("loading model", timeout=120)
    pid = recorded_pid(record)
    children = daemon.descendants()
    daemon.signal(signal.SIGTERM)
    assert daemon.wait_exit(STOP_WAIT_S + 10) == 0
    assert_gone([*children, pid])
    log = daemon.log_text()
    assert "shutdown requested while the model loads: abandoning the load" in log
    assert "after it stopped: killing what is left of it" in log  # the rank that still loads
    assert "exiting with code 0" in log
