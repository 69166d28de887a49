"""The console: progress lines on stderr, read from a pseudo-terminal and from a pipe.

The model comes from a stand-in Hugging Face Hub (``fake_hub``), so the download's progress is
shown too; one MCP server starts and one cannot.
"""

from __future__ import annotations

import os
import pty
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

from daemon import Daemon, base_config, free_port
from fake_hub import FakeHub
from tool_model import CALC_SERVER

SERVERS = {
    "calc": {"command": sys.executable, "args": [str(CALC_SERVER), "--name", "calc"]},
    "broken": {"command": "no-such-mcp-server-command"},
}


def hub_daemon(
    make_daemon: Callable[..., Daemon], tmp_path: Path, hub: FakeHub, name: str, **settings: object
) -> Daemon:
    # A port known before the start: at log_level "error" no "serving on" line tells it.
    config = base_config("acme/tiny", free_port(), servers=SERVERS, mcp_startup_timeout_s=20, **settings)
    env = {"HF_ENDPOINT": hub.endpoint, "HF_HUB_OFFLINE": "0", "HF_HUB_CACHE": str(tmp_path / f"hub-{name}")}
    return make_daemon(config, env=env, name=name)


def run_on_terminal(daemon: Daemon, *args: str) -> str:
    """Run the daemon with a pseudo-terminal as stdin, stdout and stderr; stop it with SIGTERM
    once it listens; return everything it wrote."""
    main, secondary = pty.openpty()
    daemon.proc = subprocess.Popen(
        [sys.executable, "-m", "llm_server", *args], cwd=daemon.workdir, env=daemon.env,
        stdin=secondary, stdout=secondary, stderr=secondary, start_new_session=True,
    )  # fmt: skip
    os.close(secondary)
    chunks: list[bytes] = []

    def read() -> None:
        while True:
            try:
                data = os.read(main, 4096)
            except OSError:
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    deadline = time.monotonic() + 120
    while b"listening on" not in b"".join(chunks) and time.monotonic() < deadline:
        assert daemon.proc.poll() is None, b"".join(chunks).decode(errors="replace")
        time.sleep(0.1)
    daemon.signal()
    assert daemon.wait_exit() == 0
    reader.join(10)
    os.close(main)
    return b"".join(chunks).decode(errors="replace")


def assert_story(text: str, port: int) -> None:
    """Every step, in order."""
    steps = [
        "llm-server: starting: config ",
        "llm-server: MCP server calc: up, 6 tool(s)",
        "llm-server: MCP server broken: down: command not found: 'no-such-mcp-server-command'",
        "llm-server: loading model acme/tiny",
        "llm-server: downloading acme/tiny: ",
        "llm-server: model loaded: acme/tiny (context window 16384 tokens)",
        f"llm-server: listening on http://127.0.0.1:{port} (model acme/tiny, 6 tool(s))",
        "llm-server: stopping (received SIGTERM): closing the listener",
        "llm-server: stopping the model worker",
        "llm-server: stopped (exit code 0)",
    ]
    position = 0
    for step in steps:
        found = text.find(step, position)
        assert found >= 0, f"{step!r} missing after position {position}:\n{text}"
        position = found


def test_console_on_a_terminal(make_daemon: Callable[..., Daemon], tmp_path: Path, tiny_model: Path) -> None:
    """In a terminal, with ``log_level`` at error, a start prints what it did, the download's
    progress is rewritten in place, and the stop prints each step."""
    with FakeHub("acme/tiny", tiny_model, chunk_delay_s=0.01) as hub:
        daemon = hub_daemon(make_daemon, tmp_path, hub, "tty", log_level="error")
        text = run_on_terminal(daemon)
    assert_story(text, daemon.port)
    assert "\r\x1b[Kllm-server: downloading acme/tiny: " in text
    assert "of 0.4 MB" in text.split("model loaded")[0]


def test_console_without_a_terminal_is_plain(make_daemon: Callable[..., Daemon], tmp_path: Path,
                                              tiny_model: Path) -> None:  # fmt: skip
    """Under a service manager (a pipe, no terminal): the same lines, plain; ``--quiet``: none."""
    with FakeHub("acme/tiny", tiny_model) as hub:
        daemon = hub_daemon(make_daemon, tmp_path, hub, "pipe").start().wait_serving()
        daemon.signal()
        assert daemon.wait_exit() == 0
        text = daemon.output()
        assert_story(text, daemon.port)
        assert "\x1b" not in text and "\r" not in text
        assert text.count("downloading acme/tiny") <= 11  # at most every 10 %

        quiet = hub_daemon(make_daemon, tmp_path, hub, "quiet")
        quiet.proc = subprocess.Popen(
            [sys.executable, "-m", "llm_server", "--quiet"], cwd=quiet.workdir, env=quiet.env,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
        )  # fmt: skip
        quiet.wait_serving()
        quiet.signal()
        assert quiet.wait_exit() == 0
        assert quiet.output() == ""
