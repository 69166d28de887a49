"""Reading and validating ``config.json`` into the frozen ``Config`` (owned by the supervisor).

The file is read once, at start-up. Every problem is reported as a ``ConfigError`` whose message
names the file and the key, so the user can fix it without reading code; after that, the rest of
the daemon trusts the values. ``${VAR}``s are filled first (``variables.py``); the ``servers``
block is ``servers.py``'s, the ``distributed`` block ``distributed_spec.py``'s, the checks
``config_checker.py``'s. Not pydantic: a model doubles the supervisor's import (75 -> 163 ms, +14 MiB).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from .config_checker import Checker, resolve_path
from .config_error import ConfigError
from .distributed_spec import DistributedSpec, parse_distributed
from .servers import ServerSpec, parse_servers
from .variables import Variables

LOG_LEVELS = ("trace", "debug", "info", "warning", "error")
REQUIRED_KEYS = (
    "model_name",
    "listening_port",
    "servers",
    "system_prompt",
    "temperature",
    "top_p",
    "min_p",
    "min_tokens_to_keep",
    "log_level",
    "log_filename",
)


@dataclass(frozen=True)
class Config:
    """The validated configuration; picklable so children can receive it at spawn."""

    model_name: str
    listening_port: int
    servers: dict[str, ServerSpec]
    system_prompt: str
    temperature: float
    top_p: float
    min_p: float
    min_tokens_to_keep: int
    log_level: str
    log_filename: Path
    listening_host: str = "127.0.0.1"
    max_tokens: int = 2048
    mcp_startup_timeout_s: float = 30.0
    tool_timeout_s: float = 60.0
    max_tool_rounds: int = 8
    max_batch_size: int = 256  # an upper bound: the KV budget decides (``kv_cache_mb``)
    kv_cache_mb: int | None = None  # None: what the device leaves after the weights and the prompt cache
    prompt_cache_mb: int = 1024
    shutdown_timeout_s: float = 600.0
    worker_restarts: int = 3
    worker_restart_window_s: float = 3600.0
    worker_stall_timeout_s: float = 300.0
    request_timeout_s: float = 3600.0
    api_key: str | None = field(default=None, repr=False)  # a secret: never logged
    max_tool_result_chars: int = 32_000
    max_pending_requests: int | None = None  # None: no cap, requests queue
    allowed_origins: tuple[str, ...] = ()  # browser pages (Origin) let in, with CORS; "*": any
    allowed_hosts: tuple[str, ...] = ()  # Host names accepted beyond loopback and the bind address
    distributed: DistributedSpec | None = None  # None: one worker process (the default)
    served_model_name: str = ""  # what /v1/models and every response's "model" say
    config_path: Path = field(default=Path("config.json"), compare=False)


def load_log_filename(path: Path) -> tuple[dict[str, Any], Path]:
    """Read the file and resolve ``log_filename`` alone, so the log can open before the rest
    is validated (errors about other keys must go to the log, and need the file first)."""
    raw = _read_json(path)
    if "log_filename" not in raw:
        raise ConfigError(f"{path}: required key 'log_filename' is missing")
    value = Variables(path).substitute(raw["log_filename"], "log_filename")
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{path}: 'log_filename' must be a non-empty string")
    return raw, resolve_path(path, value)


def load_config(path: Path) -> Config:
    """Read, substitute and validate the config at ``path``."""
    raw, log_filename = load_log_filename(path)
    return parse_config(raw, path, log_filename)


def parse_config(raw: dict[str, Any], path: Path, log_filename: Path) -> Config:
    """Validate an already-read config mapping (see ``load_log_filename``)."""
    if "mcpServers" in raw:
        if "servers" in raw:
            raise ConfigError(f"{path}: 'servers' and 'mcpServers' name the same thing: keep one")
        raw = {**raw, "servers": raw["mcpServers"]}
        servers_key = "mcpServers"
    else:
        servers_key = "servers"
    missing = [key for key in REQUIRED_KEYS if key not in raw]
    if missing:
        raise ConfigError(f"{path}: required key(s) missing: {', '.join(missing)}")
    values = Variables(path).substitute(raw)
    check = Checker(path, values)
    log_level = check.string("log_level").lower()
    if log_level not in LOG_LEVELS:
        raise ConfigError(f"{path}: 'log_level' must be one of {', '.join(LOG_LEVELS)}")
    return Config(
        model_name=check.string("model_name"),
        listening_port=check.integer("listening_port", 0, 65535),  # 0: any free port (the log says which)
        servers=parse_servers(values["servers"], str(path), path.parent, servers_key),
        system_prompt=check.string("system_prompt", allow_empty=True),
        temperature=check.number("temperature", 0.0, math.inf),
        top_p=check.number("top_p", 0.0, 1.0, low_open=True),
        min_p=check.number("min_p", 0.0, 1.0),
        min_tokens_to_keep=check.integer("min_tokens_to_keep", 1, 1_000_000),
        log_level=log_level,
        log_filename=log_filename,
        listening_host=check.string("listening_host", default="127.0.0.1"),
        max_tokens=check.integer("max_tokens", 1, 10_000_000, default=2048),
        mcp_startup_timeout_s=check.number("mcp_startup_timeout_s", 0.0, 3600.0, True, 30.0),
        tool_timeout_s=check.number("tool_timeout_s", 0.0, 86400.0, True, 60.0),
        max_tool_rounds=check.integer("max_tool_rounds", 0, 1000, default=8),
        max_batch_size=check.integer("max_batch_size", 1, 256, default=256),
        kv_cache_mb=check.optional_integer("kv_cache_mb", 1, 100_000_000),
        prompt_cache_mb=check.integer("prompt_cache_mb", 0, 1_000_000, default=1024),
        shutdown_timeout_s=check.number("shutdown_timeout_s", 0.0, 86400.0, True, 600.0),
        worker_restarts=check.integer("worker_restarts", 0, 1000, default=3),
        worker_restart_window_s=check.number("worker_restart_window_s", 0.0, 365 * 86400.0, True, 3600.0),
        worker_stall_timeout_s=check.number("worker_stall_timeout_s", 0.0, 86400.0, True, 300.0),
        request_timeout_s=check.number("request_timeout_s", 0.0, 7 * 86400.0, True, 3600.0),
        api_key=check.optional_string("api_key"),
        max_tool_result_chars=check.integer("max_tool_result_chars", 100, 100_000_000, default=32_000),
        max_pending_requests=check.optional_integer("max_pending_requests", 1, 1_000_000),
        allowed_origins=_origins(path, values.get("allowed_origins")),
        allowed_hosts=_hosts(path, values.get("allowed_hosts")),
        distributed=parse_distributed(path, values.get("distributed")),
        served_model_name=check.string("served_model_name", default=_served_name(check.string("model_name"))),
        config_path=path,
    )


def is_local(model_name: str) -> bool:
    """Whether ``model_name`` is a folder on this machine (else a Hugging Face repository id)."""
    return Path(model_name).expanduser().exists()


def _served_name(model_name: str) -> str:
    """The default name the model is served under: a Hub id as it is, a local folder by its own
    name (its absolute path is no client's business)."""
    return Path(model_name).expanduser().resolve().name if is_local(model_name) else model_name


def _read_json(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read config file: {exc}") from None
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not valid JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a JSON object")
    return raw


def _string_list(path: Path, key: str, value: Any) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise ConfigError(f"{path}: '{key}' must be a list of non-empty strings")
    return [v.strip() for v in value]


def _origins(path: Path, value: Any) -> tuple[str, ...]:
    """``allowed_origins``: each ``scheme://host[:port]`` as browsers send it in ``Origin``
    (lower case, no path), or ``"*"`` for any."""
    origins = []
    for item in _string_list(path, "allowed_origins", value):
        if item == "*":
            origins.append(item)
            continue
        parts = urlsplit(item)
        if not parts.scheme or not parts.netloc or parts.path not in ("", "/") or parts.query or parts.fragment:
            raise ConfigError(
                f"{path}: 'allowed_origins' entry {item!r} must be an origin such as \"http://localhost:3000\" "
                "(scheme, host and port only) or \"*\""
            )
        origins.append(f"{parts.scheme}://{parts.netloc}".lower())
    return tuple(origins)


def _hosts(path: Path, value: Any) -> tuple[str, ...]:
    """``allowed_hosts``: host names (or IPs) without port, as the ``Host`` header may carry
    them, or ``"*"`` for any."""
    hosts = []
    for item in _string_list(path, "allowed_hosts", value):
        with_port = item.count(":") == 1 or item.startswith("[") != item.endswith("]")
        if item != "*" and ("/" in item or " " in item or with_port):
            raise ConfigError(
                f"{path}: 'allowed_hosts' entry {item!r} must be a host name or IP without scheme or port "
                "(any port is accepted), or \"*\""
            )
        hosts.append(item.lower().strip("[]").rstrip("."))
    return tuple(hosts)
