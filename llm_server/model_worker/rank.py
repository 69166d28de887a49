"""One rank of the model worker's distributed group: ``python -m llm_server.model_worker.rank``.

``mlx.launch`` starts this on every host (``MLX_RANK`` says which rank it is), locally or through
ssh: only its ``--env`` variables are sure to be set (``supervisor/group.py``). Rank 0 connects
back to the supervisor (``LLM_SERVER_SUPERVISOR``, authenticated with the key in the 0600 file
``LLM_SERVER_AUTHKEY_FILE`` names): first the control connection, on which the daemon's
environment and then the config arrive, then a connection for its log records; then it is the
model worker of a single-process daemon, its engine sharded (the pipe to the HTTP process
arrives as a ``Link``). The other ranks build the same engine from
``LLM_SERVER_ENGINE`` and follow rank 0 until it stops; their log lines go to stderr, which the
launcher forwards to the supervisor's log. Every rank leaves with ``os._exit``, as a spawned
child does (MLX's threads make a normal interpreter exit after the model is freed abort).
"""

from __future__ import annotations

import asyncio
import faulthandler
import json
import multiprocessing
import os
import signal
import sys
from multiprocessing.connection import Client
from pathlib import Path
from typing import Any

from setproctitle import setproctitle

from ..common.logs import ConnectionQueue, install, queue_handler, stderr_handler


def main() -> int:
    rank = int(os.environ.get("MLX_RANK", "0"))
    setproctitle(f"llm-server: model-worker rank {rank}")
    # The supervisor stops the group in order. A handler, not SIG_IGN, which exec would hand on
    # to rank 0's MCP servers.
    signal.signal(signal.SIGINT, lambda signum, frame: None)
    if rank == 0:
        return _leader()
    return _follower(rank)


def _adopt(environ: dict[str, str]) -> None:
    """Take the daemon's environment as a spawned worker inherits it; what the launcher set for
    this rank (``MLX_*``, the group's ``LLM_SERVER_*``) stays."""
    for key, value in environ.items():
        if not key.startswith(("MLX_", "LLM_SERVER_")):
            os.environ[key] = value


def _leader() -> int:
    authkey = Path(os.environ["LLM_SERVER_AUTHKEY_FILE"]).read_bytes()
    multiprocessing.current_process().authkey = authkey  # for Connections passed as ``Link``
    host, port = os.environ["LLM_SERVER_SUPERVISOR"].rsplit(":", 1)
    control = Client((host, int(port)), authkey=authkey)
    logs = Client((host, int(port)), authkey=authkey)
    _adopt(control.recv())
    config = control.recv()
    from .process import Worker  # after ``_adopt``: what it imports may read the environment
    install(queue_handler(ConnectionQueue(logs)), config.log_level)
    multiprocessing.current_process().name = "model-worker.rank0"  # the other ranks log as rank1, ...
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    return asyncio.run(Worker(config, None, control).run())


def _follower(rank: int) -> int:
    from .engine import Engine
    from .jobs import SamplingSettings

    settings: dict[str, Any] = json.loads(os.environ["LLM_SERVER_ENGINE"])
    install(stderr_handler(f"rank{rank}"), settings["log_level"])
    engine = Engine(
        settings["model_name"], SamplingSettings(*settings["sampling"]), settings["max_batch_size"],
        sharding=settings["sharding"],
    )  # fmt: skip
    engine.start().result()
    engine.stop()  # returns once rank 0 has shared its stop (or the group is torn down)
    return 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
