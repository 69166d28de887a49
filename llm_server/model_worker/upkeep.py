"""What the worker keeps up between requests: the system turn warm in the prompt cache, and the
metrics' gauges current.

The system turn (the config's system prompt with every MCP tool's schema, as the chat template
renders it) is prefilled into the prompt cache before the daemon listens, so the first request
reuses it like every later one; when the tool list changes (a server comes or goes) it is a new
prefix, prefilled again in the background. The gauges (``metrics``) are read from the engine's
last turn and the MCP servers' states every ``SAMPLE_S``, on the worker's event loop.
"""

from __future__ import annotations

import asyncio
import logging
import time

from . import metrics
from .engine import Engine
from .mcp_host import MCPHost
from .tool_loop import ToolLoop

log = logging.getLogger("llm_server.model_worker")

SAMPLE_S = 0.25  # how often the gauges are read (and the tool list compared with the warmed one)


class Upkeep:
    """The warm system turn and the gauges, for one loaded engine and its MCP host."""

    def __init__(self, engine: Engine, loop: ToolLoop, host: MCPHost, system_prompt: str) -> None:
        self.engine = engine
        self.loop = loop
        self.host = host
        self.system_prompt = system_prompt
        self.warmed: list[str] | None = None  # the tool names the system turn was warmed with

    async def warm(self) -> None:
        """Prefill the system turn into the prompt cache (a failure only costs the next request
        that prefill)."""
        started = time.monotonic()
        tools = [tool["function"]["name"] for tool in self.host.tools()]
        self.warmed = tools
        try:
            tokens = await self.loop.warm(self.system_prompt)
        except Exception:  # noqa: BLE001 - not worth failing the start over
            log.warning("could not warm the prompt cache with the system prompt", exc_info=True)
            return
        log.info("prompt cache warmed with the system prompt and %d tool(s): %d tokens in %.2f s", len(tools), tokens,
                 time.monotonic() - started)  # fmt: skip

    async def run(self) -> None:
        """Every ``SAMPLE_S`` until cancelled: the gauges, and the system turn warmed again when
        the tool list is no longer the one it was warmed with."""
        while True:
            await asyncio.sleep(SAMPLE_S)
            statuses = self.host.status().values()
            metrics.sample(self.engine.load, self.engine.kv_cache_bytes, {s.name: s.state == "up" for s in statuses})
            if self.warmed is not None:
                tools = [tool["function"]["name"] for tool in self.host.tools()]
                if tools != self.warmed:
                    log.info("the tool list changed (%d -> %d tools): warming the prompt cache again",
                             len(self.warmed), len(tools))  # fmt: skip
                    await self.warm()
