"""The ``llm-server`` entry point (run, ``check``, ``service``): read the config, open the log, hand over
to the arbiter. It sits above the process packages and ``common/``, and only ``__main__`` imports it.

Errors that happen before the log file is known (no config, no ``log_filename``) can only go to
stderr; everything after that goes to the log, and fatal ones are echoed to stderr as well so a
person starting the daemon by hand sees why it stopped.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import multiprocessing
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Iterator

from setproctitle import setproctitle

from .common.config import load_log_filename, parse_config
from .common.config_error import ConfigError
from .common.exit_codes import ExitCode
from .common.logs import set_level
from .supervisor.arbiter import Arbiter
from .supervisor.console import Console
from .supervisor.log_file import LogHub

log = logging.getLogger("llm_server.supervisor")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    config_path = getattr(args, "config", Path("config.json")).expanduser().absolute()
    if args.command == "check":
        from .check import run_check

        return run_check(config_path)
    if args.command == "service":
        from .service import run_service

        return run_service(args.action, config_path, args.dry_run, args.name)
    setproctitle("llm-server: supervisor")
    multiprocessing.current_process().name = "supervisor"
    try:
        raw, log_filename = load_log_filename(config_path)
    except ConfigError as exc:
        print(f"llm-server: {exc}", file=sys.stderr)
        return ExitCode.CONFIG
    try:
        hub = LogHub(log_filename, "trace", multiprocessing.get_context("spawn").Queue())
    except OSError as exc:
        print(f"llm-server: cannot open log file {log_filename}: {exc}", file=sys.stderr)
        return ExitCode.CONFIG
    hub.start()
    try:
        return _run(raw, config_path, log_filename, hub, Console(quiet=args.quiet))
    finally:
        hub.stop()


@contextlib.contextmanager
def metrics_folder() -> Iterator[None]:
    """The folder the children write their Prometheus series to (prometheus-client's
    multiprocess mode, ``model_worker/metrics``), one per daemon, removed when it stops."""
    folder = tempfile.mkdtemp(prefix="llm-server-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = folder  # the children inherit it at spawn
    try:
        yield
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _parser() -> argparse.ArgumentParser:
    """``llm-server`` runs the daemon; ``check`` and ``service ...`` are the other commands.
    ``--config`` may come before or after the command."""
    config = argparse.ArgumentParser(add_help=False)
    config.add_argument("--config", type=Path, default=argparse.SUPPRESS,
                        help="path to the config file (default: ./config.json)")  # fmt: skip
    parser = argparse.ArgumentParser(prog="llm-server", description="Serve one local MLX model over HTTP.",
                                     parents=[config])  # fmt: skip
    parser.set_defaults(command=None)
    parser.add_argument("--quiet", action="store_true", help="print no progress lines on stderr (errors still are)")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.add_parser(
        "check", parents=[config], help="check the config, MCP servers, model and port without starting"
    )
    service = commands.add_parser(
        "service", parents=[config], help="run as a launchd (macOS) or systemd (Linux) service"
    )
    service.add_argument("action", choices=("install", "uninstall", "status"))
    service.add_argument("--dry-run", action="store_true", help="print the service file and commands, change nothing")
    service.add_argument("--name", help="the service's name (default: the config's folder name)")
    return parser


def _run(raw: dict, config_path: Path, log_filename: Path, hub: LogHub, console: Console) -> int:
    try:
        config = parse_config(raw, config_path, log_filename)
    except ConfigError as exc:
        log.error("configuration error: %s", exc)
        print(f"llm-server: {exc}", file=sys.stderr)
        return ExitCode.CONFIG
    set_level(config.log_level)
    log.info(
        "llm-server starting: config %s, model %s, %d MCP server(s)",
        config_path,
        config.model_name,
        len(config.servers),
    )
    console.say(f"starting: config {config_path}, model {config.model_name}, {len(config.servers)} MCP server(s)")
    try:
        with metrics_folder():
            code = Arbiter(config, hub, console).run()
    except Exception:
        log.exception("unexpected supervisor error")
        code = ExitCode.INTERNAL
    if code != ExitCode.OK:
        print(f"llm-server: stopped with exit code {int(code)}; see {log_filename}", file=sys.stderr)
    return int(code)


if __name__ == "__main__":
    sys.exit(main())
