"""``llm-server check``: what a start would find, without starting.

It reads and validates the config (naming the ``${VAR}``s it uses and where each comes from,
never their values), starts each MCP server with the daemon's own MCP host and lists its tools
under the names the model will see, says whether the model is a local folder, in the Hugging
Face cache, or would be downloaded, and tries the port. It prints a short report and exits 0,
or with the exit code a start would have failed with (2 config, 4 port).
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any, Callable

from .common.config import Config, is_local, load_config
from .common.config_error import ConfigError
from .common.variables import Variables, names_used
from .common.exit_codes import ExitCode
from .common.sockets import bind_socket


def run_check(config_path: Path, say: Callable[[str], None] = print) -> int:
    logging.getLogger().addHandler(_Said(say))  # warnings (config keys, MCP servers) join the report
    try:
        config = load_config(config_path)
    except ConfigError as exc:
        say(f"config: {exc}")
        say(f"result: the daemon would not start (exit {int(ExitCode.CONFIG)})")
        return ExitCode.CONFIG
    say(f"config: {config_path}: valid (model {config.model_name}, "
        f"{config.listening_host}:{config.listening_port}, {len(config.servers)} MCP server(s))")  # fmt: skip
    for line in variables(config_path):
        say(line)
    for line in asyncio.run(_servers(config)):
        say(line)
    say(f"model: {model_source(config.model_name)}")
    try:
        bind_socket(config.listening_host, config.listening_port).close()
    except OSError as exc:
        say(f"port: cannot listen on {config.listening_host}:{config.listening_port}: {exc.strerror or exc}")
        say(f"result: the daemon would not start (exit {int(ExitCode.PORT)})")
        return ExitCode.PORT
    say(f"port: {config.listening_host}:{config.listening_port} is free")
    say("result: ok")
    return ExitCode.OK


class _Said(logging.Handler):
    def __init__(self, say: Callable[[str], None]) -> None:
        super().__init__(logging.WARNING)
        self.say = say

    def emit(self, record: logging.LogRecord) -> None:
        self.say(f"  {record.levelname.lower()}: {record.getMessage()}")


def variables(config_path: Path) -> list[str]:
    """One line per ``${VAR}`` the config uses: where its value comes from (never the value)."""
    found = Variables(config_path)
    return [f"variable: ${{{name}}} from {found.source(name) or 'nowhere'}" for name in names_used(config_path)]


async def _servers(config: Config) -> list[str]:
    """Start every server as the daemon would; one line per server with its tools."""
    from .model_worker.mcp_host import MCPHost

    lines = []
    async with MCPHost(
        config.servers, startup_timeout_s=config.mcp_startup_timeout_s, tool_timeout_s=config.tool_timeout_s,
        restart=False,
    ) as host:  # fmt: skip
        offered = host.offered()
        for name, status in host.status().items():
            if status.state == "up":
                tools = offered.get(name, [])
                lines.append(f"MCP server {name}: up, {len(tools)} tool(s): {', '.join(tools) or '-'}")
            elif status.state == "disabled":
                lines.append(f"MCP server {name}: disabled in the config")
            else:
                lines.append(f"MCP server {name}: {status.state}: {status.last_error} (the daemon would retry it)")
    return lines


def model_source(model: str) -> str:
    """Where the model would be loaded from."""
    if is_local(model):
        return f"{model} is a local folder"
    from huggingface_hub import try_to_load_from_cache

    try:
        cached: Any = try_to_load_from_cache(model, "config.json")
    except Exception as exc:  # noqa: BLE001 - a name the Hub would reject
        return f"{model} is neither a local folder nor a Hugging Face repository name ({exc})"
    if isinstance(cached, str):
        return f"{model} is in the Hugging Face cache ({Path(cached).parent})"
    return f"{model} is not in the Hugging Face cache: it will be downloaded at start"
