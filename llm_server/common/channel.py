"""An asyncio-friendly end of a ``multiprocessing`` pipe.

The HTTP process and the model worker talk over one duplex data pipe (replaced whenever one of
them restarts), and each hears from the supervisor over its control pipe. Reading it from the event
loop with ``add_reader`` is tempting but breaks large messages (uvloop leaves the fd
non-blocking, so a multi-megabyte prompt fails half-sent), so the channel owns two threads
instead: a reader that hands every message to the loop with ``call_soon_threadsafe``, and a
single sender thread that keeps sends ordered and off the loop. That thread alone writes to the
pipe, and it is also the one that closes it, after the send in progress: a descriptor closed under
a send would fail it half-way, or hand its bytes to whatever file next gets the number. Closing
never raises to a sender: ``send`` says False, ``send_soon`` drops the message.
``LinkedChannel`` is the data pipe's replaceable slot, the same on both sides.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.connection import Connection
from typing import Any, Callable

log = logging.getLogger("llm_server.channel")


class PipeChannel:
    """Owns one pipe end for an asyncio process (the only code that touches it)."""

    def __init__(
        self,
        conn: Connection,
        loop: asyncio.AbstractEventLoop,
        on_message: Callable[[Any], None],
        on_closed: Callable[[], None],
        name: str,
    ) -> None:
        self._conn = conn
        self._loop = loop
        self._on_message = on_message
        self._on_closed = on_closed
        self._sender = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"{name}-send")
        self._reader = threading.Thread(target=self._read, name=f"{name}-read", daemon=True)
        self.closed = False

    def start(self) -> None:
        self._reader.start()

    def _read(self) -> None:
        while True:
            try:
                message = self._conn.recv()
            except (EOFError, OSError):
                break
            except Exception:  # an unpicklable message must not kill the reader
                log.exception("dropping a message that could not be read from the pipe")
                continue
            if not self._deliver(self._on_message, message):
                return
        self._deliver(self._mark_closed)

    def _mark_closed(self) -> None:
        # A pipe is replaced when the process at its other end restarts: this one's threads and
        # descriptor go now, so restarts leave nothing behind (sends still queued find it closed).
        self.closed = True
        try:
            self._sender.submit(self._conn.close)
        except RuntimeError:  # the interpreter is exiting: no thread sends any more
            self._conn.close()
        self._sender.shutdown(wait=False)
        self._on_closed()

    def _deliver(self, callback: Callable[..., None], *args: Any) -> bool:
        try:
            self._loop.call_soon_threadsafe(callback, *args)
            return True
        except RuntimeError:  # the loop is closed: the process is exiting
            return False

    async def send(self, message: Any) -> bool:
        """Send in order without blocking the loop; False if the other side is gone."""
        try:
            return await self._loop.run_in_executor(self._sender, self._send_quietly, message)
        except RuntimeError:  # closed already: the sender takes no more work (or the loop is gone)
            return False

    def send_soon(self, message: Any) -> None:
        """Fire-and-forget ``send`` for callers that cannot await (e.g. cancellation paths)."""
        try:
            self._sender.submit(self._send_quietly, message)
        except RuntimeError:
            pass

    def _send_quietly(self, message: Any) -> bool:
        """On the sender thread: True once sent; False if the pipe is closed or the other side gone."""
        if self.closed:
            return False
        try:
            self._conn.send(message)
            return True
        except (OSError, EOFError, ValueError):  # OSError: closed here ("handle is closed") or there
            return False


class LinkedChannel:
    """The data pipe to the other child, replaced whenever that child restarts.

    Both children keep one: the HTTP process towards the model worker, the worker towards the
    HTTP process. ``link`` makes a new pipe end the current one; the channel linked before is
    gone from then on (were its pipe still open, e.g. a copy held elsewhere, ``on_gone`` runs for
    it now, so the requests it carried end at once). Each callback is told which channel it came
    from, so a request is only ever answered, or failed, on the pipe it came on.
    """

    def __init__(
        self,
        on_message: Callable[[Any, PipeChannel], None],
        on_gone: Callable[[PipeChannel], None],
        name: str,
    ) -> None:
        self._on_message = on_message
        self._on_gone = on_gone
        self._name = name
        self.current: PipeChannel | None = None

    def link(self, conn: Connection, loop: asyncio.AbstractEventLoop) -> None:
        previous = self.current
        channel = PipeChannel(
            conn, loop, lambda message: self._on_message(message, channel), lambda: self._on_gone(channel), self._name
        )
        self.current = channel
        channel.start()
        if previous is not None and not previous.closed:
            self._on_gone(previous)
