"""An MCP server's transport as the SDK opens it (stdio, SSE, streamable HTTP), its tool list
page by page, the read stream that reports its end, and one log line for a failure: what
``mcp_connection`` uses but does not decide."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AsyncExitStack
from typing import Any

import anyio
import httpx2
import mcp_types as types
from mcp.client.session import ClientSession
from mcp.client.sse import sse_client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError

from ..common.servers import ServerSpec
from .mcp_process import StartError, StderrPump, stdio_parameters, stdio_transport

MAX_TOOL_PAGES = 100
HTTP_TIMEOUT_S = 30.0
HTTP_READ_TIMEOUT_S = 300.0


async def open_transport(stack: AsyncExitStack, spec: ServerSpec, pump: StderrPump | None) -> tuple[Any, Any]:
    """Open the SDK client transport for a server; its contexts go on the caller's stack."""
    if spec.transport == "stdio":
        assert pump is not None
        params = stdio_parameters(spec.command, spec.args, spec.env, spec.cwd)
        return await stack.enter_async_context(stdio_transport(params, pump))
    headers = dict(spec.headers)
    if spec.transport == "sse":
        return await stack.enter_async_context(sse_client(spec.url, headers=headers, timeout=HTTP_TIMEOUT_S))
    client = httpx2.AsyncClient(headers=headers, timeout=httpx2.Timeout(HTTP_TIMEOUT_S, read=HTTP_READ_TIMEOUT_S))
    await stack.enter_async_context(client)
    return await stack.enter_async_context(streamable_http_client(spec.url, http_client=client))


async def list_tools(session: ClientSession) -> list[types.Tool]:
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


class EofWatch:
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

    def __aiter__(self) -> EofWatch:
        return self

    async def __anext__(self) -> Any:
        try:
            return await self._inner.__anext__()
        except (StopAsyncIteration, anyio.ClosedResourceError):
            self._on_eof()
            raise

    async def aclose(self) -> None:
        await self._inner.aclose()

    async def __aenter__(self) -> EofWatch:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


def describe(exc: BaseException) -> str:
    """One line for the log: the first leaf of an exception group, with its type."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    if isinstance(exc, StartError):
        return str(exc)
    if isinstance(exc, MCPError):
        return f"{exc.message} (MCP error {exc.code})"
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
