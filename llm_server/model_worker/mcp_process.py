"""The processes of stdio MCP servers: how they are launched, heard and killed.

The SDK starts a stdio server with ``start_new_session`` but does not expose its pid, passes it
only a handful of environment variables, and kills its process group only when the server
outlives the close of stdin. This module fills those gaps for `mcp_connection`: a ``/bin/sh``
shim that reports the pid and then ``exec``s the server (so the pid is the server's and the
process group's), the environment launchers such as ``npx`` and ``uvx`` need, a thread per
server that logs its stderr line by line as ``mcp[<server>] <line>``, and a process-group kill
that leaves nothing behind (``npx`` → ``node``, ``sh -c`` children).

Stopping a server is the MCP shutdown sequence, which the SDK's transport runs when it closes:
the server's stdin is closed; a server still running ``PROCESS_TERMINATION_TIMEOUT`` later gets
SIGTERM on its process group, and SIGKILL ``FORCE_KILL_TIMEOUT`` after that. `stdio_transport`
logs it with the pid, since the SDK does it silently. The server gets SIGTERM with its default
meaning (or its own handler): the worker does not ignore it (see `common.child`), so nor does the
server.

POSIX only, like the rest of the daemon.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import threading
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Any

from mcp.client.stdio import FORCE_KILL_TIMEOUT, PROCESS_TERMINATION_TIMEOUT, StdioServerParameters, stdio_client

logger = logging.getLogger("llm_server.mcp")

# Members of a server's process group left after the connection closed get SIGTERM, then this
# long before SIGKILL.
GROUP_KILL_GRACE_S = 1.0

# Variables that launchers (npx, uvx, node, python) need to work as they do in a shell. The
# SDK passes only HOME, LOGNAME, PATH, SHELL, TERM and USER; secrets stay out unless a
# server's own `env` names them.
INHERITED_ENV = frozenset(
    {
        "PATH", "HOME", "USER", "LOGNAME", "SHELL", "TERM", "LANG", "LANGUAGE", "TZ",
        "TMPDIR", "TMP", "TEMP", "SSL_CERT_FILE", "SSL_CERT_DIR", "REQUESTS_CA_BUNDLE",
        "NODE_EXTRA_CA_CERTS", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY",
        "http_proxy", "https_proxy", "no_proxy",
    }
)  # fmt: skip
INHERITED_ENV_PREFIXES = ("LC_", "XDG_", "NPM_CONFIG_", "npm_config_", "UV_")

# The SDK does not expose the server's pid. This launcher prints it on stderr and then execs
# the server, which keeps the pid: the host needs it to watch the process and kill its group.
PID_MARKER = "@@llm-server-mcp-pid"
EXEC_SHIM = f'echo "{PID_MARKER} $$" >&2; exec "$@"'


class StartError(Exception):
    """A server that could not be started, with a reason fit for the log."""


def stdio_parameters(
    command: str, args: Sequence[str], env: Mapping[str, str], cwd: str | None
) -> StdioServerParameters:
    """The launch through `EXEC_SHIM`, with a checked command and the launcher environment."""
    full_env = launcher_environment(env)
    if cwd is not None and not os.path.isdir(cwd):
        raise StartError(f"working directory {cwd!r} does not exist")
    path = command
    if os.sep in path and not os.path.isabs(path) and cwd is not None:
        path = os.path.join(cwd, path)
    resolved = shutil.which(path, path=full_env.get("PATH", os.defpath))
    if resolved is None:
        raise StartError(f"command not found: {command!r}")
    return StdioServerParameters(
        command="/bin/sh", args=["-c", EXEC_SHIM, "sh", resolved, *args], env=full_env, cwd=cwd
    )


@contextlib.asynccontextmanager
async def stdio_transport(params: StdioServerParameters, pump: StderrPump) -> AsyncIterator[Any]:
    """The SDK's stdio transport (its read and write streams), with the server's stop logged."""
    stopping_since: float | None = None
    try:
        async with stdio_client(params, errlog=pump.writer) as streams:
            pump.close_writer()  # the server has its copy now; EOF follows when its group is gone
            try:
                yield streams
            finally:
                if pump.pid is not None and pid_alive(pump.pid):
                    stopping_since = time.monotonic()
                    logger.info(
                        "mcp[%s] stopping pid %d: closing its stdin; SIGTERM to its process group if it is "
                        "still running after %gs, SIGKILL %gs after that",
                        pump.name, pump.pid, PROCESS_TERMINATION_TIMEOUT, FORCE_KILL_TIMEOUT,
                    )  # fmt: skip
    finally:
        if stopping_since is not None and pump.pid is not None:
            state = "still there" if pid_alive(pump.pid) else "exited"
            logger.info("mcp[%s] pid %d %s after %.1fs", pump.name, pump.pid, state, time.monotonic() - stopping_since)


def launcher_environment(extra: Mapping[str, str]) -> dict[str, str]:
    """The environment a stdio server gets: launcher essentials from ours, plus its own `env`."""
    env = {
        key: value
        for key, value in os.environ.items()
        if (key in INHERITED_ENV or key.startswith(INHERITED_ENV_PREFIXES)) and not value.startswith("()")
    }
    env.update(extra)
    return env


class StderrPump:
    """A stdio server's stderr: a real pipe (the SDK needs a file descriptor) read by a thread
    that logs each line under the server's name and picks up the pid from `EXEC_SHIM`."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.pid: int | None = None
        read_fd, write_fd = os.pipe()
        self.writer = open(write_fd, "w", encoding="utf-8")  # noqa: SIM115 - closed by close_writer
        self._thread = threading.Thread(target=self._pump, args=(read_fd,), name=f"mcp-stderr-{name}", daemon=True)
        self._thread.start()

    def close_writer(self) -> None:
        self.writer.close()

    def _pump(self, read_fd: int) -> None:
        with open(read_fd, "rb") as stream:
            for raw in stream:
                line = raw.decode("utf-8", "replace").rstrip()
                if self.pid is None and line.startswith(PID_MARKER):
                    self.pid = int(line.split()[1])
                elif line.strip():
                    logger.warning("mcp[%s] %s", self.name, line)


def pid_alive(pid: int) -> bool:
    return _exists(os.kill, pid)


def group_alive(pgid: int) -> bool:
    return _exists(os.killpg, pgid)


def _exists(send: Callable[[int, int], None], target: int) -> bool:
    """Signal 0 probes a process (group) without touching it."""
    try:
        send(target, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # members we may not signal (or zombies on macOS): not provably gone
    return True


def kill_group_now(name: str, pgid: int | None) -> None:
    """Last resort at host close: SIGKILL whatever is left of a server's process group."""
    if pgid is not None and group_alive(pgid):
        logger.warning("mcp[%s] process group %d still alive at close; killing it", name, pgid)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)


async def kill_group(name: str, pgid: int | None) -> None:
    """Kill what is left of a server's process group once its connection has closed.

    The SDK kills the group only when the server outlives stdin's close by 2 s; a server that
    exits (or crashed) leaves its children running, and they may hold its pipes open.
    """
    if pgid is None or not group_alive(pgid):
        return
    try:
        logger.warning("mcp[%s] process group %d outlived the server; sending SIGTERM", name, pgid)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGTERM)
        deadline = time.monotonic() + GROUP_KILL_GRACE_S
        while group_alive(pgid) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
    finally:  # also when cancelled: nothing of the group may survive
        if group_alive(pgid):
            logger.warning("mcp[%s] process group %d ignored SIGTERM; sending SIGKILL", name, pgid)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, signal.SIGKILL)
