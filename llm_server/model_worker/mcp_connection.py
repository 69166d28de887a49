"""One MCP server's connection, from its `servers` entry to its death and restart.

Ownership. Each configured server gets one long-lived asyncio task (``ServerRunner.run``) that
opens its transport and ``ClientSession``, keeps them while the server lives and closes them
again, because anyio cancel scopes must be entered and left by the same task. Other tasks only
*call* the session that task published (see `mcp_host`). The stdio processes themselves are
handled by `mcp_process`.

Failure policy. A server that cannot start (missing command, crash, no answer within the
startup timeout) is logged and retried in the background with exponential backoff, as
is one that dies: its tools leave the list at once. A stdio server's death is seen when its
stdout closes, or within `WATCH_INTERVAL_S` of its process exiting (a child may hold stdout
open); an SSE server's when its event stream breaks; a streamable-HTTP server's only at the next
request. Entries arrive validated (``common.servers.ServerSpec``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import logging
import time
from collections.abc import Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass

import anyio
import mcp_types as types
from mcp.client.session import ClientSession, IncomingMessage

from ..common.servers import ServerSpec
from .mcp_process import StderrPump, kill_group, kill_group_now, pid_alive
from .mcp_transport import EofWatch, describe, list_tools, open_transport

logger = logging.getLogger("llm_server.mcp")

CLIENT_INFO = types.Implementation(name="llm-server", version="0.1.0")
# How often a live connection checks that its server process still exists. Closing stdout is
# the fast signal, but a child that inherited stdout keeps it open after the server died.
WATCH_INTERVAL_S = 0.5


class ServerState(enum.Enum):
    STARTING = "starting"  # connecting, first time or again
    UP = "up"
    DOWN = "down"  # not connected; another attempt is scheduled
    FAILED = "failed"  # not connected and not retried (restart off)
    DISABLED = "disabled"  # switched off in the config: never started
    STOPPED = "stopped"  # the host closed


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
class Settings:
    startup_timeout_s: float
    tool_timeout_s: float
    restart: bool
    backoff_first_s: float
    backoff_max_s: float


class ServerRunner:
    """One server's connection, owned by the one task that runs `run`."""

    def __init__(self, name: str, spec: ServerSpec, settings: Settings, on_change: Callable[[], None]) -> None:
        self.name = name
        self._spec = spec
        # The server's own `timeout` / `startupTimeout` win over the daemon-wide settings.
        self.settings = dataclasses.replace(
            settings,
            tool_timeout_s=spec.tool_timeout_s or settings.tool_timeout_s,
            startup_timeout_s=spec.startup_timeout_s or settings.startup_timeout_s,
        )
        self._on_change = on_change
        self.state = ServerState.STARTING
        self.session: ClientSession | None = None
        self.tools: list[types.Tool] = []
        self.known_tools: frozenset[str] = frozenset()  # as last listed, kept while down
        self.settled = asyncio.Event()  # set once the first attempt is up or has failed
        self.restarts = 0
        self.last_error: str | None = None
        self._pump: StderrPump | None = None
        self._scope: anyio.CancelScope | None = None
        self._wake = asyncio.Event()
        self._stopping = False
        self._dead_reason: str | None = None
        self._relist = False
        self._up_since: float | None = None

    def status(self) -> ServerStatus:
        pid = self._pump.pid if self._pump is not None else None
        return ServerStatus(
            self.name, self.state.value, self._spec.transport, pid, len(self.tools), self.restarts, self.last_error
        )

    async def run(self) -> None:
        """Connect, serve until the server dies, and start it again with backoff until stopped."""
        spec = self._spec
        if spec.disabled:
            logger.info("mcp[%s] disabled in the config: not started", self.name)
            self._set_state(ServerState.DISABLED)
            self.settled.set()
            return
        delay = self.settings.backoff_first_s
        try:
            while not self._stopping:
                await self._connect_once(spec)
                if self._stopping:
                    break
                if not self.settings.restart:
                    logger.error("mcp[%s] not restarted (restart is off)", self.name)
                    self._set_state(ServerState.FAILED)
                    return
                if self._up_since is not None and time.monotonic() - self._up_since >= self.settings.backoff_max_s:
                    delay = self.settings.backoff_first_s  # it ran long enough: start the backoff over
                self.restarts += 1
                logger.warning("mcp[%s] restart attempt %d in %.1fs", self.name, self.restarts, delay)
                await self._sleep(delay)
                delay = min(delay * 2, self.settings.backoff_max_s)
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
        if self._pump is not None:
            kill_group_now(self.name, self._pump.pid)

    async def _connect_once(self, spec: ServerSpec) -> None:
        """One connection from start to end; the server's own failures are logged, not raised."""
        self._begin_attempt()
        pump = StderrPump(self.name) if spec.transport == "stdio" else None
        self._pump = pump
        loop = asyncio.get_running_loop()
        try:
            with anyio.CancelScope() as scope:
                self._scope = scope
                deadline = loop.call_later(self.settings.startup_timeout_s, self._startup_timed_out, scope)
                try:
                    async with AsyncExitStack() as stack:
                        session, tools = await self._open_session(stack, spec, pump)
                        deadline.cancel()
                        self._go_up(session, tools)
                        reason = await self._watch(session)
                        self._go_down(reason)
                except Exception as exc:  # from the SDK, the transport or the server: never fatal here
                    self._connection_failed(describe(exc))
                finally:
                    deadline.cancel()
        finally:
            self._scope = None
            self.session = None
            if pump is not None:
                pump.close_writer()
                await kill_group(self.name, pump.pid)

    async def _open_session(
        self, stack: AsyncExitStack, spec: ServerSpec, pump: StderrPump | None
    ) -> tuple[ClientSession, list[types.Tool]]:
        read, write = await open_transport(stack, spec, pump)
        session = ClientSession(
            EofWatch(read, self._on_eof),
            write,
            read_timeout_seconds=self.settings.startup_timeout_s,  # initialize, list_tools
            message_handler=self._on_message,
            client_info=CLIENT_INFO,
        )
        await stack.enter_async_context(session)
        await session.initialize()
        return session, await list_tools(session)

    async def _watch(self, session: ClientSession) -> str:
        """Wait until the server dies or the host stops; return why."""
        while self._dead_reason is None and not self._stopping:
            with anyio.move_on_after(WATCH_INTERVAL_S):
                await self._wake.wait()
            self._wake.clear()
            pid = self._pump.pid if self._pump is not None else None
            if pid is not None and not pid_alive(pid):
                self.mark_dead(f"server process {pid} exited")
            elif self._relist and self.state is ServerState.UP:
                self._relist = False
                self.tools = self._offered(await list_tools(session))
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

    def _offered(self, tools: list[types.Tool]) -> list[types.Tool]:
        """The server's tools less what ``allowedTools`` / ``excludedTools`` leave out; a listed
        name that matches no tool is warned about (a typo would silently hide a tool)."""
        names = {tool.name for tool in tools}
        allowed, excluded = self._spec.allowed_tools, self._spec.excluded_tools
        for key, listed in (("allowedTools", allowed or ()), ("excludedTools", excluded)):
            for name in sorted(set(listed) - names):
                logger.warning("mcp[%s] %s names %r, which the server does not offer", self.name, key, name)
        return [t for t in tools if (allowed is None or t.name in allowed) and t.name not in excluded]

    def _go_up(self, session: ClientSession, tools: list[types.Tool]) -> None:
        tools = self._offered(tools)
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
            self._connection_failed(f"no answer within the startup timeout ({self.settings.startup_timeout_s:g}s)")
            scope.cancel()

    def _on_eof(self) -> None:
        self.mark_dead("connection closed")

    async def _on_message(self, message: IncomingMessage) -> None:
        """Session callback for server notifications and transport errors."""
        if isinstance(message, Exception):
            logger.warning("mcp[%s] transport error: %s", self.name, describe(message))
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
