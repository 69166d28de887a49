"""The MCP host: the model worker's connections to the MCP servers of mcp.json, and their tools.

Ownership. Every MCP connection of the worker lives here. Each configured server gets one
long-lived asyncio task (``_ServerRunner.run``) that opens its transport and ``ClientSession``,
keeps them while the server lives and closes them again, because anyio cancel scopes must be
entered and left by the same task. Other tasks only *call* the session that task published.
The host also owns the processes of stdio servers: each runs in its own process group (the
SDK starts it with ``start_new_session``), and whatever is left of that group when a connection
ends is killed, so children that outlive the server (``npx`` → ``node``, ``sh -c``) go too. It
owns their stderr pipes as well: a thread per server logs each line as ``mcp[<server>] <line>``.

Failure policy. A server that cannot start (missing command, crash, no answer within the
startup timeout, bad URL) is logged and skipped; the others carry on. A server that dies is
logged, its tools leave ``tools()`` at once, and (with ``restart``) it is started again in the
background with exponential backoff; a server that failed at start is retried the same way.
A stdio server's death is seen when its stdout closes, or within `WATCH_INTERVAL_S` of its
process exiting (a child may hold stdout open); an SSE server's when its event stream breaks;
a streamable-HTTP server's only at the next request, which then answers is_error.
Tool calls never raise and are never retried (tools have side effects): every failure comes
back as a ``ToolResult`` with ``is_error=True``. Invalid server entries are not retried.

Tool names. A tool keeps its own name while it is the only live server offering that name. When
two or more live servers offer the same name, each of those tools is exposed as
``<server>_<tool>``, the server name reduced to ``[A-Za-z0-9_-]`` and the whole name cut to 64
characters. Names are recomputed whenever a server comes up or goes down; ``call_tool`` also
accepts ``<server>_<tool>`` at any time, so a name the model saw a moment ago keeps working.
Should a generated name still clash, the later tool is left out (logged). Order: servers in
config order, then each server's own order.

POSIX only (the stdio launcher uses ``/bin/sh``), like the rest of the daemon.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import enum
import json
import logging
import os
import re
import shutil
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import anyio
import httpx2
import mcp_types as types
from mcp.client.session import ClientSession, IncomingMessage
from mcp.client.sse import sse_client
from mcp.client.stdio import StdioServerParameters, stdio_client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError

from supervisor.logs import TRACE

logger = logging.getLogger("llm_server.mcp")

CLIENT_INFO = types.Implementation(name="llm-server", version="0.1.0")

# Whole-host close: every server gets this long to shut down before its task is cancelled.
CLOSE_TIMEOUT_S = 10.0
# Members of a server's process group left after the connection closed get SIGTERM, then this
# long before SIGKILL.
GROUP_KILL_GRACE_S = 1.0
# How often a live connection checks that its server process still exists. Closing stdout is
# the fast signal, but a child that inherited stdout keeps it open after the server died.
WATCH_INTERVAL_S = 0.5
# The SDK enforces the tool timeout; this outer guard only catches an SDK that does not.
TOOL_TIMEOUT_GUARD_S = 1.0
MAX_TOOL_PAGES = 100
HTTP_TIMEOUT_S = 30.0
HTTP_READ_TIMEOUT_S = 300.0

# Variables that launchers (npx, uvx, node, python) need to work as they do in a shell. The
# SDK passes only HOME, LOGNAME, PATH, SHELL, TERM and USER; secrets stay out unless a
# server's own `env` names them.
INHERITED_ENV = frozenset(
    {
        "PATH", "HOME", "USER", "LOGNAME", "SHELL", "TERM", "LANG", "LANGUAGE", "TZ",
        "TMPDIR", "TMP", "TEMP", "SSL_CERT_FILE", "SSL_CERT_DIR", "REQUESTS_CA_BUNDLE",
        "NODE_EXTRA_CA_CERTS", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY",
        "http_proxy", "https_proxy", "no_proxy",
    }
)  # fmt: skip
INHERITED_ENV_PREFIXES = ("LC_", "XDG_", "NPM_CONFIG_", "npm_config_", "UV_")

# The SDK does not expose the server's pid. This launcher prints it on stderr and then execs
# the server, which keeps the pid: the host needs it to watch the process and kill its group.
PID_MARKER = "@@llm-server-mcp-pid"
EXEC_SHIM = f'echo "{PID_MARKER} $$" >&2; exec "$@"'

_UNSAFE_NAME_CHARS = re.compile(r"[^A-Za-z0-9_-]")


class ServerState(enum.Enum):
    STARTING = "starting"  # connecting, first time or again
    UP = "up"
    DOWN = "down"  # not connected; another attempt is scheduled
    FAILED = "failed"  # not connected and not retried (invalid entry, or restart off)
    STOPPED = "stopped"  # the host closed


@dataclass(frozen=True)
class ToolResult:
    """The outcome of one tool call, errors included, as text for the model."""

    text: str
    is_error: bool
    server: str
    tool: str  # the server's own name for the tool
    duration_s: float


@dataclass(frozen=True)
class ServerStatus:
    """One server as seen by the host, for logs and tests."""

    name: str
    state: str
    transport: str
    pid: int | None
    tools: int
    restarts: int
    last_error: str | None


@dataclass(frozen=True)
class _Settings:
    startup_timeout_s: float
    tool_timeout_s: float
    restart: bool
    backoff_first_s: float
    backoff_max_s: float


@dataclass(frozen=True)
class _ServerSpec:
    """One validated `servers` entry."""

    transport: str  # "stdio", "sse" or "http"
    command: str = ""
    args: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    cwd: str | None = None
    url: str = ""
    headers: Mapping[str, str] = field(default_factory=dict)


class _ConfigError(Exception):
    """An invalid `servers` entry: logged once, never retried."""


class _StartError(Exception):
    """A server that could not be started, with a reason fit for the log."""


class MCPHost:
    """Starts the configured MCP servers, lists their tools and calls them.

    ``async with MCPHost(servers) as host:`` returns once every server is up or has failed;
    ``host.tools()`` and ``await host.call_tool(name, arguments)`` work from any task of the
    same event loop.
    """

    def __init__(
        self,
        servers: Mapping[str, Mapping[str, Any]],
        *,
        startup_timeout_s: float = 30.0,
        tool_timeout_s: float = 60.0,
        restart: bool = True,
        restart_backoff_s: tuple[float, float] = (1.0, 60.0),
    ) -> None:
        first, most = restart_backoff_s
        if startup_timeout_s <= 0 or tool_timeout_s <= 0 or first <= 0 or most < first:
            raise ValueError("MCPHost timeouts must be positive and restart_backoff_s = (first, max) with max >= first")
        settings = _Settings(startup_timeout_s, tool_timeout_s, restart, first, most)
        self._settings = settings
        self._runners = [_ServerRunner(name, spec, settings, self._rebuild_routes) for name, spec in servers.items()]
        self._routes: dict[str, tuple[_ServerRunner, types.Tool]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._closing = False

    async def __aenter__(self) -> MCPHost:
        try:
            await self.start()
        except BaseException:
            await self.aclose()
            raise
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def start(self) -> None:
        """Start every server at once; return when each is up or has failed (retries go on)."""
        if self._tasks or self._closing:
            raise RuntimeError("an MCPHost starts once")
        for runner in self._runners:
            task = asyncio.create_task(runner.run(), name=f"mcp[{runner.name}]")
            task.add_done_callback(_log_task_end)
            self._tasks.append(task)
        if self._runners:
            # Each runner settles within its startup timeout; the margin covers a spawn that blocks.
            waits = [runner.settled.wait() for runner in self._runners]
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.gather(*waits), self._settings.startup_timeout_s + 5.0)
        up = [r.name for r in self._runners if r.state is ServerState.UP]
        logger.info(
            "MCP host ready: %d of %d servers up (%s), %d tools",
            len(up), len(self._runners), ", ".join(up) or "none", len(self._routes),
        )  # fmt: skip

    async def aclose(self) -> None:
        """Stop restarts, close every session within a deadline, and make sure processes are gone."""
        if self._closing:
            return
        self._closing = True
        for runner in self._runners:
            runner.stop()
        if self._tasks:
            _, pending = await asyncio.wait(self._tasks, timeout=CLOSE_TIMEOUT_S)
            if pending:
                logger.warning(
                    "MCP host: %d server(s) did not close within %.0fs; cancelling", len(pending), CLOSE_TIMEOUT_S
                )
                for task in pending:
                    task.cancel()
                await asyncio.wait(pending, timeout=GROUP_KILL_GRACE_S + 1.0)
        for runner in self._runners:
            runner.kill_leftovers()
        logger.info("MCP host closed")

    def tools(self) -> list[dict[str, Any]]:
        """OpenAI-style function specs for the tools of the servers that are up now."""
        return [
            {
                "type": "function",
                "function": {
                    "name": name,
                    "description": tool.description or "",
                    "parameters": copy.deepcopy(tool.input_schema),
                },
            }
            for name, (_, tool) in self._routes.items()
        ]

    def status(self) -> dict[str, ServerStatus]:
        """Per-server state, in config order."""
        return {runner.name: runner.status() for runner in self._runners}

    async def call_tool(self, name: str, arguments: Mapping[str, Any] | None) -> ToolResult:
        """Call a tool once; any failure comes back as an ``is_error`` result, never raised."""
        started = time.monotonic()
        route = self._resolve(name)
        if route is None:
            return self._finish(name, "", name, started, "error", self._unknown_tool_text(name), arguments)
        runner, tool = route
        if not isinstance(arguments, Mapping) and arguments is not None:
            return self._finish(
                name, runner.name, tool, started, "error", "tool arguments must be a JSON object", arguments
            )
        session = runner.session
        if session is None:
            text = f"MCP server {runner.name!r} is not running (last error: {runner.last_error or 'none'})"
            return self._finish(name, runner.name, tool, started, "dead", text, arguments)
        outcome, text = await self._invoke(runner, session, tool, dict(arguments or {}))
        return self._finish(name, runner.name, tool, started, outcome, text, arguments)

    async def _invoke(
        self, runner: _ServerRunner, session: ClientSession, tool: str, arguments: dict[str, Any]
    ) -> tuple[str, str]:
        """Run the call with both timeouts; return (outcome, text)."""
        timeout = self._settings.tool_timeout_s
        try:
            with anyio.fail_after(timeout + TOOL_TIMEOUT_GUARD_S):
                result = await session.call_tool(tool, arguments, read_timeout_seconds=timeout)
        except TimeoutError:
            return "timeout", f"tool {tool!r} timed out after {timeout:g}s"
        except MCPError as exc:
            if exc.code == types.REQUEST_TIMEOUT:
                return "timeout", f"tool {tool!r} timed out after {timeout:g}s"
            if exc.code == types.CONNECTION_CLOSED:
                runner.mark_dead("connection closed during a tool call")
                return "dead", f"MCP server {runner.name!r} closed the connection during the call"
            return "error", f"MCP error {exc.code}: {exc.message}"
        except Exception as exc:  # the SDK raises several kinds (validation, transport, input-required)
            return "error", f"tool call failed: {_describe(exc)}"
        if not isinstance(result, types.CallToolResult):
            return "error", f"tool {tool!r} returned an unsupported result type {type(result).__name__}"
        return ("error" if result.is_error else "ok"), _result_text(result)

    def _finish(
        self, name: str, server: str, tool: str, started: float, outcome: str, text: str, arguments: Any
    ) -> ToolResult:
        duration = time.monotonic() - started
        logger.info("tool call %s server=%s duration=%.0fms outcome=%s", name, server or "-", duration * 1000, outcome)
        logger.log(TRACE, "tool call %s arguments: %s", name, _json_or_repr(arguments))
        logger.log(TRACE, "tool call %s result: %s", name, text)
        return ToolResult(text=text, is_error=outcome != "ok", server=server, tool=tool, duration_s=duration)

    def _resolve(self, name: str) -> tuple[_ServerRunner, str] | None:
        """The server and its own tool name for a name the model used.

        Besides the exposed names: `<server>_<tool>` for any server, and a down server's tools
        under their plain names, so that a call to a dead server says so instead of "unknown".
        """
        route = self._routes.get(name)
        if route is not None:
            return route[0], route[1].name
        live_first = sorted(self._runners, key=lambda r: r.state is not ServerState.UP)
        for runner in live_first:
            prefix = exposed_name(runner.name, "")
            if name.startswith(prefix) and name[len(prefix) :] in runner.known_tools:
                return runner, name[len(prefix) :]
        for runner in live_first:
            if runner.state is not ServerState.UP and name in runner.known_tools:
                return runner, name
        return None

    def _unknown_tool_text(self, name: str) -> str:
        offered = [exposed for exposed, (_, tool) in self._routes.items() if tool.name == name]
        if offered:
            return f"tool {name!r} is offered by several MCP servers; call one of: {', '.join(offered)}"
        return f"unknown tool {name!r}"

    def _rebuild_routes(self) -> None:
        """Recompute exposed names from the servers that are up (see the module docstring)."""
        live = [r for r in self._runners if r.state is ServerState.UP]
        offers = Counter(name for r in live for name in {t.name for t in r.tools})
        routes: dict[str, tuple[_ServerRunner, types.Tool]] = {}
        for runner in live:
            for tool in runner.tools:
                name = tool.name if offers[tool.name] == 1 else exposed_name(runner.name, tool.name)
                if name in routes:
                    logger.warning(
                        "mcp[%s] tool %r left out: the name %r is already taken", runner.name, tool.name, name
                    )
                    continue
                routes[name] = (runner, tool)
        self._routes = routes


def exposed_name(server: str, tool: str) -> str:
    """`<server>_<tool>`, as exposed when several live servers offer the same tool name."""
    return f"{_UNSAFE_NAME_CHARS.sub('_', server)}_{tool}"[:64]


class _ServerRunner:
    """One server's connection, owned by the one task that runs `run`."""

    def __init__(self, name: str, raw: Mapping[str, Any], settings: _Settings, on_change: Callable[[], None]) -> None:
        self.name = name
        self._raw = raw
        self._settings = settings
        self._on_change = on_change
        self.state = ServerState.STARTING
        self.session: ClientSession | None = None
        self.tools: list[types.Tool] = []
        self.known_tools: frozenset[str] = frozenset()  # as last listed, kept while down
        self.settled = asyncio.Event()  # set once the first attempt is up or has failed
        self.restarts = 0
        self.last_error: str | None = None
        self._transport = str(raw.get("type") or ("stdio" if "command" in raw else "?"))
        self._pump: _StderrPump | None = None
        self._scope: anyio.CancelScope | None = None
        self._wake = asyncio.Event()
        self._stopping = False
        self._dead_reason: str | None = None
        self._relist = False
        self._up_since: float | None = None

    def status(self) -> ServerStatus:
        pid = self._pump.pid if self._pump is not None else None
        return ServerStatus(
            self.name, self.state.value, self._transport, pid, len(self.tools), self.restarts, self.last_error
        )

    async def run(self) -> None:
        """Connect, serve until the server dies, and start it again with backoff until stopped."""
        try:
            spec = _parse_spec(self._raw)
        except _ConfigError as exc:
            self.last_error = str(exc)
            logger.error("mcp[%s] invalid server entry, skipped: %s", self.name, exc)
            self._set_state(ServerState.FAILED)
            self.settled.set()
            return
        delay = self._settings.backoff_first_s
        try:
            while not self._stopping:
                await self._connect_once(spec)
                if self._stopping:
                    break
                if not self._settings.restart:
                    logger.error("mcp[%s] not restarted (restart is off)", self.name)
                    self._set_state(ServerState.FAILED)
                    return
                if self._up_since is not None and time.monotonic() - self._up_since >= self._settings.backoff_max_s:
                    delay = self._settings.backoff_first_s  # it ran long enough: start the backoff over
                self.restarts += 1
                logger.warning("mcp[%s] restart attempt %d in %.1fs", self.name, self.restarts, delay)
                await self._sleep(delay)
                delay = min(delay * 2, self._settings.backoff_max_s)
        finally:
            self.session = None
            if self.state is not ServerState.FAILED:
                self._set_state(ServerState.STOPPED)
            self.settled.set()

    def stop(self) -> None:
        """Ask the task to close the connection and end; a start in progress is abandoned."""
        self._stopping = True
        self._wake.set()
        if self.state is ServerState.STARTING and self._scope is not None:
            self._scope.cancel()

    def mark_dead(self, reason: str) -> None:
        """Withdraw the tools now and let the owning task tear the connection down."""
        if self.state is not ServerState.UP or self._stopping:
            return
        self._dead_reason = reason
        self._go_down(reason)
        self._wake.set()

    def kill_leftovers(self) -> None:
        """Last resort at host close: SIGKILL whatever is left of the process group."""
        pid = self._pump.pid if self._pump is not None else None
        if pid is not None and _group_alive(pid):
            logger.warning("mcp[%s] process group %d still alive at close; killing it", self.name, pid)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)

    async def _connect_once(self, spec: _ServerSpec) -> None:
        """One connection from start to end; the server's own failures are logged, not raised."""
        self._begin_attempt()
        pump = _StderrPump(self.name) if spec.transport == "stdio" else None
        self._pump = pump
        loop = asyncio.get_running_loop()
        try:
            with anyio.CancelScope() as scope:
                self._scope = scope
                deadline = loop.call_later(self._settings.startup_timeout_s, self._startup_timed_out, scope)
                try:
                    async with AsyncExitStack() as stack:
                        session, tools = await self._open_session(stack, spec, pump)
                        deadline.cancel()
                        self._go_up(session, tools)
                        reason = await self._watch(session)
                        self._go_down(reason)
                except Exception as exc:  # from the SDK, the transport or the server: never fatal here
                    self._connection_failed(_describe(exc))
                finally:
                    deadline.cancel()
        finally:
            self._scope = None
            self.session = None
            if pump is not None:
                pump.close_writer()
                await _kill_group(self.name, pump.pid)

    async def _open_session(
        self, stack: AsyncExitStack, spec: _ServerSpec, pump: _StderrPump | None
    ) -> tuple[ClientSession, list[types.Tool]]:
        read, write = await _open_transport(stack, spec, pump)
        session = ClientSession(
            _EofWatch(read, self._on_eof),
            write,
            read_timeout_seconds=self._settings.startup_timeout_s,  # initialize, list_tools
            message_handler=self._on_message,
            client_info=CLIENT_INFO,
        )
        await stack.enter_async_context(session)
        await session.initialize()
        return session, await _list_tools(session)

    async def _watch(self, session: ClientSession) -> str:
        """Wait until the server dies or the host stops; return why."""
        while self._dead_reason is None and not self._stopping:
            with anyio.move_on_after(WATCH_INTERVAL_S):
                await self._wake.wait()
            self._wake.clear()
            pid = self._pump.pid if self._pump is not None else None
            if pid is not None and not _pid_alive(pid):
                self.mark_dead(f"server process {pid} exited")
            elif self._relist and self.state is ServerState.UP:
                self._relist = False
                self.tools = await _list_tools(session)
                self.known_tools = frozenset(t.name for t in self.tools)
                logger.info("mcp[%s] tool list changed: %d tools", self.name, len(self.tools))
                self._on_change()
        return self._dead_reason or "host closing"

    def _begin_attempt(self) -> None:
        self._dead_reason = None
        self._relist = False
        self._up_since = None
        self._wake.clear()
        self._set_state(ServerState.STARTING)

    def _go_up(self, session: ClientSession, tools: list[types.Tool]) -> None:
        self.session, self.tools = session, tools
        self.known_tools = frozenset(t.name for t in tools)
        self._up_since = time.monotonic()
        self.last_error = None
        pid = self._pump.pid if self._pump is not None else None
        again = f" after {self.restarts} restart attempt(s)" if self.restarts else ""
        logger.info("mcp[%s] up%s: %d tools%s", self.name, again, len(tools), f" (pid {pid})" if pid else "")
        self._set_state(ServerState.UP)
        self.settled.set()

    def _go_down(self, reason: str) -> None:
        if self.state is not ServerState.UP:
            return
        self.session, self.tools = None, []
        if self._stopping:
            logger.info("mcp[%s] closing", self.name)
        else:
            self.last_error = reason
            logger.error("mcp[%s] server died: %s; its tools are withdrawn", self.name, reason)
        self._set_state(ServerState.DOWN)

    def _connection_failed(self, reason: str) -> None:
        if self.state is ServerState.UP:
            self._go_down(reason)
        elif self.state is ServerState.STARTING and not self._stopping:
            self.last_error = reason
            logger.error("mcp[%s] failed to start: %s", self.name, reason)
            self._set_state(ServerState.DOWN)
            self.settled.set()
        else:
            logger.debug("mcp[%s] connection ended: %s", self.name, reason)

    def _startup_timed_out(self, scope: anyio.CancelScope) -> None:
        """Loop callback at the startup deadline: report now, clean up in the background."""
        if self.state is ServerState.STARTING:
            self._connection_failed(f"no answer within the startup timeout ({self._settings.startup_timeout_s:g}s)")
            scope.cancel()

    def _on_eof(self) -> None:
        self.mark_dead("connection closed")

    async def _on_message(self, message: IncomingMessage) -> None:
        """Session callback for server notifications and transport errors."""
        if isinstance(message, Exception):
            logger.warning("mcp[%s] transport error: %s", self.name, _describe(message))
        elif isinstance(message, types.ToolListChangedNotification):
            self._relist = True
            self._wake.set()

    async def _sleep(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while not self._stopping and (left := deadline - time.monotonic()) > 0:
            with anyio.move_on_after(left):
                await self._wake.wait()
            self._wake.clear()

    def _set_state(self, state: ServerState) -> None:
        changed = (state is ServerState.UP) != (self.state is ServerState.UP)
        self.state = state
        if changed:
            self._on_change()


async def _open_transport(stack: AsyncExitStack, spec: _ServerSpec, pump: _StderrPump | None) -> tuple[Any, Any]:
    """Open the SDK client transport for a server; its contexts go on the caller's stack."""
    if spec.transport == "stdio":
        assert pump is not None
        params = _stdio_parameters(spec)
        try:
            return await stack.enter_async_context(stdio_client(params, errlog=pump.writer))
        finally:
            pump.close_writer()  # the server has its copy now; EOF follows when its group is gone
    headers = dict(spec.headers)
    if spec.transport == "sse":
        return await stack.enter_async_context(sse_client(spec.url, headers=headers, timeout=HTTP_TIMEOUT_S))
    client = httpx2.AsyncClient(headers=headers, timeout=httpx2.Timeout(HTTP_TIMEOUT_S, read=HTTP_READ_TIMEOUT_S))
    await stack.enter_async_context(client)
    return await stack.enter_async_context(streamable_http_client(spec.url, http_client=client))


def _stdio_parameters(spec: _ServerSpec) -> StdioServerParameters:
    """The launch through `EXEC_SHIM`, with a checked command and the launcher environment."""
    env = launcher_environment(spec.env)
    if spec.cwd is not None and not os.path.isdir(spec.cwd):
        raise _StartError(f"working directory {spec.cwd!r} does not exist")
    command = spec.command
    if os.sep in command and not os.path.isabs(command) and spec.cwd is not None:
        command = os.path.join(spec.cwd, command)
    resolved = shutil.which(command, path=env.get("PATH", os.defpath))
    if resolved is None:
        raise _StartError(f"command not found: {spec.command!r}")
    return StdioServerParameters(
        command="/bin/sh", args=["-c", EXEC_SHIM, "sh", resolved, *spec.args], env=env, cwd=spec.cwd
    )


def launcher_environment(extra: Mapping[str, str]) -> dict[str, str]:
    """The environment a stdio server gets: launcher essentials from ours, plus its own `env`."""
    env = {
        key: value
        for key, value in os.environ.items()
        if (key in INHERITED_ENV or key.startswith(INHERITED_ENV_PREFIXES)) and not value.startswith("()")
    }
    env.update(extra)
    return env


async def _list_tools(session: ClientSession) -> list[types.Tool]:
    """Every tool of the server, following `next_cursor` (bounded against a looping server)."""
    tools: list[types.Tool] = []
    cursor: str | None = None
    for _ in range(MAX_TOOL_PAGES):
        params = types.PaginatedRequestParams(cursor=cursor) if cursor else None
        page = await session.list_tools(params=params)
        tools.extend(page.tools)
        if not page.next_cursor or page.next_cursor == cursor:
            break
        cursor = page.next_cursor
    return tools


def _result_text(result: types.CallToolResult) -> str:
    """Text blocks joined; other blocks summarised; structured content when there is no text."""
    parts = [_content_text(block) for block in result.content]
    text = "\n".join(part for part in parts if part)
    has_text = any(isinstance(block, types.TextContent) for block in result.content)
    if not has_text and result.structured_content is not None:
        structured = json.dumps(result.structured_content, ensure_ascii=False)
        text = f"{text}\n{structured}" if text else structured
    return text


def _content_text(block: Any) -> str:
    if isinstance(block, types.TextContent):
        return block.text
    if isinstance(block, types.ImageContent | types.AudioContent):
        return f"[{block.mime_type} content]"
    if isinstance(block, types.ResourceLink):
        return f"[resource link {block.uri}]"
    if isinstance(block, types.EmbeddedResource):
        resource = block.resource
        if isinstance(resource, types.TextResourceContents):
            return resource.text
        return f"[{resource.mime_type or 'binary'} resource {resource.uri}]"
    return f"[{getattr(block, 'type', type(block).__name__)} content]"


def _parse_spec(raw: Mapping[str, Any]) -> _ServerSpec:
    """Validate one `servers` entry (already `${VAR}`-substituted)."""
    kind = raw.get("type") or ("stdio" if "command" in raw else None)
    if kind == "stdio":
        command, args, env, cwd = raw.get("command"), raw.get("args", []), raw.get("env", {}), raw.get("cwd")
        if not isinstance(command, str) or not command:
            raise _ConfigError("'command' must be a non-empty string")
        if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
            raise _ConfigError("'args' must be a list of strings")
        if not isinstance(env, Mapping) or not all(isinstance(v, str) for v in env.values()):
            raise _ConfigError("'env' must map names to strings")
        if cwd is not None and not isinstance(cwd, str):
            raise _ConfigError("'cwd' must be a string")
        return _ServerSpec("stdio", command=command, args=tuple(args), env=dict(env), cwd=cwd)
    if kind in ("sse", "http", "streamable-http"):
        url, headers = raw.get("url"), raw.get("headers", {})
        if not isinstance(url, str) or not re.match(r"https?://[^/\s]+", url):
            raise _ConfigError(f"'url' must be an http:// or https:// URL, got {url!r}")
        if not isinstance(headers, Mapping) or not all(isinstance(v, str) for v in headers.values()):
            raise _ConfigError("'headers' must map names to strings")
        return _ServerSpec("sse" if kind == "sse" else "http", url=url, headers=dict(headers))
    if kind is None:
        raise _ConfigError("no 'type' and no 'command'")
    raise _ConfigError(f"unknown type {kind!r} (expected stdio, sse, http or streamable-http)")


class _EofWatch:
    """The session's read stream, reporting when it ends (the server hung up or died)."""

    def __init__(self, inner: Any, on_eof: Callable[[], None]) -> None:
        self._inner = inner
        self._on_eof = on_eof

    @property
    def last_context(self) -> Any:
        return getattr(self._inner, "last_context", None)

    async def receive(self) -> Any:
        try:
            return await self._inner.receive()
        except (anyio.EndOfStream, anyio.ClosedResourceError):
            self._on_eof()
            raise

    def __aiter__(self) -> _EofWatch:
        return self

    async def __anext__(self) -> Any:
        try:
            return await self._inner.__anext__()
        except (StopAsyncIteration, anyio.ClosedResourceError):
            self._on_eof()
            raise

    async def aclose(self) -> None:
        await self._inner.aclose()

    async def __aenter__(self) -> _EofWatch:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


class _StderrPump:
    """A stdio server's stderr: a real pipe (the SDK needs a file descriptor) read by a thread
    that logs each line under the server's name and picks up the pid from `EXEC_SHIM`."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.pid: int | None = None
        read_fd, write_fd = os.pipe()
        self.writer = open(write_fd, "w", encoding="utf-8")  # noqa: SIM115 - closed by close_writer
        self._thread = threading.Thread(target=self._pump, args=(read_fd,), name=f"mcp-stderr-{name}", daemon=True)
        self._thread.start()

    def close_writer(self) -> None:
        self.writer.close()

    def _pump(self, read_fd: int) -> None:
        with open(read_fd, "rb") as stream:
            for raw in stream:
                line = raw.decode("utf-8", "replace").rstrip()
                if self.pid is None and line.startswith(PID_MARKER):
                    self.pid = int(line.split()[1])
                elif line.strip():
                    logger.warning("mcp[%s] %s", self.name, line)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # members we may not signal (or zombies on macOS): not provably gone
    return True


async def _kill_group(name: str, pgid: int | None) -> None:
    """Kill what is left of a server's process group once its connection has closed.

    The SDK kills the group only when the server outlives stdin's close by 2 s; a server that
    exits (or crashed) leaves its children running, and they may hold its pipes open.
    """
    if pgid is None or not _group_alive(pgid):
        return
    try:
        logger.warning("mcp[%s] process group %d outlived the server; sending SIGTERM", name, pgid)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGTERM)
        deadline = time.monotonic() + GROUP_KILL_GRACE_S
        while _group_alive(pgid) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
    finally:  # also when cancelled: nothing of the group may survive
        if _group_alive(pgid):
            logger.warning("mcp[%s] process group %d ignored SIGTERM; sending SIGKILL", name, pgid)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, signal.SIGKILL)


def _describe(exc: BaseException) -> str:
    """One line for the log: the first leaf of an exception group, with its type."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    if isinstance(exc, _StartError | _ConfigError):
        return str(exc)
    if isinstance(exc, MCPError):
        return f"{exc.message} (MCP error {exc.code})"
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _json_or_repr(value: Any) -> str:
    try:
        return json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        return repr(value)


def _log_task_end(task: asyncio.Task[None]) -> None:
    """A server task that ends with an exception is a bug here; say so instead of losing it."""
    if not task.cancelled() and (exc := task.exception()) is not None:
        logger.error("%s: server task failed", task.get_name(), exc_info=exc)
