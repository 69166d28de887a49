"""The model worker as an MLX distributed group: started by ``mlx.launch``, watched like a child.

With a ``distributed`` block in the config, the supervisor does not spawn the worker itself: it
runs ``mlx.launch`` (so the launcher, not our code, places the ranks on the hosts and wires the
backend), with ``python -m llm_server.model_worker.rank`` as the program. Rank 0 is the model worker of
a single-process daemon (MCP host, tool loop, pipe to the HTTP process) and connects back to the
supervisor over TCP on the loopback (so rank 0 runs on this machine: the first host); the other
ranks only follow its engine. ``LaunchedGroup`` makes the launcher look to the arbiter like a
``multiprocessing`` child (``sentinel``, ``join``, ``kill``, ``exitcode``): when any rank dies the
launcher tears the group down and exits, which the arbiter sees as the worker's death.

How the ranks get their settings. ``mlx.launch`` starts a rank locally only when its host is
literally ``127.0.0.1``; any other host, this machine under another name included, is reached
with ``ssh``, and such a rank sees only what ``--env`` sets (on a command line that ``ps``
shows). So every rank gets by ``--env`` what it needs before it imports anything: the group's
own variables and the daemon's values of ``RANK_ENV`` (never a secret). The key that
authenticates rank 0's connections is in a 0600 file in a private folder (removed when the group
ends) whose path travels by ``--env``; rank 0 (this machine, this user) reads it, connects, and
is sent the daemon's whole environment before its config, so it runs as a spawned worker would
(MCP servers find their commands on the daemon's ``PATH``, the Hub client its token).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from multiprocessing.connection import Connection, Listener
from pathlib import Path
from typing import Any

from ..common.config import Config
from ..common.distributed_spec import DistributedSpec

RANK_PROGRAM = "llm_server.model_worker.rank"
CONNECT_TIMEOUT_S = 120.0  # from the launch to rank 0's connection (imports on every host)
# The daemon's variables that every rank needs from its start: where Python finds llm-server,
# the libraries MLX loads, the Hugging Face cache and its offline switch, MLX's own settings and
# the tests' fault injection. They go on the launcher's command line: no secrets here.
RANK_ENV = frozenset({
    "PYTHONPATH", "LD_LIBRARY_PATH", "LD_PRELOAD", "DYLD_LIBRARY_PATH",
    "HF_HOME", "HF_HUB_CACHE", "HF_HUB_OFFLINE", "HF_ENDPOINT", "LLM_SERVER_FAULT",
})  # fmt: skip
RANK_ENV_PREFIXES = ("MLX_",)


class LaunchedGroup:
    """``mlx.launch`` and its ranks, as the arbiter watches a child process."""

    def __init__(self, argv: list[str], env: dict[str, str], private_dir: str) -> None:
        self._private_dir = private_dir  # holds the key file: removed once the launcher has exited
        self._popen = subprocess.Popen(
            argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: killed as one, and no terminal signals
        )  # fmt: skip
        self.output = self._popen.stdout
        self._exited_r, exited_w = os.pipe()
        threading.Thread(target=self._wait, args=(exited_w,), name="launcher-wait", daemon=True).start()

    def _wait(self, exited_w: int) -> None:
        self._popen.wait()
        self._remove_private_dir()
        os.close(exited_w)  # the read end becomes readable (EOF): the arbiter's sentinel

    def _remove_private_dir(self) -> None:
        shutil.rmtree(self._private_dir, ignore_errors=True)

    @property
    def sentinel(self) -> int:
        return self._exited_r

    @property
    def pid(self) -> int:
        return self._popen.pid

    @property
    def exitcode(self) -> int | None:
        return self._popen.returncode

    def is_alive(self) -> bool:
        return self._popen.poll() is None

    def join(self, timeout: float | None = None) -> None:
        try:
            self._popen.wait(timeout)
        except subprocess.TimeoutExpired:
            return
        self._remove_private_dir()  # here too: the daemon may exit before the waiting thread runs

    def kill(self) -> None:
        """The launcher and every rank it started here (one process group)."""
        try:
            os.killpg(self._popen.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def launch_command(spec: DistributedSpec, env: dict[str, str]) -> list[str]:
    """``mlx.launch`` with the group's placement, the variables every rank needs, and the rank
    program (the same Python path on every host)."""
    launcher = Path(sys.executable).parent / "mlx.launch"
    argv = [str(launcher) if launcher.exists() else "mlx.launch", "--backend", spec.backend]
    if spec.hostfile is not None:
        argv += ["--hostfile", spec.hostfile]
    else:
        argv += ["--hosts", ",".join(spec.hosts)]
    if spec.ranks_per_host > 1:
        argv += ["-n", str(spec.ranks_per_host)]
    if spec.starting_port is not None:
        argv += ["--starting-port", str(spec.starting_port)]
    for key, value in env.items():
        argv += ["--env", f"{key}={value}"]
    return [*argv, "--", sys.executable, "-m", RANK_PROGRAM]


def engine_settings(config: Config) -> str:
    """What a follower rank needs to build the same engine (no secrets: it never sees the config)."""
    assert config.distributed is not None
    return json.dumps(
        {
            "model_name": config.model_name,
            "sampling": [config.temperature, config.top_p, config.min_p, config.min_tokens_to_keep],
            "max_batch_size": config.max_batch_size,
            "sharding": config.distributed.mode,
            "log_level": config.log_level,
        }
    )


def rank_environment(environ: dict[str, str]) -> dict[str, str]:
    """The daemon's variables that travel to every rank by ``--env`` (``RANK_ENV``)."""
    return {k: v for k, v in environ.items() if k in RANK_ENV or k.startswith(RANK_ENV_PREFIXES)}


def write_key(authkey: bytes) -> tuple[str, str]:
    """The key in a file only this user can read, in a folder of its own: (folder, file)."""
    private_dir = tempfile.mkdtemp(prefix="llm-server-group-")  # mode 0700
    key_file = os.path.join(private_dir, "authkey")
    fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with open(fd, "wb") as out:
        out.write(authkey)
    return private_dir, key_file


def start_group(config: Config, authkey: bytes) -> tuple[LaunchedGroup, Listener]:
    """Launch the group; rank 0 will connect to the returned listener (control, then logs)."""
    assert config.distributed is not None
    listener = Listener(("127.0.0.1", 0), authkey=authkey)
    host, port = listener.address
    private_dir, key_file = write_key(authkey)
    env = {
        **rank_environment(dict(os.environ)),
        "LLM_SERVER_SUPERVISOR": f"{host}:{port}",
        "LLM_SERVER_AUTHKEY_FILE": key_file,
        "LLM_SERVER_ENGINE": engine_settings(config),
        "PYTHONUNBUFFERED": "1",
    }
    try:
        group = LaunchedGroup(launch_command(config.distributed, env), dict(os.environ), private_dir)
    except BaseException:
        shutil.rmtree(private_dir, ignore_errors=True)
        listener.close()
        raise
    return group, listener


def hand_over(control: Connection, config: Config) -> None:
    """Rank 0's start: the daemon's environment (a rank started through ssh has a bare one), then
    the config."""
    control.send(dict(os.environ))
    control.send(config)


def accept(listener: Listener, count: int, result: list[Connection]) -> None:
    """Accept ``count`` connections into ``result`` (run on a thread: ``accept`` blocks)."""
    try:
        for _ in range(count):
            result.append(listener.accept())
    except OSError:
        pass  # the listener was closed: the group did not come up


def close_all(*things: Any) -> None:
    for thing in things:
        try:
            thing.close()
        except OSError:
            pass
