"""``llm-server service install | uninstall | status``: run the daemon as a user service.

macOS: a LaunchAgent (``~/Library/LaunchAgents/<label>.plist``, written with ``plistlib``),
loaded with ``launchctl bootstrap gui/<uid>``. Linux: a systemd user unit
(``~/.config/systemd/user/<name>.service``), enabled with ``systemctl --user enable --now``.
Both run this installation's ``llm-server`` with the config's absolute path, in the config's
folder (where ``.env`` is read), restart it after a crash but not after a configuration error
(exit 2), give it longer than ``shutdown_timeout_s`` to drain before it is killed, and send its
stdout/stderr (the console lines) to files beside the log. Environment variables the config's
``${VAR}``s need are never copied into the file: secrets stay in the environment of the service
manager or in ``.env``; the command says which ones the service will need. ``--dry-run`` prints
the file and the commands instead of installing. ``LLM_SERVER_SERVICE_MANAGER`` (``launchd`` or
``systemd``) chooses the manager where ``sys.platform`` would not (tests, unusual systems).
"""

from __future__ import annotations

import os
import plistlib
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .common.config import Config, load_config
from .common.config_error import ConfigError
from .common.variables import names_used
from .common.exit_codes import ExitCode

EXIT_MARGIN_S = 60  # the service manager waits this much longer than shutdown_timeout_s
THROTTLE_S = 30  # launchd: at most one start per this many seconds


@dataclass(frozen=True)
class Service:
    """Everything both managers need to know about this daemon's service."""

    name: str  # e.g. "llm-server.myproject": a systemd unit name and the launchd label's tail
    program: list[str]  # the command line, config path included
    folder: Path  # the working directory: the config's folder
    stdout: Path
    stderr: Path
    stop_timeout_s: int
    path_env: str  # PATH for MCP server launchers (npx, uvx); not a secret

    @property
    def label(self) -> str:
        return f"com.github.{self.name}"


def describe(config: Config, config_path: Path, name: str | None = None) -> Service:
    folder = config_path.parent.resolve()
    name = name or re.sub(r"[^A-Za-z0-9_.-]", "-", folder.name) or "default"
    log = config.log_filename
    return Service(
        name=f"llm-server.{name}",
        program=[*_program(), "--config", str(config_path.resolve())],
        folder=folder,
        stdout=log.parent / f"{log.name}.stdout",
        stderr=log.parent / f"{log.name}.stderr",
        stop_timeout_s=int(config.shutdown_timeout_s) + EXIT_MARGIN_S,
        path_env=os.environ.get("PATH", "/usr/bin:/bin"),
    )


def _program() -> list[str]:
    """This installation's ``llm-server`` (the script beside this Python), else ``python -m``."""
    script = Path(sys.executable).parent / "llm-server"
    return [str(script)] if script.exists() else [sys.executable, "-m", "llm_server"]


def launchd_plist(service: Service) -> bytes:
    """A LaunchAgent: started at login and kept alive after a crash only (``SuccessfulExit``
    false), throttled, so a config error (exit 2) retries at most every ``THROTTLE_S``."""
    return plistlib.dumps(
        {
            "Label": service.label,
            "ProgramArguments": service.program,
            "WorkingDirectory": str(service.folder),
            "RunAtLoad": True,
            "KeepAlive": {"SuccessfulExit": False},
            "ThrottleInterval": THROTTLE_S,
            "ExitTimeOut": service.stop_timeout_s,
            "StandardOutPath": str(service.stdout),
            "StandardErrorPath": str(service.stderr),
            "EnvironmentVariables": {"PATH": service.path_env},
            "ProcessType": "Interactive",
        }
    )


def systemd_unit(service: Service) -> str:
    """A user unit: restarted on failure except after a config error (exit 2); SIGTERM to the
    supervisor only (it stops the children in order), SIGKILL to all after the timeout."""
    command = " ".join(_quote(part) for part in service.program)
    return f"""[Unit]
Description=llm-server ({service.folder})
After=network-online.target

[Service]
Type=simple
ExecStart={command}
WorkingDirectory={_percent(str(service.folder))}
Environment={_quote("PATH=" + service.path_env)}
Restart=on-failure
RestartSec=5
RestartPreventExitStatus={int(ExitCode.CONFIG)}
KillSignal=SIGTERM
KillMode=mixed
TimeoutStopSec={service.stop_timeout_s}
StandardOutput=append:{_percent(str(service.stdout))}
StandardError=append:{_percent(str(service.stderr))}

[Install]
WantedBy=default.target
"""


def _quote(text: str) -> str:
    """An argument as systemd splits command lines: double quotes around anything with a space,
    backslash or quote; ``%`` doubled (systemd's specifiers)."""
    text = _percent(text)
    if re.fullmatch(r"[A-Za-z0-9_@%+=:,./-]+", text):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _percent(text: str) -> str:
    """A path as systemd reads it: ``%`` starts a specifier, so a literal one is doubled."""
    return text.replace("%", "%%")


def manager() -> str:
    chosen = os.environ.get("LLM_SERVER_SERVICE_MANAGER")
    if chosen in ("launchd", "systemd"):
        return chosen
    return "launchd" if sys.platform == "darwin" else "systemd"


def plan(action: str, service: Service, kind: str) -> tuple[Path, bytes | None, list[list[str]]]:
    """The file to write (None: remove, or leave alone for status) and the commands to run."""
    home = Path.home()
    if kind == "launchd":
        path = home / "Library" / "LaunchAgents" / f"{service.label}.plist"
        domain = f"gui/{os.getuid()}"
        commands = {
            "install": [["launchctl", "bootstrap", domain, str(path)]],
            "uninstall": [["launchctl", "bootout", f"{domain}/{service.label}"]],
            "status": [["launchctl", "print", f"{domain}/{service.label}"]],
        }[action]
        content = launchd_plist(service) if action == "install" else None
    else:
        path = home / ".config" / "systemd" / "user" / f"{service.name}.service"
        commands = {
            "install": [
                ["systemctl", "--user", "daemon-reload"],
                ["systemctl", "--user", "enable", "--now", path.name],
            ],
            "uninstall": [["systemctl", "--user", "disable", "--now", path.name]],
            "status": [["systemctl", "--user", "status", "--no-pager", path.name]],
        }[action]
        content = systemd_unit(service).encode() if action == "install" else None
    return path, content, commands


def run_service(
    action: str, config_path: Path, dry_run: bool = False, name: str | None = None,
    say: Callable[[str], None] = print,
) -> int:  # fmt: skip
    try:
        config = load_config(config_path)
    except ConfigError as exc:
        say(f"llm-server: {exc}")
        return ExitCode.CONFIG
    kind = manager()
    service = describe(config, config_path, name)
    path, content, commands = plan(action, service, kind)
    if action == "install":
        needed = names_used(config_path)
        if needed:
            say(f"the service will need: {', '.join(needed)} (set them in {service.folder / '.env'} or in the "
                f"{kind} environment; they are not written into the service file)")  # fmt: skip
    if dry_run:
        if content is not None:
            say(f"# {path}")
            say(content.decode())
        for command in commands:
            say("$ " + " ".join(command))
        return ExitCode.OK
    if action == "install":
        path.parent.mkdir(parents=True, exist_ok=True)
        service.stdout.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content or b"")
        say(f"wrote {path}")
    code = _run_all(commands, say)
    if action == "uninstall":
        if path.exists():
            path.unlink()
            say(f"removed {path}")
        if kind == "systemd":
            code = _run_all([["systemctl", "--user", "daemon-reload"]], say) or code
    return code


def _run_all(commands: list[list[str]], say: Callable[[str], None]) -> int:
    for command in commands:
        if shutil.which(command[0]) is None:
            say(f"llm-server: {command[0]} is not on PATH")
            return ExitCode.INTERNAL
        result = subprocess.run(command, capture_output=True, text=True)
        output = (result.stdout + result.stderr).strip()
        if output:
            say(output)
        if result.returncode != 0:
            say(f"llm-server: {' '.join(command)} failed with exit code {result.returncode}")
            return result.returncode
    return ExitCode.OK
