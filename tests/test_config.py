"""Config parsing and ``${VAR}`` substitution, as pure functions."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llm_server.common.config import load_config
from llm_server.common.config_error import ConfigError
from llm_server.common.servers import ServerSpec

VALID = {
    "model_name": "some/model",
    "listening_port": 8000,
    "servers": {},
    "system_prompt": "sys",
    "temperature": 0.7,
    "top_p": 0.9,
    "min_p": 0.05,
    "min_tokens_to_keep": 1,
    "log_level": "warning",
    "log_filename": "server.log",
}


def write(tmp_path: Path, document: object, dotenv: str | None = None) -> Path:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(document))
    if dotenv is not None:
        (tmp_path / ".env").write_text(dotenv)
    return path


def test_valid_config_with_defaults(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, VALID))
    assert config.listening_host == "127.0.0.1"
    assert config.max_tokens == 2048
    assert config.max_tool_rounds == 8
    assert config.tool_timeout_s == 60.0
    assert config.mcp_startup_timeout_s == 30.0
    assert config.prompt_cache_mb == 1024
    assert config.max_batch_size == 256 and config.kv_cache_mb is None  # memory decides (admission)
    assert config.worker_restarts == 3 and config.worker_restart_window_s == 3600.0
    assert config.worker_stall_timeout_s == 300.0 and config.request_timeout_s == 3600.0
    assert config.max_pending_requests is None  # no cap: requests queue
    assert config.allowed_origins == () and config.allowed_hosts == ()
    assert config.log_filename == tmp_path.resolve() / "server.log"


def test_listening_port_0_means_any_free_port(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, {**VALID, "listening_port": 0})).listening_port == 0


@pytest.mark.parametrize("key", list(VALID))
def test_every_key_is_required(tmp_path: Path, key: str) -> None:
    document = {k: v for k, v in VALID.items() if k != key}
    with pytest.raises(ConfigError, match=key):
        load_config(write(tmp_path, document))


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("listening_port", -1), ("listening_port", 65536), ("listening_port", "8000"), ("listening_port", True),
        ("temperature", -0.1), ("temperature", "hot"),
        ("top_p", 0), ("top_p", 1.01),
        ("min_p", -0.1), ("min_p", 1.1),
        ("min_tokens_to_keep", 0), ("min_tokens_to_keep", 1.5),
        ("log_level", "verbose"), ("model_name", ""), ("system_prompt", 3),
        ("servers", []), ("servers", {"a": {"type": "carrier-pigeon"}}), ("servers", {"a": {"type": "sse"}}),
        ("servers", {"a": {"type": "http", "url": "not a url"}}), ("servers", {"a": {"type": "sse", "url": "ftp://h/x"}}),
        ("servers", {"a": {"command": "x", "args": "not a list"}}),
        ("max_tokens", 0), ("listening_host", ""), ("prompt_cache_mb", -1), ("prompt_cache_mb", 1.5),
        ("kv_cache_mb", 0), ("kv_cache_mb", "8"), ("max_batch_size", 0), ("max_batch_size", 257),
        ("worker_restart_window_s", 0), ("worker_restart_window_s", "1h"),
        ("worker_stall_timeout_s", 0), ("request_timeout_s", -1),
        ("max_pending_requests", 0), ("max_pending_requests", "64"),
        ("allowed_origins", "http://localhost:3000"), ("allowed_origins", ["http://localhost:3000/app"]),
        ("allowed_origins", ["localhost:3000"]), ("allowed_origins", [""]),
        ("allowed_hosts", "myhost"), ("allowed_hosts", ["myhost:8000"]), ("allowed_hosts", ["http://myhost"]),
        ("allowed_hosts", ["[::1]:80"]),
    ],
)
def test_bad_values_name_the_key(tmp_path: Path, key: str, value: object) -> None:
    with pytest.raises(ConfigError, match=key):
        load_config(write(tmp_path, {**VALID, key: value}))


def test_browser_keys_are_normalised(tmp_path: Path) -> None:
    document = {**VALID, "allowed_origins": ["HTTP://LocalHost:3000/", "*"], "allowed_hosts": ["My-Mac.", "[::1]"],
                "max_pending_requests": None}  # fmt: skip
    config = load_config(write(tmp_path, document))
    assert config.allowed_origins == ("http://localhost:3000", "*")
    assert config.allowed_hosts == ("my-mac", "::1")
    assert config.max_pending_requests is None
    assert load_config(write(tmp_path, {**VALID, "max_pending_requests": 4})).max_pending_requests == 4


@pytest.mark.parametrize("level", ["trace", "debug", "info", "warning", "error", "WARNING"])
def test_log_levels(tmp_path: Path, level: str) -> None:
    assert load_config(write(tmp_path, {**VALID, "log_level": level})).log_level == level.lower()


def test_substitution_at_any_depth_env_before_dotenv(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FROM_ENV", "env-value")
    monkeypatch.delenv("FROM_FILE", raising=False)
    document = {
        **VALID,
        "model_name": "${FROM_ENV}/x",
        "servers": {"s": {"command": "run", "args": ["--key", "${FROM_FILE}"], "env": {"T": "a${FROM_ENV}b"}}},
    }
    config = load_config(write(tmp_path, document, dotenv="FROM_FILE=file-value\nFROM_ENV=loses\n"))
    assert config.model_name == "env-value/x"
    assert config.servers["s"] == ServerSpec(
        "stdio", command="run", args=("--key", "file-value"), env={"T": "aenv-valueb"}
    )


def test_missing_variable_names_variable_and_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOPE", raising=False)
    with pytest.raises(ConfigError, match=r"servers\.s\.headers\.Authorization.*\$\{NOPE\}"):
        load_config(write(tmp_path, {**VALID, "servers": {"s": {"type": "http", "url": "http://x",
                                                                  "headers": {"Authorization": "Bearer ${NOPE}"}}}}))


def test_not_json_and_not_object(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{nope")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_config(tmp_path / "config.json")
    with pytest.raises(ConfigError, match="JSON object"):
        load_config(write(tmp_path, [1]))
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.json")


def test_mcp_json_server_keys(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "s.env").write_text("FROM_FILE=1\nBOTH=file\n")
    document = {**VALID}
    del document["servers"]
    document["mcpServers"] = {
        "s": {"command": "run", "env": {"BOTH": "env"}, "envFile": "s.env", "disabled": False, "enabled": True,
              "allowedTools": ["a"], "excludedTools": ["b"], "timeout": 5, "startupTimeout": 9, "extra": 1},
        "off": {"command": "run", "enabled": False},
    }  # fmt: skip
    config = load_config(write(tmp_path, document))
    spec = config.servers["s"]
    assert spec.env == {"FROM_FILE": "1", "BOTH": "env"}  # `env` wins over `envFile`
    assert (spec.allowed_tools, spec.excluded_tools, spec.tool_timeout_s, spec.startup_timeout_s) == (
        ("a",), ("b",), 5.0, 9.0
    )
    assert not spec.disabled and config.servers["off"].disabled
    assert "'mcpServers.s': unknown key 'extra' is ignored" in caplog.text
    assert "FROM_FILE" not in repr(config)  # env values may be secrets: never in a repr


@pytest.mark.parametrize(
    ("entry", "message"),
    [({"envFile": "missing.env"}, "envFile"), ({"timeout": 0}, "timeout"), ({"startupTimeout": "9"}, "startupTimeout"),
     ({"allowedTools": "add"}, "allowedTools"), ({"disabled": "yes"}, "disabled")],
)  # fmt: skip
def test_bad_mcp_json_server_keys(tmp_path: Path, entry: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, {**VALID, "servers": {"s": {"command": "run", **entry}}}))


def test_servers_and_mcp_servers_together(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="'servers' and 'mcpServers'"):
        load_config(write(tmp_path, {**VALID, "mcpServers": {}}))


def test_served_model_name_defaults_to_the_hub_id_or_the_folders_own_name(tmp_path: Path) -> None:
    """A local folder's absolute path is never the name clients see."""
    assert load_config(write(tmp_path, VALID)).served_model_name == "some/model"
    folder = tmp_path / "models" / "my-model"
    folder.mkdir(parents=True)
    assert load_config(write(tmp_path, {**VALID, "model_name": f"{folder}/"})).served_model_name == "my-model"
    named = {**VALID, "model_name": str(folder), "served_model_name": "local"}
    assert load_config(write(tmp_path, named)).served_model_name == "local"
    with pytest.raises(ConfigError, match="served_model_name"):
        load_config(write(tmp_path, {**VALID, "served_model_name": ""}))


def test_ring_backend_needs_ips(tmp_path: Path) -> None:
    """Host names with the ring backend are a config error (mlx.launch would fail later with a
    traceback); IPs, other backends, and a host file whose hosts all have IPs are fine."""
    for hosts in (["mac-a.local", "192.168.1.11"], ["localhost"]):
        with pytest.raises(ConfigError, match="the ring backend needs IP addresses"):
            load_config(write(tmp_path, {**VALID, "distributed": {"hosts": hosts}}))
    assert load_config(write(tmp_path, {**VALID, "distributed": {"hosts": ["192.168.1.10", "::1"]}})).distributed
    assert load_config(write(tmp_path, {**VALID, "distributed": {"hosts": ["mac-a"], "backend": "mpi"}})).distributed
    (tmp_path / "hosts.json").write_text(json.dumps([{"ssh": "mac-a", "ips": ["192.168.1.10"]}, {"ssh": "mac-b"}]))
    with pytest.raises(ConfigError, match="the ring backend needs IP addresses: give 'ips' for mac-b"):
        load_config(write(tmp_path, {**VALID, "distributed": {"hostfile": "hosts.json"}}))
    (tmp_path / "hosts.json").write_text(json.dumps({"hosts": [{"ssh": "mac-a", "ips": ["192.168.1.10"]}]}))
    assert load_config(write(tmp_path, {**VALID, "distributed": {"hostfile": "hosts.json"}})).distributed


def test_an_integer_too_big_for_a_float_names_the_key(tmp_path: Path) -> None:
    """Before: ``math.isfinite`` raised ``OverflowError`` (a traceback, exit 1) on a 400-digit
    integer instead of the error naming the key."""
    for key in ("tool_timeout_s", "top_p"):
        with pytest.raises(ConfigError, match=key):
            load_config(write(tmp_path, {**VALID, key: 10**400}))
