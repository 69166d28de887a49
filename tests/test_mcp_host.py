"""End-to-end tests of the MCP host against real MCP servers (no mocks).

The servers: ``tests/servers/calc_server.py`` over stdio, SSE and streamable HTTP, the PyPI
``mcp-server-time`` and the npm ``@modelcontextprotocol/server-filesystem``. Each test runs its
own event loop with ``asyncio.run`` (the worker's loop is plain asyncio too).
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # until the project has a conftest.py

from daemon import pid_alive  # noqa: E402
from llm_server.common.servers import parse_servers  # noqa: E402
from llm_server.model_worker.mcp_host import MCPHost, ToolResult, exposed_name  # noqa: E402

CALC = str(REPO / "tests" / "servers" / "calc_server.py")
CALC_TOOLS = ["add", "echo", "slow", "big", "crash", "fail"]
FS_PACKAGE = "@modelcontextprotocol/server-filesystem@2026.8.31"
FS_SERVER = REPO / ".test-deps" / "npm" / "node_modules" / ".bin" / "mcp-server-filesystem"
LOGGER = "llm_server.mcp"
# Generous: a Python MCP server needs ~1.5 s just to import the SDK on a small machine.
STARTUP_S = 30.0


def calc(name: str = "calc") -> dict[str, Any]:
    return {"command": sys.executable, "args": [CALC, "--name", name]}


def names(host: MCPHost) -> list[str]:
    return [spec["function"]["name"] for spec in host.tools()]


def messages(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER]


def logged(caplog: pytest.LogCaptureFixture, pattern: str, level: int | None = None) -> bool:
    return any(
        re.search(pattern, r.getMessage()) and (level is None or r.levelno == level)
        for r in caplog.records
        if r.name == LOGGER
    )


async def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.05)


def run(coro: Awaitable[None]) -> None:
    asyncio.run(coro)  # type: ignore[arg-type]


@pytest.fixture
def caplog(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(5, logger=LOGGER)  # TRACE: arguments and results
    return caplog


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes of a process group."""
    members = []
    for process in psutil.process_iter():
        try:
            if os.getpgid(process.pid) == pgid and pid_alive(process.pid):
                members.append(process.pid)
        except (ProcessLookupError, PermissionError):
            continue
    return members

def test_stdio_calc_server(caplog: pytest.LogCaptureFixture) -> None:
    """Tools are listed as function specs; results, tool errors, timeouts and stderr are reported.

    1. Start the calc server over stdio with a 1 s tool timeout, listing its tools two per page.
    2. ``add(2, 3)`` answers "5"; ``fail`` is an is_error result; ``slow(5)`` times out.
    3. Unknown tools are errors too; every call is logged at INFO, arguments at TRACE.
    4. The server's stderr line is in the log under its name.
    """

    async def scenario() -> None:
        paged = {"command": sys.executable, "args": [CALC, "--page-size", "2"]}
        async with MCPHost(parse_servers({"calc": paged}), startup_timeout_s=STARTUP_S, tool_timeout_s=1.0) as host:
            assert names(host) == CALC_TOOLS
            spec = host.tools()[0]
            assert spec["type"] == "function"
            assert spec["function"]["description"] == "Add two integers."
            assert set(spec["function"]["parameters"]["properties"]) == {"a", "b"}

            result = await host.call_tool("add", {"a": 2, "b": 3})
            assert result == ToolResult("5", False, "calc", "add", result.duration_s)
            assert (await host.call_tool("echo", {"text": "héllo"})).text == "héllo"

            failed = await host.call_tool("fail", {})
            assert failed.is_error and "fail was called" in failed.text

            started = time.monotonic()
            slow = await host.call_tool("slow", {"seconds": 60})
            assert slow.is_error and "timed out" in slow.text
            # Functional, not a speed goal: the 1 s timeout fired, long before the tool's 60 s.
            assert 0.9 < time.monotonic() - started < 30

            unknown = await host.call_tool("nope", {})
            assert unknown.is_error and "unknown tool 'nope'" in unknown.text
            assert host.status()["calc"].state == "up"

    run(scenario())
    assert logged(caplog, r"^tool call add server=calc duration=\d+ms outcome=ok$", logging.INFO)
    assert logged(caplog, r"^tool call fail server=calc .* outcome=error$", logging.INFO)
    assert logged(caplog, r"^tool call slow server=calc .* outcome=timeout$", logging.INFO)
    assert logged(caplog, r'^tool call add arguments: \{"a": 2, "b": 3\}$', 5)
    assert logged(caplog, r"^tool call add result: 5$", 5)
    assert logged(caplog, r"^mcp\[calc\] calc server calc starting \(pid \d+, stdio\)$", logging.WARNING)


def test_tool_list_changes_are_followed(caplog: pytest.LogCaptureFixture) -> None:
    """A server that adds a tool and sends tools/list_changed: the host lists again, and the new
    tool can be called."""

    async def scenario() -> None:
        grows = {"command": sys.executable, "args": [CALC, "--grow"]}
        async with MCPHost(parse_servers({"calc": grows}), startup_timeout_s=STARTUP_S) as host:
            assert "mul" not in names(host)
            assert (await host.call_tool("grow", {})).text == "mul added"
            await wait_until(lambda: "mul" in names(host), 15, "the new tool to be listed")
            assert (await host.call_tool("mul", {"a": 6, "b": 7})).text == "42"

    run(scenario())
    assert logged(caplog, r"^mcp\[calc\] tool list changed: 8 tools$", logging.INFO)


def test_crash_withdraws_tools_and_restarts(caplog: pytest.LogCaptureFixture) -> None:
    """A crashed server is reported, its tools leave at once, and it comes back.

    1. Start the calc server with restart on (backoff 0.5 s).
    2. ``crash`` → is_error result, outcome dead; tools() is empty right away; ERROR logged.
    3. Within a few seconds the server is up again with its tools, and ``add`` works.
    """

    async def scenario() -> None:
        async with MCPHost(
            parse_servers({"calc": calc()}), startup_timeout_s=STARTUP_S, restart_backoff_s=(0.5, 4.0)
        ) as host:
            first_pid = host.status()["calc"].pid
            crashed = await host.call_tool("crash", {})
            assert crashed.is_error and crashed.server == "calc"
            assert names(host) == []
            assert host.status()["calc"].state in ("down", "starting")
            dead = await host.call_tool("add", {"a": 1, "b": 1})
            assert dead.is_error and "not running" in dead.text

            await wait_until(lambda: names(host) == CALC_TOOLS, 15, "the calc server to come back")
            assert (await host.call_tool("add", {"a": 2, "b": 3})).text == "5"
            status = host.status()["calc"]
            assert status.restarts == 1 and status.pid != first_pid

    run(scenario())
    assert logged(caplog, r"^mcp\[calc\] server died: .*connection closed", logging.ERROR)
    assert logged(caplog, r"^tool call crash server=calc .* outcome=dead$")
    assert logged(caplog, r"^mcp\[calc\] restart attempt 1 in 0\.5s$", logging.WARNING)
    assert logged(caplog, r"^mcp\[calc\] up after 1 restart attempt\(s\): 6 tools", logging.INFO)


def test_bad_servers_are_skipped(caplog: pytest.LogCaptureFixture) -> None:
    """Servers that cannot start are logged and skipped; startup waits for none of them.

    1. Configure a good calc server, a missing command and a server that never answers (startup
       timeout 2 s). (Invalid entries never get here: the config rejects them, see test_config.)
    2. Entering returns after about the startup timeout, never raises.
    3. Each failure is logged with its reason; the calc server works; retries are logged.
    """
    servers: dict[str, dict[str, Any]] = {
        "missing": {"command": "no-such-mcp-server-command"},
        "hang": {"command": sys.executable, "args": ["-c", "import time; time.sleep(600)"]},
        "calc": calc(),
    }

    async def scenario() -> None:
        started = time.monotonic()
        async with MCPHost(parse_servers(servers), startup_timeout_s=2.0, restart_backoff_s=(0.5, 1.0)) as host:
            assert time.monotonic() - started < 30  # the 2 s startup timeout, not `sleep 600`
            status = host.status()
            assert status["missing"].state in ("down", "starting")
            assert status["hang"].state in ("down", "starting")
            # On a slow machine the calc server can miss its first 2 s window; it is retried.
            await wait_until(lambda: host.status()["calc"].state == "up", 20, "the calc server")
            assert names(host) == CALC_TOOLS
            assert (await host.call_tool("add", {"a": 2, "b": 3})).text == "5"
            await wait_until(lambda: logged(caplog, r"^mcp\[missing\] restart attempt 2 "), 10, "a second retry")
            hang_pid = host.status()["hang"].pid
        assert hang_pid is None or not group_members(hang_pid)

    run(scenario())
    assert logged(
        caplog, r"^mcp\[missing\] failed to start: command not found: 'no-such-mcp-server-command'$", logging.ERROR
    )
    assert logged(caplog, r"^mcp\[hang\] failed to start: no answer within the startup timeout \(2s\)$", logging.ERROR)
    assert logged(caplog, r"^mcp\[missing\] restart attempt 1 in 0\.5s$", logging.WARNING)


def test_name_collisions() -> None:
    """Names offered by several live servers get a `<server>_<tool>` prefix, and lose it again.

    1. Start two calc servers (the second with a name that needs sanitizing), restart off.
    2. Every tool is exposed twice, prefixed, in config order; both answer; a bare name is an
       error that lists the candidates.
    3. Crash the second: the first server's tools get their plain names back.
    """
    servers = {"calc": calc("calc"), "calc two.v2": calc("calc-two")}

    async def scenario() -> None:
        async with MCPHost(parse_servers(servers), startup_timeout_s=STARTUP_S, restart=False) as host:
            assert names(host) == [f"calc_{t}" for t in CALC_TOOLS] + [f"calc_two_v2_{t}" for t in CALC_TOOLS]
            first = await host.call_tool("calc_add", {"a": 2, "b": 3})
            second = await host.call_tool("calc_two_v2_echo", {"text": "hi"})
            assert (first.text, first.server, first.tool) == ("5", "calc", "add")
            assert (second.text, second.server, second.tool) == ("hi", "calc two.v2", "echo")
            bare = await host.call_tool("add", {"a": 1, "b": 2})
            assert bare.is_error and "calc_add, calc_two_v2_add" in bare.text

            await host.call_tool("calc_two_v2_crash", {})
            assert names(host) == CALC_TOOLS
            assert (await host.call_tool("add", {"a": 2, "b": 3})).text == "5"
            # The prefixed name the model saw a moment ago still reaches the live server.
            assert (await host.call_tool("calc_add", {"a": 2, "b": 2})).text == "4"
            await wait_until(lambda: host.status()["calc two.v2"].state == "failed", 5, "no restart")

    run(scenario())


def test_exposed_name_rule() -> None:
    assert exposed_name("time", "now") == "time_now"
    assert exposed_name("my server.v2", "add") == "my_server_v2_add"
    assert exposed_name("α/β", "x") == "____x"  # noqa: RUF001 - three characters replaced, then "_"
    assert len(exposed_name("s" * 80, "tool")) == 64


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def network_calc(request: pytest.FixtureRequest) -> Iterator[str]:
    """The calc server as a subprocess on a free loopback port; yields its URL."""
    transport: str = request.param
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, CALC, "--transport", transport, "--port", str(port), "--name", f"calc-{transport}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + STARTUP_S
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                assert proc.poll() is None, f"calc server ({transport}) exited with {proc.returncode}"
                assert time.monotonic() < deadline, f"calc server ({transport}) did not listen on {port}"
                time.sleep(0.05)
        yield f"http://127.0.0.1:{port}" + ("/sse" if transport == "sse" else "/mcp")
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize(
    ("network_calc", "kind"), [("sse", "sse"), ("streamable-http", "http"), ("streamable-http", "streamable-http")],
    indirect=["network_calc"],
)  # fmt: skip
def test_network_transports(network_calc: str, kind: str) -> None:
    """SSE and streamable HTTP reach the same calc server tools as stdio."""

    async def scenario() -> None:
        async with MCPHost(
            parse_servers({"net": {"type": kind, "url": network_calc}}), startup_timeout_s=STARTUP_S
        ) as host:
            assert names(host) == CALC_TOOLS
            assert (await host.call_tool("add", {"a": 2, "b": 3})).text == "5"
            failed = await host.call_tool("fail", {})
            assert failed.is_error and "fail was called" in failed.text

    run(scenario())


def test_time_server_from_pypi() -> None:
    """The PyPI `mcp-server-time`, run as a module with the test interpreter."""
    servers = {"time": {"command": sys.executable, "args": ["-m", "mcp_server_time", "--local-timezone", "UTC"]}}

    async def scenario() -> None:
        async with MCPHost(parse_servers(servers), startup_timeout_s=STARTUP_S) as host:
            assert {"get_current_time", "convert_time"} <= set(names(host))
            args = {"source_timezone": "UTC", "time": "12:00", "target_timezone": "Asia/Tokyo"}
            result = await host.call_tool("convert_time", args)
            assert not result.is_error, result.text
            assert "+9.0h" in result.text and "T21:00:00+09:00" in result.text
            bad = await host.call_tool("get_current_time", {"timezone": "Mars/Olympus_Mons"})
            assert bad.is_error and "Invalid timezone" in bad.text

    run(scenario())


def filesystem_server() -> str:
    """The npm filesystem server, installed for the tests; missing is a failure, not a skip."""
    path = os.environ.get("LLM_SERVER_FS_SERVER") or str(FS_SERVER)
    if not os.access(path, os.X_OK):
        pytest.fail(
            f"{path} not found: install the test dependency with\n"
            f"  npm install --prefix {REPO / '.test-deps' / 'npm'} {FS_PACKAGE}\n"
            "or point LLM_SERVER_FS_SERVER at an mcp-server-filesystem executable."
        )
    return path


def test_filesystem_server_from_npm(tmp_path: Path) -> None:
    """The npm `@modelcontextprotocol/server-filesystem` on a temp folder (node launched via PATH)."""
    (tmp_path / "hello.txt").write_text("hello from the test\n")
    (tmp_path / "sub").mkdir()
    servers = {"fs": {"command": filesystem_server(), "args": [str(tmp_path)]}}

    async def scenario() -> None:
        async with MCPHost(parse_servers(servers), startup_timeout_s=STARTUP_S) as host:
            assert {"list_directory", "read_text_file"} <= set(names(host))
            listing = await host.call_tool("list_directory", {"path": str(tmp_path)})
            assert not listing.is_error, listing.text
            assert "[FILE] hello.txt" in listing.text and "[DIR] sub" in listing.text
            content = await host.call_tool("read_text_file", {"path": str(tmp_path / "hello.txt")})
            assert content.text == "hello from the test\n"
            outside = await host.call_tool("read_text_file", {"path": "/etc/passwd"})
            assert outside.is_error

    run(scenario())


def test_no_process_survives(caplog: pytest.LogCaptureFixture) -> None:
    """Every server process and its children are gone after close, whatever they do.

    1. "spawner": a shell that starts a background `sleep` (holding the server's stdout and
       stderr) and then execs the calc server, which exits when stdin closes.
    2. "stubborn": a shell that runs the calc server and then sleeps, ignoring stdin's close.
    3. "crasher": like spawner; its crash leaves the child holding stdout, so no EOF comes:
       the death is noticed from the pid instead, quickly, and the child is killed.
    4. After close, no process of any of the three groups remains.
    """
    spawn = f'sleep 300 & echo "child $!" >&2; exec {sys.executable} {CALC} --name "$0"'
    servers = {
        "spawner": {"command": "sh", "args": ["-c", spawn, "spawner"]},
        "stubborn": {"command": "sh", "args": ["-c", f"{sys.executable} {CALC} --name stubborn; sleep 300"]},
        "crasher": {"command": "sh", "args": ["-c", spawn, "crasher"]},
    }

    async def scenario() -> list[int]:
        async with MCPHost(
            parse_servers(servers), startup_timeout_s=STARTUP_S, tool_timeout_s=20, restart=False
        ) as host:
            assert all(s.state == "up" for s in host.status().values()), host.status()
            groups = [s.pid for s in host.status().values() if s.pid is not None]
            assert len(groups) == 3
            started = time.monotonic()
            crashed = await host.call_tool("crasher_crash", {})
            assert crashed.is_error and time.monotonic() - started < 3.0
            await wait_until(lambda: host.status()["crasher"].state == "failed", 5, "the crasher to be given up")
            await wait_until(lambda: not group_members(groups[2]), 5, "the crasher's child to be killed")
            closing = time.monotonic()
        # The stubborn shell costs the SDK's 2 s grace before it signals the group.
        assert time.monotonic() - closing < 9.0
        return groups

    groups = asyncio.run(scenario())
    children = [
        int(m) for m in re.findall(r"^mcp\[(?:spawner|crasher)\] child (\d+)$", "\n".join(messages(caplog)), re.M)
    ]
    assert len(children) == 2
    for pid in [*groups, *children]:
        assert not pid_alive(pid), f"process {pid} survived the host"
    for pgid in groups:
        assert not group_members(pgid), f"process group {pgid} survived the host"
    assert logged(caplog, r"^mcp\[crasher\] server died: server process \d+ exited", logging.ERROR)


def test_per_server_timeout_and_result_cap(caplog: pytest.LogCaptureFixture) -> None:
    """A server's own ``timeout`` wins over ``tool_timeout_s``; a result longer than
    ``max_result_chars`` keeps its head and tail with a marker between (logged)."""
    servers = parse_servers({"calc": {**calc(), "timeout": 1}})

    async def scenario() -> None:
        async with MCPHost(servers, startup_timeout_s=STARTUP_S, tool_timeout_s=60, max_result_chars=1000) as host:
            slow = await host.call_tool("slow", {"seconds": 5})
            assert slow.is_error and "timed out after 1s" in slow.text
            big = await host.call_tool("big", {"size": 5000})
            assert len(big.text) == 1000 and "characters cut ...]" in big.text
            assert big.text.startswith("Row 000000: ") and "Row 000" in big.text[-60:]

    run(scenario())
    assert logged(caplog, r"^tool call big result cut from 5000 to 1000 characters", logging.WARNING)
