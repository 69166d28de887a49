"""A small real MCP server for the MCP host tests.

Built with the SDK's ``MCPServer`` so the tests talk to a genuine server over
every transport: stdio by default, or SSE / streamable HTTP on a loopback
port.  Its tools cover the paths the host must handle: a normal result
(``add``, ``echo``), a slow tool (timeouts), a crash (``os._exit``) and a tool
error (``fail``).  It writes one line to stderr at start so stderr capture can
be checked, and ``--page-size`` makes it list its tools in pages (``next_cursor``).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

import anyio
from mcp.server import MCPServer, ServerRequestContext
from mcp.server.context import CallNext, HandlerResult
from mcp.server.mcpserver import Context
from mcp.server.mcpserver.exceptions import ToolError


def build_server(name: str) -> MCPServer:
    """Create the server with its tools registered."""
    server: MCPServer = MCPServer(name)

    @server.tool()
    def add(a: int, b: int) -> int:
        """Add two integers."""
        return a + b

    @server.tool()
    def echo(text: str) -> str:
        """Return the text unchanged."""
        return text

    @server.tool()
    async def slow(seconds: float) -> str:
        """Sleep for the given number of seconds, then answer "done"."""
        await anyio.sleep(seconds)
        return "done"

    @server.tool()
    def big(size: int) -> str:
        """Return a report of about `size` characters (too large for a small context window)."""
        line = "Row {:06d}: quarterly figures, all values nominal.\n"
        return "".join(line.format(n) for n in range(size // len(line.format(0)) + 1))[:size]

    @server.tool()
    def crash() -> str:
        """Kill the server process at once, as a crash would."""
        os._exit(1)

    @server.tool()
    def fail() -> str:
        """Raise, so the client receives an is_error result."""
        # ToolError: the anticipated kind, logged in one line (others print a long traceback).
        raise ToolError("fail was called")

    return server


def paginate_tools(server: MCPServer, page_size: int) -> None:
    """Answer tools/list in pages of `page_size`, so a client has to follow `next_cursor`."""

    async def middleware(ctx: ServerRequestContext[Any, Any], call_next: CallNext) -> HandlerResult:
        result = await call_next(ctx)
        if ctx.method != "tools/list" or not isinstance(result, dict):
            return result  # the chain hands on wire-form dicts
        start = int((ctx.params or {}).get("cursor") or 0)
        end = start + page_size
        page = {**result, "tools": result["tools"][start:end]}
        if end < len(result["tools"]):
            page["nextCursor"] = str(end)
        return page

    server.middleware.append(middleware)


def add_grow_tool(server: MCPServer) -> None:
    """A `grow` tool that adds `mul` at run time and tells the client (tools/list_changed)."""

    def mul(a: int, b: int) -> int:
        """Multiply two integers."""
        return a * b

    @server.tool()
    async def grow(ctx: Context) -> str:
        """Add the `mul` tool to this server."""
        server.add_tool(mul)
        await ctx.session.send_tool_list_changed()
        return "mul added"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--transport", choices=("stdio", "sse", "streamable-http"), default="stdio")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--name", default="calc")
    parser.add_argument("--page-size", type=int, default=0, help="list tools in pages of this size")
    parser.add_argument("--grow", action="store_true", help="offer `grow`, which adds a tool at run time")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    server = build_server(args.name)
    if args.page_size > 0:
        paginate_tools(server, args.page_size)
    if args.grow:
        add_grow_tool(server)
    greeting = f", greeting {os.environ['CALC_GREETING']}" if "CALC_GREETING" in os.environ else ""
    print(f"calc server {args.name} starting (pid {os.getpid()}, {args.transport}{greeting})", file=sys.stderr, flush=True)
    if args.transport == "stdio":
        server.run()
    else:
        server.run(args.transport, host=args.host, port=args.port)


if __name__ == "__main__":
    main()
