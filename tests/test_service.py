"""``llm-server service`` and ``llm-server check``, run as commands the way a person runs them.

The service managers themselves are replaced by recording stand-ins on ``PATH`` (a test must not
install a real service); the files are checked with ``plistlib`` and, where it exists,
``systemd-analyze verify``.
"""

from __future__ import annotations

import json
import os
import plistlib
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from daemon import base_config
from tool_model import CALC_SERVER

ROOT = Path(__file__).resolve().parents[1]


def write_config(folder: Path, model: Path | str, **overrides: object) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    config = base_config(model, 0, shutdown_timeout_s=120, **overrides)
    path = folder / "config.json"
    path.write_text(json.dumps(config))
    return path


def llm_server(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "llm_server", *args], capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}, cwd=cwd,
    )  # fmt: skip


def between(text: str, first: str, last: str) -> str:
    return text[text.index(first) : text.index(last) + len(last)]


def test_launchd_dry_run_writes_a_valid_plist(tmp_path: Path, tiny_model: Path) -> None:
    config = write_config(tmp_path / "proj", tiny_model, servers={"x": {"command": "y", "env": {"T": "${TOKEN}"}}})
    (tmp_path / "proj" / ".env").write_text("TOKEN=secret-value\n")
    done = llm_server("--config", str(config), "service", "install", "--dry-run",
                      env={"LLM_SERVER_SERVICE_MANAGER": "launchd", "HOME": str(tmp_path)})  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "the service will need: TOKEN" in done.stdout and "secret-value" not in done.stdout
    assert f"# {tmp_path}/Library/LaunchAgents/com.github.llm-server.proj.plist" in done.stdout
    plist = plistlib.loads(between(done.stdout, "<?xml", "</plist>").encode())
    assert plist["Label"] == "com.github.llm-server.proj"
    assert plist["ProgramArguments"][-2:] == ["--config", str(config)]
    assert Path(plist["ProgramArguments"][0]).name in ("llm-server", Path(sys.executable).name)
    assert plist["WorkingDirectory"] == str(tmp_path / "proj")
    assert plist["RunAtLoad"] is True and plist["KeepAlive"] == {"SuccessfulExit": False}
    assert plist["ThrottleInterval"] >= 10 and plist["ExitTimeOut"] > 120
    assert plist["StandardErrorPath"] == str(tmp_path / "proj" / "llm-server.log.stderr")
    assert set(plist["EnvironmentVariables"]) == {"PATH"}  # no secrets in the file
    assert "$ launchctl bootstrap gui/" in done.stdout
    assert not (tmp_path / "Library").exists()  # a dry run changes nothing


def test_systemd_dry_run_writes_a_valid_unit(tmp_path: Path, tiny_model: Path) -> None:
    config = write_config(tmp_path / "my proj", tiny_model)
    done = llm_server("service", "install", "--dry-run", cwd=tmp_path / "my proj",
                      env={"LLM_SERVER_SERVICE_MANAGER": "systemd", "HOME": str(tmp_path)})  # fmt: skip
    assert done.returncode == 0, done.stderr
    unit = between(done.stdout, "[Unit]", "WantedBy=default.target")
    for line in ("Restart=on-failure", "RestartPreventExitStatus=2", "KillSignal=SIGTERM", "TimeoutStopSec=180",
                 f"WorkingDirectory={tmp_path}/my proj", f'--config "{config}"'):  # fmt: skip
        assert line in unit, line
    assert "$ systemctl --user enable --now llm-server.my-proj.service" in done.stdout
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        return
    path = tmp_path / "llm-server.my-proj.service"
    path.write_text(unit + "\n")
    checked = subprocess.run([analyze, "verify", str(path)], capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0 and checked.stderr.strip() == "", checked.stderr


@pytest.mark.parametrize("kind", ["launchd", "systemd"])
def test_install_status_uninstall_drive_the_manager(tmp_path: Path, tiny_model: Path, kind: str) -> None:
    """Against a stand-in ``launchctl``/``systemctl`` that records its arguments: install writes
    the file and loads it, status asks, uninstall unloads and removes the file."""
    config = write_config(tmp_path / "proj", tiny_model)
    bin_dir, calls = tmp_path / "bin", tmp_path / "calls.txt"
    bin_dir.mkdir()
    for tool in ("launchctl", "systemctl"):
        (bin_dir / tool).write_text(f'#!/bin/sh\necho "{tool} $*" >> "{calls}"\n')
        (bin_dir / tool).chmod(0o755)
    env = {"LLM_SERVER_SERVICE_MANAGER": kind, "HOME": str(tmp_path), "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    file = (tmp_path / "Library/LaunchAgents/com.github.llm-server.proj.plist" if kind == "launchd"
            else tmp_path / ".config/systemd/user/llm-server.proj.service")  # fmt: skip
    assert llm_server("--config", str(config), "service", "install", env=env).returncode == 0
    assert file.is_file()
    assert llm_server("--config", str(config), "service", "status", env=env).returncode == 0
    assert llm_server("--config", str(config), "service", "uninstall", env=env).returncode == 0
    assert not file.exists()
    recorded = calls.read_text().splitlines()
    uid = os.getuid()
    if kind == "launchd":
        assert recorded == [
            f"launchctl bootstrap gui/{uid} {file}",
            f"launchctl print gui/{uid}/com.github.llm-server.proj",
            f"launchctl bootout gui/{uid}/com.github.llm-server.proj",
        ]
    else:
        assert recorded == [
            "systemctl --user daemon-reload",
            "systemctl --user enable --now llm-server.proj.service",
            "systemctl --user status --no-pager llm-server.proj.service",
            "systemctl --user disable --now llm-server.proj.service",
            "systemctl --user daemon-reload",
        ]


def test_check_on_a_good_config(tmp_path: Path, tiny_model: Path) -> None:
    servers = {"calc": {"command": sys.executable, "args": [str(CALC_SERVER)], "excludedTools": ["crash"]},
               "off": {"command": "x", "disabled": True}}  # fmt: skip
    config = write_config(tmp_path / "good", tiny_model, servers=servers, api_key="${KEY}")
    done = llm_server("check", "--config", str(config), env={"KEY": "k-123"})
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert "variable: ${KEY} from the environment" in out and "k-123" not in out
    assert "MCP server calc: up, 5 tool(s): add, echo, slow, big, fail" in out
    assert "MCP server off: disabled in the config" in out
    assert f"model: {tiny_model} is a local folder" in out
    assert "is free" in out and out.rstrip().endswith("result: ok")


def test_check_on_bad_configs(tmp_path: Path, tiny_model: Path) -> None:
    broken = write_config(tmp_path / "broken", tiny_model, temperature="hot")
    done = llm_server("check", "--config", str(broken))
    assert done.returncode == 2 and "'temperature' must be" in done.stdout

    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        busy = write_config(tmp_path / "busy", "acme/not-downloaded", listening_port=squatter.getsockname()[1])
        done = llm_server("check", "--config", str(busy), env={"HF_HUB_CACHE": str(tmp_path / "hub")})
    assert done.returncode == 4, done.stdout
    assert "acme/not-downloaded is not in the Hugging Face cache: it will be downloaded at start" in done.stdout
    assert "port: cannot listen on" in done.stdout
