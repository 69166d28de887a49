"""The console: short progress lines on stderr for the person who started the daemon.

Whatever ``log_level`` says, a start that works prints what it did (MCP servers up or failed,
the model loading and loaded, where it listens), and a stop prints each step; ``--quiet``
silences it (fatal errors are still printed). On a terminal, lines that replace each other (a
download's progress) are rewritten in place; without one (launchd, systemd, a pipe) every line
is plain and progress is printed at most every 10 %.
"""

from __future__ import annotations

import sys
from typing import TextIO


class Console:
    def __init__(self, quiet: bool = False, stream: TextIO | None = None) -> None:
        self.quiet = quiet
        self.stream = stream if stream is not None else sys.stderr
        self.tty = self.stream.isatty()
        self._open_key = ""  # the key of a progress line left open on the terminal
        self._shown: dict[str, int] = {}  # progress keys -> the last tenth printed (no terminal)

    def say(self, text: str, key: str = "", fraction: float | None = None) -> None:
        """Print one line; lines with the same ``key`` replace each other on a terminal."""
        if self.quiet:
            return
        try:
            if key and not self.tty:
                tenth = int((fraction or 0.0) * 10)
                if self._shown.get(key) == tenth:
                    return
                self._shown[key] = tenth
            if self.tty and self._open_key and key != self._open_key:
                self.stream.write("\n")
                self._open_key = ""
            if self.tty and key:
                self.stream.write(f"\r\x1b[Kllm-server: {text}")
                self._open_key = key
            else:
                self.stream.write(f"llm-server: {text}\n")
            self.stream.flush()
        except (OSError, ValueError):  # the terminal went away: the log still has everything
            self.quiet = True
