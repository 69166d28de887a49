"""The MCP host: the model worker's MCP servers as one list of tools.

``async with MCPHost(servers) as host`` starts every server of the validated `servers`
block concurrently (one `mcp_connection.ServerRunner` task each) and returns once each is up or
has failed; ``host.tools()`` gives the live tools as OpenAI-style function specs for the chat
template and ``await host.call_tool(name, arguments)`` calls one. Closing it stops every server
and makes sure their processes are gone.

Tool calls never raise and are never retried (tools have side effects): every failure, a
timeout or a server that died during the call, comes back as a ``ToolResult`` with
``is_error=True`` for the model to read.

Tool names. A tool keeps its own name while it is the only live server offering that name. When
two or more live servers offer the same name, each of those tools is exposed as
``<server>_<tool>``, the server name reduced to ``[A-Za-z0-9_-]`` and the whole name cut to 64
characters. Names are recomputed whenever a server comes up or goes down; ``call_tool`` also
accepts ``<server>_<tool>`` at any time, so a name the model saw a moment ago keeps working.
Should a generated name still clash, the later tool is left out (logged). Order: servers in
config order, then each server's own order.
"""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import re
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import anyio
import mcp_types as types
from mcp.client.session import ClientSession
from mcp.shared.exceptions import MCPError

from ..common.servers import ServerSpec
from ..common.logs import TRACE
from . import metrics
from .mcp_connection import ServerRunner, ServerState, ServerStatus, Settings, describe
from .mcp_process import GROUP_KILL_GRACE_S

logger = logging.getLogger("llm_server.mcp")

# Whole-host close: every server gets this long to shut down before its task is cancelled.
CLOSE_TIMEOUT_S = 10.0
# The SDK enforces the tool timeout; this outer guard only catches an SDK that does not.
TOOL_TIMEOUT_GUARD_S = 1.0

_UNSAFE_NAME_CHARS = re.compile(r"[^A-Za-z0-9_-]")


@dataclass(frozen=True)
class ToolResult:
    """The outcome of one tool call, errors included, as text for the model."""

    text: str
    is_error: bool
    server: str
    tool: str  # the server's own name for the tool
    duration_s: float


class MCPHost:
    """Starts the configured MCP servers, lists their tools and calls them.

    ``async with MCPHost(servers) as host:`` returns once every server is up or has failed;
    ``host.tools()`` and ``await host.call_tool(name, arguments)`` work from any task of the
    same event loop.
    """

    def __init__(
        self,
        servers: Mapping[str, ServerSpec],
        *,
        startup_timeout_s: float = 30.0,
        tool_timeout_s: float = 60.0,
        restart: bool = True,
        restart_backoff_s: tuple[float, float] = (1.0, 60.0),
        max_result_chars: int = 32_000,
    ) -> None:
        first, most = restart_backoff_s
        if startup_timeout_s <= 0 or tool_timeout_s <= 0 or first <= 0 or most < first:
            raise ValueError("MCPHost timeouts must be positive and restart_backoff_s = (first, max) with max >= first")
        settings = Settings(startup_timeout_s, tool_timeout_s, restart, first, most)
        self._settings = settings
        self._max_result_chars = max_result_chars
        self._runners = [ServerRunner(name, spec, settings, self._rebuild_routes) for name, spec in servers.items()]
        self._routes: dict[str, tuple[ServerRunner, types.Tool]] = {}
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
            # Not wait_for(gather(...)): cancelled (a stop during start-up), that leaves a gather
            # whose CancelledError nobody retrieves, and asyncio logs it.
            waits = [asyncio.ensure_future(runner.settled.wait()) for runner in self._runners]
            longest = max(runner.settings.startup_timeout_s for runner in self._runners)
            try:
                await asyncio.wait(waits, timeout=longest + 5.0)
            finally:
                for waiter in waits:
                    waiter.cancel()
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

    def offered(self) -> dict[str, list[str]]:
        """Per server, the names its tools are offered under now (as the model sees them)."""
        names: dict[str, list[str]] = {}
        for exposed, (runner, _) in self._routes.items():
            names.setdefault(runner.name, []).append(exposed)
        return names

    def status(self) -> dict[str, ServerStatus]:
        """Per-server state, in config order."""
        return {runner.name: runner.status() for runner in self._runners}

    def runs(self, name: str) -> bool:
        """Whether ``name`` is a tool of an MCP server (up or down), so a call to it is ours to run."""
        return self._resolve(name) is not None

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
        try:
            outcome, text = await self._invoke(runner, session, tool, dict(arguments or {}))
        except asyncio.CancelledError:  # the request was cancelled (its client went away)
            self._finish(name, runner.name, tool, started, "cancelled", "the request was cancelled", arguments)
            raise
        return self._finish(name, runner.name, tool, started, outcome, text, arguments)

    async def _invoke(
        self, runner: ServerRunner, session: ClientSession, tool: str, arguments: dict[str, Any]
    ) -> tuple[str, str]:
        """Run the call with both timeouts; return (outcome, text)."""
        timeout = runner.settings.tool_timeout_s
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
            return "error", f"tool call failed: {describe(exc)}"
        if not isinstance(result, types.CallToolResult):
            return "error", f"tool {tool!r} returned an unsupported result type {type(result).__name__}"
        return ("error" if result.is_error else "ok"), _result_text(result)

    def _finish(
        self, name: str, server: str, tool: str, started: float, outcome: str, text: str, arguments: Any
    ) -> ToolResult:
        duration = time.monotonic() - started
        logger.info("tool call %s server=%s duration=%.0fms outcome=%s", name, server or "-", duration * 1000, outcome)
        metrics.tool_call(server, tool, outcome, duration)
        if len(text) > self._max_result_chars:
            logger.warning(
                "tool call %s result cut from %d to %d characters (max_tool_result_chars)",
                name, len(text), self._max_result_chars,
            )  # fmt: skip
            text = cut_middle(text, self._max_result_chars)
        logger.log(TRACE, "tool call %s arguments: %s", name, _json_or_repr(arguments))
        logger.log(TRACE, "tool call %s result: %s", name, text)
        return ToolResult(text=text, is_error=outcome != "ok", server=server, tool=tool, duration_s=duration)

    def _resolve(self, name: str) -> tuple[ServerRunner, str] | None:
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
        routes: dict[str, tuple[ServerRunner, types.Tool]] = {}
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


def cut_middle(text: str, limit: int) -> str:
    """At most ``limit`` characters of ``text``: its head and its tail, with a marker between
    saying how much was left out (the start and the end of a long result say the most)."""
    marker = f"\n[... {len(text) - limit} characters cut ...]\n"
    keep = max(0, limit - len(marker))
    head = keep - keep // 2
    return text[:head] + marker + text[len(text) - keep // 2 :] if keep // 2 else text[:head] + marker


def exposed_name(server: str, tool: str) -> str:
    """`<server>_<tool>`, as exposed when several live servers offer the same tool name."""
    return f"{_UNSAFE_NAME_CHARS.sub('_', server)}_{tool}"[:64]


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


def _json_or_repr(value: Any) -> str:
    try:
        return json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        return repr(value)


def _log_task_end(task: asyncio.Task[None]) -> None:
    """A server task that ends with an exception is a bug here; say so instead of losing it."""
    if not task.cancelled() and (exc := task.exception()) is not None:
        logger.error("%s: server task failed", task.get_name(), exc_info=exc)
