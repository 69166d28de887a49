"""The MLX engine: the one thread that touches MLX, its loop, ``submit`` and its death.

MLX streams belong to the thread that made them, and one model shared by several generating
threads crashes, so (as in ``mlx_lm.server``) a single thread loads the model, runs every
prefill and decode step, and finally frees the model. Other threads only ``submit`` token ids and
get a ``concurrent.futures.Future`` back; decoding the tokens to text is left to the waiting
thread, and nothing crosses threads per token unless the caller streams (``on_token``).

The scheduler is ours because mlx-lm has two loops, each best at one thing: ``generate_step``
runs one sequence at mlx-lm's single-stream speed (``solo``), ``BatchGenerator`` runs several at
once (``batch``). This loop picks between them at each turn and hands a lone sequence to the
batch, KV cache and all, when a second request arrives; the batch runs until it is empty, and
the next lone request starts alone again. Per request: ``max_tokens``, the
sampling settings (a sampler from mlx-lm's ``make_sampler``, one per distinct setting, so
requests with different settings still share a batch) and stop words (mlx-lm's
``make_stop_sequences``). Loading is ``loading``; the prompt cache is ``prompt_cache``; in a
distributed group every rank runs this same loop on what rank 0 shares (``sharing``).

Crash-only. A failed decode step fails only the requests in that batch. Anything else that ends
the MLX thread (a bug outside a step, a failure while finishing or cancelling) is its death: every
request it holds or has queued fails at once with ``EngineDead``, later ``submit`` calls fail at
once, and ``died`` resolves with the cause so the worker can exit non-zero and be restarted.
A thread that is alive but stuck (a step that never returns) is the supervisor's to find:
``stalled_for`` says how long work has been pending without the thread making progress. The
tests inject such faults through ``common.faults``, read when the engine is built.
"""

from __future__ import annotations

import gc
import itertools
import logging
import queue
import threading
import time
from concurrent.futures import Future
from typing import Any, Callable

from ..common import faults
from ..common.faults import Faults
from .admission import Admission, KVCacheTooSmall
from .batch import Batch
from .constraint import Grammars
from .jobs import Cancel, Completion, EngineDead, Job, Load, SamplingSettings, cancelled, complete
from .loading import load
from .sharing import Sharing
from .solo import Solo, SoloPath

log = logging.getLogger("llm_server.engine")

_LOAD_EVERY = 8  # turns between readings of the KV memory held (a reading sums every layer's arrays)
_SLOW_WAKE_S = 1.0  # the slow-wake fault: longer than a ping period, well under the stall timeout


class Engine:
    """Owns MLX, the model and the batch generator, all on its own thread."""

    def __init__(
        self, model_name: str, sampling: SamplingSettings, max_batch_size: int, prompt_cache_mb: int = 0,
        on_download: Callable[[int, int], None] | None = None, sharding: str | None = None,
        kv_cache_mb: int | None = None,
    ) -> None:  # fmt: skip
        self.sharding = sharding  # "pipeline" or "tensor": this process is one rank of a group
        self.rank = 0
        self._sharing = Sharing() if sharding is not None else None
        self._keys = itertools.count(1)
        self.model_name = model_name
        self._on_download = on_download  # download progress (bytes so far, in all), on the MLX thread
        self.sampling = sampling
        self.max_batch_size = max_batch_size
        self.prompt_cache_bytes = prompt_cache_mb * 1024 * 1024
        self.kv_cache_bytes = None if kv_cache_mb is None else kv_cache_mb * 1024 * 1024  # None: the device's
        self._admission: Admission | None = None
        # Made when the model is loaded, on the MLX thread: the default sampler, and one per
        # distinct request setting.
        self._sampler: Any = None
        self._samplers: dict[SamplingSettings, Any] = {}
        self._solo_allowed = False
        self._grammars: Grammars | None = None
        self.tokenizer: Any = None
        self.context_window: int | None = None
        self._inbox: queue.SimpleQueue[Job | Cancel | None] = queue.SimpleQueue()
        self._loaded: Future[None] = Future()
        # Resolves with the exception that ended the MLX thread, if one ever does.
        self.died: Future[BaseException] = Future()
        self._death: EngineDead | None = None
        self._death_lock = threading.Lock()  # no job is queued after the dead thread's last look
        self._faults = Faults()
        # Written by the MLX thread, read by the worker's event loop (plain attributes: atomic).
        self._busy = False  # sequences in flight
        self._waiting = False  # blocked on an empty inbox (idle)
        self._progress = time.monotonic()  # when the MLX thread last finished a step
        self.load = Load()
        self._thread = threading.Thread(target=self._run, name="mlx", daemon=True)

    # --- called from other threads ------------------------------------------------------------

    def start(self) -> Future[None]:
        """Start the thread; the future resolves when the model is loaded (or failed to)."""
        self._thread.start()
        return self._loaded

    def submit(
        self, prompt: list[int], max_tokens: int, sampling: SamplingSettings | None = None,
        stop_words: tuple[str, ...] = (), on_token: Callable[[int], None] | None = None,
        grammar: str | None = None,
    ) -> Future[Completion]:  # fmt: skip
        """Queue a generation; its future resolves with the ``Completion``. ``on_token`` (for
        streaming) gets each generated token on the MLX thread, before the future resolves;
        ``grammar`` (``common.grammars``) constrains what may be generated."""
        job = Job(prompt, max_tokens, Future(), sampling, stop_words, grammar, on_token, key=next(self._keys))
        if self._admission is not None:
            try:
                self._admission.check(job)
            except KVCacheTooSmall as exc:
                job.future.set_exception(exc)
                return job.future
        if self._sharing is not None:
            self._sharing.track(job)
        with self._death_lock:
            if self._death is not None:
                job.future.set_exception(self._death)
            else:
                self._post(job)
        return job.future

    def cancel(self, future: Future[Completion]) -> None:
        """Drop a submitted generation from the batch (the client went away)."""
        self._post(Cancel(future))

    def finish_early(self, future: Future[Completion]) -> None:
        """End a generation now and resolve it with what it has (finish reason "stop"): its
        text reached a stop word."""
        self._post(Cancel(future, keep=True))

    def stalled_for(self) -> float:
        """Seconds the MLX thread has had work without finishing a step (0 when idle or moving)."""
        if not self._busy and self._inbox.empty():
            return 0.0
        return max(0.0, time.monotonic() - self._progress)

    def stop(self, timeout: float | None = None) -> None:
        """Finish queued work, free the model on its own thread, and join it."""
        self._post(None)
        self._thread.join(timeout)

    def _post(self, item: Job | Cancel | None) -> None:
        # Work given to an idle thread is pending from now: the thread's last progress stamp is
        # from when it went idle, and the idle time is no stall (the thread stamps again once
        # it wakes; a thread that is busy or handling what arrived keeps its own stamp).
        if self._waiting:
            self._progress = time.monotonic()
        self._inbox.put(item)

    # --- the MLX thread ----------------------------------------------------------------------

    def _run(self) -> None:
        try:
            loaded = load(
                self.model_name, self.sampling, self.max_batch_size, self.prompt_cache_bytes,
                self.kv_cache_bytes, self.sharding, self._on_download, self._faults,
            )  # fmt: skip
            if self._sharing is not None:
                self._sharing.join(loaded.group)
                self.rank = self._sharing.rank
            self.tokenizer = loaded.tokenizer
            self.context_window = loaded.context_window
            self.prompt_cache_bytes = loaded.prompt_cache.max_bytes
            self._sampler = loaded.sampler
            self._solo_allowed = loaded.solo_allowed
            self._grammars = Grammars(loaded.tokenizer, loaded.eos)
            self._admission = loaded.admission
            self.kv_cache_bytes = loaded.admission.budget_bytes
            prompt_cache = loaded.prompt_cache
            batch = Batch(loaded.generator, prompt_cache, self._finish, loaded.eos)
            solo_path = SoloPath(
                loaded.model, loaded.stream, loaded.eos, batch, prompt_cache, self._finish, self._prefilled
            )
            del loaded
        except BaseException as exc:  # noqa: BLE001 - reported to the waiting caller
            self._loaded.set_exception(exc)
            return
        self._loaded.set_result(None)
        try:
            self._serve(solo_path, batch)
        except BaseException as exc:
            log.critical("the MLX thread died: %s: %s", type(exc).__name__, exc, exc_info=exc)
            self.died.set_result(exc)
        finally:
            batch.generator.close()
            del solo_path, batch
            prompt_cache.clear()
            self.tokenizer = None
            gc.collect()
            import mlx.core as mx

            mx.clear_cache()
            log.info("model unloaded")

    def _serve(self, solo_path: SoloPath, batch: Batch) -> None:
        active = batch.active  # in the batch, by uid
        admission = self._admission
        assert admission is not None
        waiting = admission.waiting  # arrived, not yet admitted (``admission``)
        solo: Solo | None = None
        stopping = False
        turn = 0
        try:
            while not stopping or active or solo or waiting:
                # Block only when there is nothing to decode.
                self._busy = bool(active or solo)
                items = self._receive(block=not self._busy and not waiting)
                self._progress = time.monotonic()
                arrived = False
                for item in items:
                    if item is None:
                        stopping = True
                    elif isinstance(item, Cancel):
                        if solo is not None and solo.job.future is item.future:
                            solo.steps.close()
                            self._end(solo.job, item.keep)
                            solo = None
                        elif job := admission.remove(item.future):  # not started yet
                            self._end(job, item.keep)
                        else:
                            for job in batch.remove(item.future):
                                self._end(job, item.keep)
                    elif self._prepare(item):
                        waiting.append(item)
                        arrived = True
                if arrived and self._faults.active(faults.ENGINE_STALL):  # once per arrival, not per step
                    self._busy = True
                    while True:  # a step that never returns
                        time.sleep(1)
                admitted = admission.admit([*active.values(), *([solo.job] if solo else [])]) if waiting else []
                if admitted:
                    now = time.monotonic()
                    for job in admitted:
                        job.admitted = now
                    if solo is None and not active and len(admitted) == 1 and self._solo_allowed:
                        solo = solo_path.start(admitted[0])
                    else:
                        if solo is not None:
                            solo_path.hand_over(solo)
                            solo = None
                        for job in admitted:
                            batch.insert(job)
                self._busy = bool(active or solo)
                if solo is not None:
                    if solo_path.step(solo):
                        solo = None
                elif active:
                    batch.step()
                turn += 1
                if turn % _LOAD_EVERY == 0 or not (active or solo):
                    self.load = Load(len(active) + (solo is not None), len(waiting), batch.kv_bytes(solo))
        except BaseException as exc:
            held = [*active.values(), *([solo.job] if solo else []), *waiting]
            self._die(exc, held)
            raise

    def _receive(self, block: bool) -> list[Job | Cancel | None]:
        """What arrived since the last turn: from the inbox (waiting for it when ``block``), and
        when sharded, shared by rank 0 with the other ranks, which get it from rank 0 instead."""
        if self.rank != 0:
            return self._sharing.receive()  # type: ignore[union-attr]  # only a group has ranks but 0
        items = []
        if block:
            self._waiting = True
            if self._faults.active(faults.SLOW_WAKE):  # work waits a while before the thread wakes
                while self._inbox.empty():
                    time.sleep(0.01)
                time.sleep(_SLOW_WAKE_S)
            items.append(self._inbox.get())
            self._waiting = False
        while not self._inbox.empty():
            items.append(self._inbox.get_nowait())
        # A job whose caller gave up before it started is dropped here, before it is shared.
        items = [item for item in items if not isinstance(item, Job) or item.future.set_running_or_notify_cancel()]
        if self._sharing is not None:
            self._sharing.send(items)
        return items

    def _prefilled(self, done: int, total: int) -> None:
        self._progress = time.monotonic()

    def _prepare(self, job: Job) -> bool:
        """The job's sampler and stop sequences (mlx-lm's), made here on the MLX thread."""
        from mlx_lm.generate import make_stop_sequences
        from mlx_lm.sample_utils import make_sampler

        try:
            if job.sampling is None or job.sampling == self.sampling:
                job.sampler = self._sampler
            else:
                job.sampler = self._samplers.get(job.sampling)
                if job.sampler is None:
                    if len(self._samplers) > 64:
                        self._samplers.clear()
                    job.sampler = self._samplers[job.sampling] = make_sampler(
                        temp=job.sampling.temperature,
                        top_p=job.sampling.top_p,
                        min_p=job.sampling.min_p,
                        min_tokens_to_keep=job.sampling.min_tokens_to_keep,
                        top_k=job.sampling.top_k,
                    )
            if job.stop_words:
                job.stops = make_stop_sequences(self.tokenizer, list(job.stop_words))
            if job.grammar is not None:
                job.processor = self._grammars.processor(job.grammar)
        except Exception as exc:
            job.future.set_exception(exc)
            return False
        return True

    def _die(self, exc: BaseException, held: list[Job]) -> None:
        """Fail every request this thread holds or has queued; later submits fail at once."""
        dead = EngineDead(f"the model engine died: {type(exc).__name__}: {exc}")
        with self._death_lock:
            self._death = dead
            while not self._inbox.empty():
                item = self._inbox.get_nowait()
                if isinstance(item, Job):
                    held.append(item)
        for job in held:
            if not job.future.done():
                job.future.set_exception(dead)

    def _end(self, job: Job, keep: bool) -> None:
        """A generation ended from outside: resolved with its tokens (``finish_early``), or cancelled."""
        if keep:
            self._finish(job, "stop")
        else:
            cancelled(job.future, len(job.tokens))

    def _finish(self, job: Job, finish_reason: str) -> None:
        if self._faults.active(faults.ENGINE_DEATH):
            raise faults.injected(faults.ENGINE_DEATH)
        complete(job, finish_reason)
