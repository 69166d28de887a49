"""The model worker process: owns MLX (through ``Engine``), the MCP host and the tool loop.

Start-up order is the daemon's contract: MCP servers first, then the model, then ``Ready`` to
the supervisor (or ``StartupFailed``, after which the supervisor exits non-zero). Requests
arrive on the data pipe from the HTTP process; each runs as its own asyncio task so tool calls of
one request never hold up another request's generation, and answers on the pipe it came from.
If the HTTP process dies, its pipe closes and its requests are cancelled (their clients are gone
with it); the supervisor sends a ``Link`` with the pipe to its successor, and the loaded model
stays. On ``Shutdown`` (or if the supervisor vanishes) it
finishes what is in flight, frees the model on the MLX thread, stops the MCP servers and exits;
during start-up it does not wait for the start-up to end (see ``Worker.run``).
If the engine's MLX thread dies instead, every request still open gets its failure at once, the
MCP servers are stopped, and the process exits with ``ENGINE_DIED`` so the supervisor restarts it.
"""

from __future__ import annotations

import asyncio
import faulthandler
import logging
import os
import signal
import sys
import time
from multiprocessing.connection import Connection
from typing import Any

from ..common import faults
from ..common.channel import LinkedChannel, PipeChannel
from ..common.child import prepare_child
from ..common.config import Config
from ..common.exit_codes import ENGINE_DIED
from ..common.faults import Faults
from ..common.logs import current_request
from ..common.protocol import (
    Cancel,
    Delta,
    Failure,
    FailureCategory,
    Generate,
    Link,
    Notice,
    Ping,
    Pong,
    Ready,
    Reply,
    Shutdown,
    StartupFailed,
    StartupFailure,
    Stopped,
)
from . import metrics
from .admission import KVCacheTooSmall
from .chat import template_messages
from .engine import Engine
from .jobs import CancelledGeneration, EngineDead, ModelLoadError, SamplingSettings
from .mcp_host import MCPHost
from .structure import Unconstrainable
from .tool_loop import PromptTooLong, ToolClash, ToolLoop
from .upkeep import Upkeep

log = logging.getLogger("llm_server.model_worker")


def run_worker(
    config: Config,
    http_conn: Connection,
    control_conn: Connection,
    log_queue: Any,
    output: Connection | None,
) -> None:
    """Entry point of the spawned model-worker child."""
    prepare_child("model-worker", log_queue, config.log_level, output)
    # The supervisor asks for every thread's stack (to its log, through fd 2) before killing a
    # worker it found stuck.
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    code = asyncio.run(Worker(config, http_conn, control_conn).run())
    # Leave with os._exit once the last records are through: after MLX has run, a normal
    # interpreter exit can abort (SIGABRT, "terminate called without an active exception") as
    # MLX's threads are torn down, which would turn exit 0 or 70 into -6. Nothing logs after the
    # queue closes (a download abandoned by a stop during start-up still runs on its threads).
    logging.disable()
    log_queue.close()
    log_queue.join_thread()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


class Worker:
    """The worker's asyncio side: pipes, request tasks and the order of start and stop."""

    def __init__(self, config: Config, http_conn: Connection | None, control_conn: Connection) -> None:
        self.config = config
        self._http_conn = http_conn
        self._control_conn = control_conn
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self.origin: dict[str, PipeChannel] = {}  # the pipe each request came on, to answer on
        self.http = LinkedChannel(self._on_request, self._unlink, "http")  # to the current HTTP process
        self.stopping = asyncio.Event()
        self.engine: Engine | None = None
        self.control: PipeChannel | None = None
        self._faults = Faults()  # read once, not per request

    async def run(self) -> int:
        """Serve until told to stop (0), or until the engine dies (``ENGINE_DIED``).

        A ``Shutdown`` during start-up ends it at once (`_unless_stopping`): the MCP servers'
        start is cancelled and those that started are stopped; a model load or download in
        progress is abandoned. The MLX thread cannot be interrupted mid-load, so the worker stops
        its MCP servers and leaves without it (``run_worker`` ends with ``os._exit``, which takes
        the thread along; an abandoned download leaves what the Hub client leaves in its cache).
        The supervisor killing a loading worker instead would orphan the MCP servers, each in a
        session of its own.
        """
        loop = asyncio.get_running_loop()
        control = self.control = PipeChannel(self._control_conn, loop, self._on_control, self.stopping.set, "control")
        control.start()
        host = self._tool_host()
        try:
            starting = asyncio.ensure_future(host.start())
            if not await self._unless_stopping(starting):
                starting.cancel()
                await asyncio.wait({starting})
                log.info("shutdown requested while MCP servers start: abandoning the start-up")
                return await self._stopped_starting(host, "start-up abandoned while MCP servers started")
            await starting  # done: raises what the start raised, if anything
            for status in host.status().values():
                if status.state == "up":
                    control.send_soon(Notice(f"MCP server {status.name}: up, {status.tools} tool(s)"))
                elif status.state == "disabled":
                    control.send_soon(Notice(f"MCP server {status.name}: disabled in the config"))
                else:
                    control.send_soon(Notice(f"MCP server {status.name}: {status.state}: {status.last_error}"))
            control.send_soon(Notice(f"loading model {self.config.model_name}"))
            engine = self.engine = Engine(
                self.config.model_name,
                SamplingSettings(
                    self.config.temperature, self.config.top_p, self.config.min_p, self.config.min_tokens_to_keep
                ),
                self.config.max_batch_size,
                self.config.prompt_cache_mb,
                on_download=self._download_progress,
                sharding=self.config.distributed.mode if self.config.distributed else None,
                kv_cache_mb=self.config.kv_cache_mb,
            )
            log.info("loading model %s", self.config.model_name)
            loading = asyncio.wrap_future(engine.start())
            if not await self._unless_stopping(loading):
                log.info("shutdown requested while the model loads: abandoning the load (it ends with the process)")
                return await self._stopped_starting(host, "start-up abandoned while the model loaded")
            try:
                await loading
            except ModelLoadError as exc:
                log.error("%s", exc, exc_info=exc.__cause__)
                await control.send(StartupFailed(StartupFailure.MODEL, str(exc)))
                return 0
            except Exception as exc:  # a bug, not the model: the daemon exits 1 (internal error)
                log.exception("internal error while starting the model worker")
                await control.send(StartupFailed(StartupFailure.INTERNAL, f"internal error while starting: {exc!r}"))
                return 0
            self.loop_ = ToolLoop(
                engine,
                sampling=engine.sampling,
                max_tokens=self.config.max_tokens,
                max_tool_rounds=self.config.max_tool_rounds,
                host=host,
            )
            if self._http_conn is not None:  # else (a distributed group's rank 0) it comes as a Link
                self.http.link(self._http_conn, loop)
            tools = len(host.tools())
            # The engine's faults fire at its first generation: the tests aim them at a request.
            aimed = self._faults.active(faults.ENGINE_STALL) or self._faults.active(faults.ENGINE_DEATH)
            upkeep = Upkeep(engine, self.loop_, host, self.config.system_prompt)
            if engine.prompt_cache_bytes and self.config.system_prompt and not aimed:
                await upkeep.warm()
            metrics.forget_dead()
            sampler = asyncio.ensure_future(upkeep.run())
            await control.send(Ready(self.config.model_name, engine.context_window, tools))
            died = asyncio.wrap_future(engine.died)
            stop = asyncio.ensure_future(self.stopping.wait())
            await asyncio.wait({died, stop}, return_when=asyncio.FIRST_COMPLETED)
            if died.done():
                stop.cancel()
                sampler.cancel()
                await self._fail_open_requests(f"the model engine died: {died.result()}")
                log.critical("the model engine died: stopping MCP servers and exiting for a restart")
                return ENGINE_DIED
            await self._drain()
            sampler.cancel()
            log.info("unloading model")
            await asyncio.to_thread(engine.stop)
            log.info("stopping MCP servers")
        finally:
            await host.aclose()
        log.info("MCP servers stopped")
        await control.send(Stopped("model unloaded, MCP servers stopped"))
        return 0

    async def _unless_stopping(self, work: asyncio.Future[Any]) -> bool:
        """Wait for a step of the start-up or a ``Shutdown``, whichever comes first: True if the
        step finished (its outcome is the caller's to read), False if the stop came first."""
        stop = asyncio.ensure_future(self.stopping.wait())
        try:
            await asyncio.wait({work, stop}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
        return work.done()

    async def _stopped_starting(self, host: MCPHost, what: str) -> int:
        """The end of a start-up cut short by ``Shutdown``: MCP servers stopped, then ``Stopped``."""
        log.info("stopping MCP servers")
        await host.aclose()
        log.info("MCP servers stopped")
        assert self.control is not None
        await self.control.send(Stopped(f"{what}; MCP servers stopped"))
        return 0

    def _download_progress(self, done: int, total: int) -> None:
        """On the MLX thread, while the model downloads: a progress line for the console."""
        assert self.control is not None
        text = f"downloading {self.config.model_name}: {100 * done // max(total, 1)}% of {total / 1e6:.1f} MB"
        self.control.send_soon(Notice(text, "download", done / total if total else None))

    def _tool_host(self) -> MCPHost:
        """Every configured MCP server, started concurrently before the model loads."""
        if self.config.servers:
            log.info("starting %d MCP server(s)", len(self.config.servers))
        return MCPHost(
            self.config.servers,
            startup_timeout_s=self.config.mcp_startup_timeout_s,
            tool_timeout_s=self.config.tool_timeout_s,
            max_result_chars=self.config.max_tool_result_chars,
        )

    def _unlink(self, channel: PipeChannel) -> None:
        """The HTTP process at the other end is gone, and with it the clients of its requests."""
        orphans = [rid for rid, origin in self.origin.items() if origin is channel]
        if orphans:
            log.warning("the http process went away: cancelling its %d request(s)", len(orphans))
        for request_id in orphans:
            task = self.tasks.get(request_id)
            if task is not None:
                task.cancel()

    def _on_control(self, message: Any) -> None:
        if isinstance(message, Ping):
            # Answered from the event loop itself: a Pong proves it runs, and carries the engine's
            # own account of its progress.
            stalled = self.engine.stalled_for() if self.engine is not None else 0.0
            assert self.control is not None
            self.control.send_soon(Pong(message.seq, stalled))
        elif isinstance(message, Shutdown):
            log.info("shutdown requested: %d request(s) in flight", len(self.tasks))
            self.stopping.set()
        elif isinstance(message, Link):
            self.http.link(message.conn, asyncio.get_running_loop())
            log.info("linked to a new http process")

    def _on_request(self, message: Any, channel: PipeChannel) -> None:
        if self._faults.active(faults.LOOP_STALL):  # the event loop hangs
            while True:
                time.sleep(1)
        if isinstance(message, Generate):
            request_id = message.request_id
            task = asyncio.get_running_loop().create_task(self._serve(message, channel))
            self.tasks[request_id] = task
            self.origin[request_id] = channel
            task.add_done_callback(lambda _: (self.tasks.pop(request_id, None), self.origin.pop(request_id, None)))
        elif isinstance(message, Cancel):
            task = self.tasks.get(message.request_id)
            if task is not None:
                log.info("client went away: cancelling", extra={"request_id": message.request_id})
                task.cancel()

    async def _serve(self, request: Generate, http: PipeChannel) -> None:
        started = time.monotonic()
        outcome = "abort"  # the client went away, unless answered
        try:
            outcome = await self._answer(request, http)
        finally:
            metrics.request(outcome, time.monotonic() - started)

    async def _answer(self, request: Generate, http: PipeChannel) -> str:
        """Answer one request on ``http``; how it ended (the reply's finish reason, "error", "abort")."""
        request_id = request.request_id
        current_request.set(request_id)
        on_text = None
        if request.options.stream:

            def on_text(text: str, reasoning: bool) -> None:
                http.send_soon(Delta(request_id, text, reasoning))  # the same ordered sender as the Reply

        try:
            answer = await self.loop_.answer(template_messages(request.messages), request.options, on_text)
        except asyncio.CancelledError:
            return "abort"
        except (PromptTooLong, ToolClash, KVCacheTooSmall) as exc:
            await http.send(Failure(request_id, FailureCategory.BAD_REQUEST, str(exc)))
            return "error"
        except Unconstrainable as exc:
            await http.send(Failure(request_id, FailureCategory.BAD_REQUEST, str(exc), exc.param))
            return "error"
        except CancelledGeneration:
            return "abort"
        except EngineDead as exc:
            await http.send(Failure(request_id, FailureCategory.INTERNAL, str(exc)))
            return "error"
        except Exception as exc:
            log.exception("generation failed")
            await http.send(Failure(request_id, FailureCategory.INTERNAL, f"generation failed: {exc}"))
            return "error"
        reasoning = answer.reasoning if request.options.reasoning else ""
        await http.send(Reply(request_id, answer.text, answer.stats, answer.finish_reason, answer.tool_calls, reasoning,
                              answer.stop_word))  # fmt: skip
        return answer.finish_reason

    async def _fail_open_requests(self, why: str) -> None:
        """After the engine's death: requests whose generation failed answer on their own within
        a moment; the rest (e.g. waiting on a tool) are answered here and cancelled."""
        if self.tasks:
            await asyncio.wait(list(self.tasks.values()), timeout=1.0)
        for request_id, task in list(self.tasks.items()):
            origin = self.origin.get(request_id)
            if origin is not None:
                await origin.send(Failure(request_id, FailureCategory.INTERNAL, why))
            task.cancel()

    async def _drain(self) -> None:
        """Let in-flight requests finish (the HTTP side has already drained, normally)."""
        deadline = time.monotonic() + self.config.shutdown_timeout_s
        while self.tasks and time.monotonic() < deadline:
            await asyncio.wait(list(self.tasks.values()), timeout=max(0.0, deadline - time.monotonic()))
        for task in list(self.tasks.values()):
            task.cancel()
