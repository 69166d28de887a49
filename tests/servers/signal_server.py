"""A real stdio MCP server that writes down how it is stopped, for the start-up and stop tests.

It appends one line per event to the file named by ``--record``: ``pid N`` at start, ``stdin
closed`` when the client closes its stdin, ``SIGTERM`` when it gets one. Like many programs
(``sh``, ``nohup``-aware daemons), it keeps a SIGTERM it inherited as ignored, and otherwise
handles it: it writes the line and exits 0. After its stdin closes it does not exit on its own,
as a server with work to finish would not: it waits for the SIGTERM of the MCP shutdown sequence.
``--start-delay`` makes it slow to start (it sleeps before it reads its first message).
"""

from __future__ import annotations

import argparse
import os
import signal
import time
from pathlib import Path
from typing import Any

from mcp.server import MCPServer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--record", required=True, type=Path)
    parser.add_argument("--start-delay", type=float, default=0.0)
    args = parser.parse_args()
    record: Path = args.record

    def note(line: str) -> None:
        with record.open("a", encoding="utf-8") as out:
            out.write(line + "\n")

    def on_sigterm(signum: int, frame: Any) -> None:
        note("SIGTERM")
        os._exit(0)

    if signal.getsignal(signal.SIGTERM) is not signal.SIG_IGN:
        signal.signal(signal.SIGTERM, on_sigterm)
    note(f"pid {os.getpid()}")
    time.sleep(args.start_delay)
    server = MCPServer("signals")

    @server.tool()
    def ping() -> str:
        """Answer "pong"."""
        return "pong"

    server.run()  # stdio, until stdin closes
    note("stdin closed")
    while True:
        time.sleep(1)


if __name__ == "__main__":
    main()
