"""The ``servers`` block of the config (mcp.json as Claude Desktop, Cursor and VS Code write it):
each entry validated once, at start, into the typed ``ServerSpec`` the MCP host consumes.

An invalid entry is a ``ConfigError`` naming the file and the entry's key, not a skipped server;
keys this daemon does not understand are warned about and ignored.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping
from urllib.parse import urlsplit

from dotenv import dotenv_values

from .config_error import ConfigError
from .values import is_number

log = logging.getLogger("llm_server.config")

_SERVER_TYPES = ("stdio", "sse", "http", "streamable-http")


@dataclass(frozen=True)
class ServerSpec:
    """One validated ``servers`` entry, as the MCP host consumes it."""

    transport: str  # "stdio", "sse" or "http" (streamable HTTP)
    command: str = ""
    args: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict, repr=False)  # may hold secrets
    cwd: str | None = None
    url: str = field(default="", repr=False)  # may hold a token
    headers: Mapping[str, str] = field(default_factory=dict, repr=False)
    disabled: bool = False  # `disabled: true` / `enabled: false`: never started
    allowed_tools: tuple[str, ...] | None = None  # only these are offered (None: all)
    excluded_tools: tuple[str, ...] = ()  # never offered
    tool_timeout_s: float | None = None  # `timeout`: overrides tool_timeout_s
    startup_timeout_s: float | None = None  # `startupTimeout`: overrides mcp_startup_timeout_s


# Per-server keys this daemon understands (mcp.json as Claude Desktop, Cursor and VS Code write
# it); others are warned about and ignored.
SERVER_KEYS = frozenset({
    "type", "command", "args", "env", "cwd", "url", "headers", "disabled", "enabled",
    "allowedTools", "excludedTools", "envFile", "timeout", "startupTimeout",
})  # fmt: skip


def parse_servers(
    value: Any, where: str = "", folder: Path | None = None, key: str = "servers"
) -> dict[str, ServerSpec]:
    """Validate the mcp.json-style ``servers`` block (already ``${VAR}``-substituted) into typed
    specs, once, at start: an invalid entry is a config error naming it, not a skipped server.
    ``folder`` is where relative ``envFile`` paths start (the config's folder)."""
    prefix = f"{where}: " if where else ""
    if not isinstance(value, dict):
        raise ConfigError(f"{prefix}'{key}' must be an object (it may be empty: {{}})")
    return {name: _server(f"{prefix}'{key}.{name}'", spec, folder or Path.cwd()) for name, spec in value.items()}


def _server(where: str, spec: Any, folder: Path) -> ServerSpec:
    if not isinstance(spec, dict):
        raise ConfigError(f"{where} must be an object")
    for unknown in sorted(set(spec) - SERVER_KEYS):
        log.warning("%s: unknown key %r is ignored", where, unknown)
    common = _server_options(where, spec, folder)
    kind = spec.get("type", "stdio" if "command" in spec else None)
    if kind not in _SERVER_TYPES:
        raise ConfigError(f"{where}.type must be one of {', '.join(_SERVER_TYPES)}")
    if kind == "stdio":
        command, args, env, cwd = spec.get("command"), spec.get("args", []), spec.get("env", {}), spec.get("cwd")
        if not isinstance(command, str) or not command:
            raise ConfigError(f"{where}.command must be a non-empty string")
        if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
            raise ConfigError(f"{where}.args must be a list of strings")
        if not isinstance(env, dict) or not all(isinstance(v, str) for v in env.values()):
            raise ConfigError(f"{where}.env must be an object of strings")
        if cwd is not None and not isinstance(cwd, str):
            raise ConfigError(f"{where}.cwd must be a string")
        env = {**_env_file(where, spec, folder), **env}  # `env` wins over `envFile`
        return ServerSpec("stdio", command=command, args=tuple(args), env=env, cwd=cwd, **common)
    url, headers = spec.get("url"), spec.get("headers", {})
    if not isinstance(url, str) or not url:
        raise ConfigError(f"{where}.url must be a non-empty string")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        # The value itself is not quoted: a URL may carry a token.
        raise ConfigError(f"{where}.url must be an http:// or https:// URL with a host")
    if not isinstance(headers, dict) or not all(isinstance(v, str) for v in headers.values()):
        raise ConfigError(f"{where}.headers must be an object of strings")
    return ServerSpec("sse" if kind == "sse" else "http", url=url, headers=dict(headers), **common)


def _server_options(where: str, spec: dict[str, Any], folder: Path) -> dict[str, Any]:
    """The per-server keys every transport takes: on/off, tool lists, timeouts."""
    options: dict[str, Any] = {}
    for key in ("disabled", "enabled"):
        if key in spec and not isinstance(spec[key], bool):
            raise ConfigError(f"{where}.{key} must be true or false")
    options["disabled"] = spec.get("disabled", False) or not spec.get("enabled", True)
    for key, name in (("allowedTools", "allowed_tools"), ("excludedTools", "excluded_tools")):
        if key in spec:
            tools = spec[key]
            if not isinstance(tools, list) or not all(isinstance(t, str) for t in tools):
                raise ConfigError(f"{where}.{key} must be a list of tool names")
            options[name] = tuple(tools)
    for key, name in (("timeout", "tool_timeout_s"), ("startupTimeout", "startup_timeout_s")):
        if key in spec:
            value = spec[key]
            if not is_number(value, 0, 86400, low_open=True):
                raise ConfigError(f"{where}.{key} must be a number of seconds > 0 and <= 86400")
            options[name] = float(value)
    return options


def _env_file(where: str, spec: dict[str, Any], folder: Path) -> dict[str, str]:
    """The variables of the server's ``envFile`` (a dotenv file, relative to the config's folder)."""
    if "envFile" not in spec:
        return {}
    name = spec["envFile"]
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{where}.envFile must be a file name")
    path = folder.resolve() / Path(name).expanduser()  # an absolute name stays as it is
    if not path.is_file():
        raise ConfigError(f"{where}.envFile: {path} is not a file")
    return {key: value for key, value in dotenv_values(path).items() if value is not None}
