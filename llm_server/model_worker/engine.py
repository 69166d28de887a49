"""The MLX engine: the one thread that touches MLX.

MLX streams belong to the thread that made them, and one model shared by several generating
threads crashes, so (as in ``mlx_lm.server``) a single thread loads the model, runs every
prefill and decode step, and finally frees the model. Other threads only ``submit`` token ids and
get a ``concurrent.futures.Future`` back; decoding the tokens to text is left to the waiting
thread, and nothing crosses threads per token unless the caller streams (``on_token``).

Per request: ``max_tokens``, the sampling settings (a sampler from mlx-lm's ``make_sampler``, one
per distinct setting, so requests with different settings still share a batch through
``BatchGenerator``'s per-sequence samplers) and stop words (mlx-lm's ``make_stop_sequences``:
the end-of-sequence tokens plus each word's tokens, matched per sequence).

Two paths, one at a time:

- **One sequence alone** runs through mlx-lm's ``generate_step`` (the loop behind
  ``stream_generate``: plain ``KVCache``, step n+1 built and queued with ``mx.async_eval`` before
  step n is read), the single-stream limit of mlx-lm itself.
- **Several** run through mlx-lm's ``BatchGenerator`` (continuous batching: requests join and
  leave the running batch between steps, new prompts are prefilled together). When a second
  request arrives while one runs alone, the lone sequence is handed to the batch without losing
  its work: its KV cache, less the last token (which the batch feeds again to get the next one),
  goes in through ``insert(caches=...)``. The batch runs until it is empty; the next lone request
  starts alone again.

Crash-only. A failed decode step fails only the requests in that batch. Anything else that ends
the MLX thread (a bug outside a step, a failure while finishing or cancelling) is its death: every
request it holds or has queued fails at once with ``EngineDead``, later ``submit`` calls fail at
once, and ``died`` resolves with the cause so the worker can exit non-zero and be restarted.
A thread that is alive but stuck (a step that never returns) is the supervisor's to find:
``stalled_for`` says how long work has been pending without the thread making progress.
``LLM_SERVER_FAULT`` (unset in normal use) injects such faults for the tests: ``engine-death``
raises on the MLX thread when a generation finishes, ``engine-stall`` blocks it forever at its
first decode step, ``slow-wake`` leaves new work in the inbox for a moment before the idle thread
takes it, ``prepare`` raises right after the model loads, ``internal`` before it loads,
``load-stall`` blocks it before it loads (a load that takes minutes).

Distributed (``sharding`` "pipeline" or "tensor", in a process group that ``mlx.launch``
started): every rank loads its shard with mlx-lm's ``sharded_load`` and runs this same loop, so
every rank takes the same decisions and runs the same steps. Rank 0 alone takes submissions; at
each turn of the loop it shares what arrived (jobs, cancellations, the stop) with the other ranks
as one pickled message over ``mx.distributed`` collectives, as ``mlx_lm.server`` shares its
requests, and the other ranks act on that message as if it had arrived in their own inbox.
Random state is made the same on every rank at start (as ``mlx_lm.server`` does), so sampling
agrees too. The prompt cache is off in this mode: its eviction goes by bytes, which differ
between the ranks' shards, so the ranks would fall out of step.

Prompt cache. Every finished generation leaves its KV cache in mlx-lm's ``LRUPromptCache``
(bounded by ``prompt_cache_mb``), keyed by its tokens. A new prompt starts from the cache of the
longest shared prefix (trimmed copy), so the system prompt and tool schemas that every request
repeats, and the earlier rounds of a tool-calling conversation, are not computed again.
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import logging
import os
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from .download import fetch, is_local
from .weights import indexed_folder

log = logging.getLogger("llm_server.engine")


class ModelLoadError(Exception):
    """The configured model could not be loaded or prepared for generation."""


class EngineDead(Exception):
    """The MLX thread has ended: nothing more will be generated in this process."""


@dataclass(frozen=True)
class SamplingSettings:
    """What ``mlx_lm.sample_utils.make_sampler`` is built from (the config's, or a request's)."""

    temperature: float
    top_p: float
    min_p: float
    min_tokens_to_keep: int


@dataclass(frozen=True)
class Completion:
    """One finished generation: the generated token ids, without the stop token."""

    tokens: list[int]
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    seconds: float
    cached_tokens: int = 0  # prompt tokens taken from the prompt cache


@dataclass
class _Job:
    prompt: list[int]
    max_tokens: int
    future: Future[Completion]
    sampling: SamplingSettings | None = None  # None: the engine's default
    stop_words: tuple[str, ...] = ()
    on_token: Callable[[int], None] | None = None  # called on the MLX thread (streaming)
    sampler: Any = None  # made on the MLX thread
    stops: Any = None  # StopSequences when there are stop words, made on the MLX thread
    key: int = 0  # names the job to the other ranks (distributed)
    tokens: list[int] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)
    uid: int | None = None
    cached_tokens: int = 0


class Engine:
    """Owns MLX, the model and the batch generator, all on its own thread."""

    def __init__(
        self, model_name: str, sampling: SamplingSettings, max_batch_size: int, prompt_cache_mb: int = 0,
        on_download: Callable[[int, int], None] | None = None, sharding: str | None = None,
    ) -> None:  # fmt: skip
        self.sharding = sharding  # "pipeline" or "tensor": this process is one rank of a group
        self.rank = 0
        self._group: Any = None  # the mx.distributed group, when sharded
        self._keys = itertools.count(1)
        self._key_of: dict[Future[Completion], int] = {}  # rank 0: job keys by future, while they run
        self._jobs: dict[int, _Job] = {}  # other ranks: the jobs rank 0 shared, while they run
        self.model_name = model_name
        self._on_download = on_download  # download progress (bytes so far, in all), on the MLX thread
        self.sampling = sampling
        self.max_batch_size = max_batch_size
        self.prompt_cache_bytes = prompt_cache_mb * 1024 * 1024
        self._cache: Any = None  # LRUPromptCache, made and used on the MLX thread only
        # Made by _load on the MLX thread: the sampler, stream and stop tokens both paths share.
        self._sampler: Any = None
        self._samplers: dict[SamplingSettings, Any] = {}  # one per distinct request setting
        self._stream: Any = None
        self._eos: frozenset[int] = frozenset()
        self._solo_allowed = False
        self.tokenizer: Any = None
        self.context_window: int | None = None
        self._inbox: queue.SimpleQueue[_Job | _Cancel | None] = queue.SimpleQueue()
        self._loaded: Future[None] = Future()
        # Resolves with the exception that ended the MLX thread, if one ever does.
        self.died: Future[BaseException] = Future()
        self._death: EngineDead | None = None
        self._death_lock = threading.Lock()  # no job is queued after the dead thread's last look
        self._fault = os.environ.get("LLM_SERVER_FAULT", "")
        # Written by the MLX thread, read by the worker's event loop (plain attributes: atomic).
        self._busy = False  # sequences in flight
        self._waiting = False  # blocked on an empty inbox (idle)
        self._progress = time.monotonic()  # when the MLX thread last finished a step
        self._thread = threading.Thread(target=self._run, name="mlx", daemon=True)

    # --- called from other threads ------------------------------------------------------------

    def start(self) -> Future[None]:
        """Start the thread; the future resolves when the model is loaded (or failed to)."""
        self._thread.start()
        return self._loaded

    def submit(
        self, prompt: list[int], max_tokens: int, sampling: SamplingSettings | None = None,
        stop_words: tuple[str, ...] = (), on_token: Callable[[int], None] | None = None,
    ) -> Future[Completion]:  # fmt: skip
        """Queue a generation; its future resolves with the ``Completion``. ``on_token`` (for
        streaming) gets each generated token on the MLX thread, before the future resolves."""
        job = _Job(prompt, max_tokens, Future(), sampling, stop_words, on_token, key=next(self._keys))
        if self.sharding is not None:
            self._key_of[job.future] = job.key
            job.future.add_done_callback(lambda done: self._key_of.pop(done, None))
        with self._death_lock:
            if self._death is not None:
                job.future.set_exception(self._death)
            else:
                self._post(job)
        return job.future

    def cancel(self, future: Future[Completion]) -> None:
        """Drop a submitted generation from the batch (the client went away)."""
        self._post(_Cancel(future))

    def finish_early(self, future: Future[Completion]) -> None:
        """End a generation now and resolve it with what it has (finish reason "stop"): its
        text reached a stop word."""
        self._post(_Cancel(future, keep=True))

    def stalled_for(self) -> float:
        """Seconds the MLX thread has had work without finishing a step (0 when idle or moving)."""
        if not self._busy and self._inbox.empty():
            return 0.0
        return max(0.0, time.monotonic() - self._progress)

    def stop(self, timeout: float | None = None) -> None:
        """Finish queued work, free the model on its own thread, and join it."""
        self._post(None)
        self._thread.join(timeout)

    def _post(self, item: _Job | _Cancel | None) -> None:
        # Work given to an idle thread is pending from now: the thread's last progress stamp is
        # from when it went idle, and the idle time is no stall (the thread stamps again once
        # it wakes; a thread that is busy or handling what arrived keeps its own stamp).
        if self._waiting:
            self._progress = time.monotonic()
        self._inbox.put(item)

    # --- the MLX thread ----------------------------------------------------------------------

    def _run(self) -> None:
        try:
            model, generator = self._load()
        except BaseException as exc:  # noqa: BLE001 - reported to the waiting caller
            self._loaded.set_exception(exc)
            return
        self._loaded.set_result(None)
        try:
            self._serve(model, generator)
        except BaseException as exc:
            log.critical("the MLX thread died: %s: %s", type(exc).__name__, exc, exc_info=exc)
            self.died.set_result(exc)
        finally:
            generator.close()
            del model, generator
            self._cache = None
            self.tokenizer = None
            gc.collect()
            import mlx.core as mx

            mx.clear_cache()
            log.info("model unloaded")

    def _load(self) -> tuple[Any, Any]:
        if self._fault == "internal":
            raise RuntimeError("injected fault (LLM_SERVER_FAULT=internal)")
        while self._fault == "load-stall":
            time.sleep(1)
        try:
            import mlx.core as mx
        except ImportError as exc:  # Linux without the cpu or cuda extra: mlx has no backend
            raise ModelLoadError(
                f"MLX has no backend here ({exc}): install llm-server[cpu], or llm-server[cuda] for an NVIDIA GPU"
            ) from exc
        from mlx_lm import load
        from mlx_lm.generate import BatchGenerator
        from mlx_lm.models.cache import can_trim_prompt_cache, make_prompt_cache
        from mlx_lm.sample_utils import make_sampler
        from mlx_lm.utils import sharded_load

        started = time.monotonic()
        try:
            path = self.model_name
            if not is_local(path):
                path = str(fetch(path, self._on_download or (lambda done, total: None)))
            if self.sharding is None:
                model, tokenizer, config = load(path, return_config=True)
            else:
                self._group = mx.distributed.init()
                self.rank = self._group.rank()
                pipeline = self._group if self.sharding == "pipeline" else None
                tensor = self._group if self.sharding == "tensor" else None
                folder = Path(path).expanduser()
                # Pipeline mode needs a weight index, which a one-file model lacks (``weights``).
                with indexed_folder(folder) if pipeline else contextlib.nullcontext(folder) as loaded:
                    model, tokenizer, config = sharded_load(str(loaded), pipeline, tensor, return_config=True)
                # The same random state on every rank, so that sampling agrees (mlx_lm.server).
                seed = mx.distributed.all_sum(mx.random.state[0], group=self._group).view(mx.uint64).item()
                mx.random.seed(seed)
                self.prompt_cache_bytes = 0
        except Exception as exc:
            raise ModelLoadError(f"cannot load model {self.model_name!r}: {type(exc).__name__}: {exc}") from exc
        try:
            # Everything between load and the first request belongs to "loading the model" too:
            # a failure here is exit 3 with its reason, not a worker crash.
            if self._fault == "prepare":
                raise RuntimeError("injected fault (LLM_SERVER_FAULT=prepare)")
            self.tokenizer = tokenizer
            self.context_window = _context_window(config)
            self._sampler = make_sampler(
                temp=self.sampling.temperature,
                top_p=self.sampling.top_p,
                min_p=self.sampling.min_p,
                min_tokens_to_keep=self.sampling.min_tokens_to_keep,
            )
            self._stream = mx.default_stream(mx.default_device())
            self._eos = frozenset(tokenizer.eos_token_ids)
            # A lone sequence can be handed to the batch only if its cache can drop its last token.
            self._solo_allowed = can_trim_prompt_cache(make_prompt_cache(model))
            generator = BatchGenerator(
                model,
                stop_tokens=[[token] for token in sorted(self._eos)],
                sampler=self._sampler,
                completion_batch_size=self.max_batch_size,
                prefill_batch_size=min(self.max_batch_size, 8),
                stream=self._stream,
            )
            if self.prompt_cache_bytes > 0:
                from mlx_lm.models.cache import LRUPromptCache

                self._cache = LRUPromptCache(max_bytes=self.prompt_cache_bytes)
        except Exception as exc:
            raise ModelLoadError(f"cannot prepare model {self.model_name!r}: {type(exc).__name__}: {exc}") from exc
        log.info(
            "model %s loaded in %.1f s (context window %s, device %s)",
            self.model_name,
            time.monotonic() - started,
            self.context_window,
            mx.default_device(),
        )
        return model, generator

    def _serve(self, model: Any, generator: Any) -> None:
        active: dict[int, _Job] = {}  # in the batch, by uid
        solo: _Solo | None = None
        stopping = False
        arrived: list[_Job] = []
        try:
            while not stopping or active or solo:
                # Block only when there is nothing to decode.
                self._busy = bool(active or solo)
                items = self._receive(block=not self._busy)
                self._progress = time.monotonic()
                arrived = []
                for item in items:
                    if item is None:
                        stopping = True
                    elif isinstance(item, _Cancel):
                        if solo is not None and solo.job.future is item.future:
                            solo.steps.close()
                            self._end(solo.job, item.keep)
                            solo = None
                        elif job := next((job for job in arrived if job.future is item.future), None):
                            arrived.remove(job)  # not started yet
                            self._end(job, item.keep)
                        else:
                            self._cancel(generator, active, item)
                    elif self._prepare(item):
                        arrived.append(item)
                if arrived:
                    if self._fault == "engine-stall":  # test-only: once per arrival, not per step
                        self._busy = True
                        while True:  # a step that never returns
                            time.sleep(1)
                    if solo is None and not active and len(arrived) == 1 and self._solo_allowed:
                        solo = self._start_solo(model, arrived[0])
                    else:
                        if solo is not None:
                            self._hand_over(generator, active, solo)
                            solo = None
                        for job in arrived:
                            self._insert(generator, active, job)
                self._busy = bool(active or solo)
                if solo is not None:
                    if self._step_solo(generator, solo):
                        solo = None
                elif active:
                    self._step(generator, active)
        except BaseException as exc:
            held = [*active.values(), *([solo.job] if solo else []), *arrived]
            self._die(exc, held)
            raise

    def _receive(self, block: bool) -> list[_Job | _Cancel | None]:
        """What arrived since the last turn: from the inbox (waiting for it when ``block``), and
        when sharded, shared by rank 0 with the other ranks, which get it from rank 0 instead."""
        if self.rank != 0:
            return [self._unwire(item) for item in self._share(None)]
        items = []
        if block:
            self._waiting = True
            if self._fault == "slow-wake":  # test-only: work waits a while before the thread wakes
                while self._inbox.empty():
                    time.sleep(0.01)
                time.sleep(_SLOW_WAKE_S)
            items.append(self._inbox.get())
            self._waiting = False
        while not self._inbox.empty():
            items.append(self._inbox.get_nowait())
        # A job whose caller gave up before it started is dropped here, before it is shared.
        items = [item for item in items if not isinstance(item, _Job) or item.future.set_running_or_notify_cancel()]
        if self._group is not None:
            self._share([self._wire(item) for item in items])
        return items

    def _share(self, message: Any) -> Any:
        """Rank 0's ``message`` on every rank: its pickled size, then its bytes, each summed over
        the group with zeros from the others (``mlx_lm.server``'s ``_share_object``)."""
        import pickle

        import mlx.core as mx

        if self.rank == 0:
            data = mx.array(pickle.dumps(message))
            mx.eval(mx.distributed.all_sum(data.size, group=self._group))
            mx.eval(mx.distributed.all_sum(data, group=self._group))
            return message
        size = mx.distributed.all_sum(0, group=self._group).item()
        data = mx.distributed.all_sum(mx.zeros(size, dtype=mx.uint8), group=self._group)
        return pickle.loads(bytes(data))

    def _wire(self, item: _Job | _Cancel | None) -> tuple[Any, ...]:
        if item is None:
            return ("stop",)
        if isinstance(item, _Cancel):
            return ("cancel", self._key_of.get(item.future), item.keep)
        return ("job", item.key, item.prompt, item.max_tokens, item.sampling, item.stop_words)

    def _unwire(self, wire: tuple[Any, ...]) -> _Job | _Cancel | None:
        if wire[0] == "stop":
            return None
        if wire[0] == "cancel":
            job = self._jobs.get(wire[1])
            return _Cancel(job.future if job is not None else Future(), wire[2])
        _, key, prompt, max_tokens, sampling, stop_words = wire
        job = self._jobs[key] = _Job(prompt, max_tokens, Future(), sampling, stop_words, None, key=key)
        job.future.add_done_callback(lambda _: self._jobs.pop(key, None))
        job.future.set_running_or_notify_cancel()
        return job

    def _prepare(self, job: _Job) -> bool:
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
                    )
            if job.stop_words:
                job.stops = make_stop_sequences(self.tokenizer, list(job.stop_words))
        except Exception as exc:
            job.future.set_exception(exc)
            return False
        return True

    def _die(self, exc: BaseException, held: list[_Job]) -> None:
        """Fail every request this thread holds or has queued; later submits fail at once."""
        dead = EngineDead(f"the model engine died: {type(exc).__name__}: {exc}")
        with self._death_lock:
            self._death = dead
            while not self._inbox.empty():
                item = self._inbox.get_nowait()
                if isinstance(item, _Job):
                    held.append(item)
        for job in held:
            if not job.future.done():
                job.future.set_exception(dead)

    # --- one sequence alone: mlx-lm's generate_step ----------------------------------------------

    def _start_solo(self, model: Any, job: _Job) -> _Solo | None:
        import mlx.core as mx
        from mlx_lm.generate import generate_step
        from mlx_lm.models.cache import make_prompt_cache

        try:
            cache, rest = self._cached_prefix(job.prompt)
            job.cached_tokens = len(job.prompt) - len(rest)
            cache = cache if cache is not None else make_prompt_cache(model)
            steps = generate_step(
                mx.array(rest),
                model,
                self._stream,
                max_tokens=job.max_tokens,
                sampler=job.sampler,
                prompt_cache=cache,
                prompt_progress_callback=self._prefilled,  # a long prompt is progress too
            )
        except Exception as exc:
            job.future.set_exception(exc)
            return None
        log.debug("sequence runs alone")
        return _Solo(job, cache, steps, list(job.prompt), job.stops.matcher() if job.stops else None)

    def _prefilled(self, done: int, total: int) -> None:
        self._progress = time.monotonic()

    def _step_solo(self, generator: Any, solo: _Solo) -> bool:
        """One token of the lone sequence; True when it is finished (or failed)."""
        job = solo.job
        try:
            token, _ = next(solo.steps)
        except Exception as exc:
            log.exception("generation step failed")
            job.future.set_exception(exc)
            return True
        solo.fed.append(token)  # generate_step has already fed it to the model
        if solo.stops.advance(token) if solo.stops is not None else token in self._eos:
            reason = "stop"
        else:
            job.tokens.append(token)
            if job.on_token is not None:
                job.on_token(token)
            if len(job.tokens) < job.max_tokens:
                return False
            reason = "length"
        solo.steps.close()
        self._remember(generator, solo.fed, solo.cache)
        self._finish(job, reason)
        return True

    def _hand_over(self, generator: Any, active: dict[int, _Job], solo: _Solo) -> None:
        """Move the lone sequence into the batch, keeping its KV cache (a second request came)."""
        from mlx_lm.models.cache import trim_prompt_cache

        solo.steps.close()
        job = solo.job
        if not job.tokens:  # nothing generated yet (first step failed or not taken): start over
            self._insert(generator, active, job)
            return
        # The cache holds every token fed so far, the last generated one included; the batch
        # feeds that token again to produce the next, so it leaves the cache.
        trim_prompt_cache(solo.cache, 1)
        if self._enter_batch(generator, active, job, solo.fed[-1:], solo.cache, solo.fed[:-1]):
            log.debug("lone sequence handed to the batch after %d tokens", len(job.tokens))

    # --- several: mlx-lm's BatchGenerator -----------------------------------------------------------

    def _insert(self, generator: Any, active: dict[int, _Job], job: _Job) -> None:
        try:
            cache, rest = self._cached_prefix(job.prompt)
        except Exception as exc:
            job.future.set_exception(exc)
            return
        job.cached_tokens = len(job.prompt) - len(rest)
        self._enter_batch(generator, active, job, rest, cache, job.prompt[: job.cached_tokens])

    def _enter_batch(
        self, generator: Any, active: dict[int, _Job], job: _Job, tokens: list[int], cache: Any, done: list[int]
    ) -> bool:
        """Insert ``job`` into the batch: ``tokens`` still to feed on top of ``cache`` (which holds
        ``done``), for the tokens the job has left, with its own sampler and stop words."""
        try:
            (uid,) = generator.insert(
                [tokens],
                max_tokens=[job.max_tokens - len(job.tokens)],
                caches=[cache],
                all_tokens=[done],
                samplers=[job.sampler],
                stop_sequences=[job.stops] if job.stops else None,
            )
        except Exception as exc:
            job.future.set_exception(exc)
            return False
        job.uid = uid
        active[uid] = job
        return True

    def _cached_prefix(self, prompt: list[int]) -> tuple[Any, list[int]]:
        """The KV cache of the longest cached prefix of `prompt` (a copy) and the tokens left."""
        if self._cache is None:
            return None, prompt
        from mlx_lm.models.cache import can_trim_prompt_cache, trim_prompt_cache

        cache, rest = self._cache.fetch_nearest_cache(_CACHE_KEY, prompt)
        if cache is not None and not rest:  # all of it cached: the last token must still run
            if not can_trim_prompt_cache(cache):
                return None, prompt
            trim_prompt_cache(cache, 1)
            rest = prompt[-1:]
        return cache, rest

    def _remember(self, generator: Any, tokens: list[int], cache: Any) -> None:
        """Put a finished sequence's KV cache in the prompt cache, within its byte budget."""
        if self._cache is None or cache is None or not tokens:
            return
        self._cache.insert_cache(_CACHE_KEY, tokens, cache)
        self._cache.trim_to(n_bytes=self.prompt_cache_bytes - generator.prompt_cache_nbytes)

    def _cancel(self, generator: Any, active: dict[int, _Job], cancel: _Cancel) -> None:
        # The inbox is FIFO, so the job was already inserted (or finished) by now.
        for uid, job in list(active.items()):
            if job.future is cancel.future:
                del active[uid]
                generator.remove([uid])
                self._end(job, cancel.keep)

    def _end(self, job: _Job, keep: bool) -> None:
        """A generation ended from outside: resolved with its tokens (``finish_early``), or cancelled."""
        if keep:
            self._finish(job, "stop")
        else:
            _cancelled(job.future, len(job.tokens))

    def _step(self, generator: Any, active: dict[int, _Job]) -> None:
        try:
            _, responses = generator.next()
        except Exception as exc:
            # A failed step poisons the whole batch: fail every request in it, keep serving.
            log.exception("generation step failed")
            generator.remove(list(active))
            for job in active.values():
                job.future.set_exception(exc)
            active.clear()
            return
        for response in responses:
            job = active.get(response.uid)
            if job is None:
                continue
            if response.finish_reason != "stop":
                job.tokens.append(response.token)
                if job.on_token is not None:
                    job.on_token(response.token)
            if response.finish_reason is not None:
                if response.all_tokens:
                    self._remember(generator, list(response.all_tokens), response.prompt_cache)
                self._finish(job, response.finish_reason)
                del active[response.uid]  # only now: should finishing fail, the job is still held

    def _finish(self, job: _Job, finish_reason: str) -> None:
        if self._fault == "engine-death":
            raise RuntimeError("injected fault (LLM_SERVER_FAULT=engine-death)")
        completion = Completion(
            tokens=job.tokens,
            prompt_tokens=len(job.prompt),
            completion_tokens=len(job.tokens),
            finish_reason=finish_reason,
            seconds=time.monotonic() - job.started,
            cached_tokens=job.cached_tokens,
        )
        if not job.future.done():
            job.future.set_result(completion)


@dataclass
class _Solo:
    """The one sequence running alone: its ``generate_step`` and the KV cache it fills."""

    job: _Job
    cache: list[Any]
    steps: Iterator[tuple[int, Any]]
    fed: list[int]  # the tokens in `cache`: the prompt, then each generated token as it is fed
    stops: Any = None  # a StopSequences matcher when the job has stop words (eos included)


def _cancelled(future: Future[Completion], tokens: int) -> None:
    future.cancel() or future.set_exception(CancelledGeneration())
    log.info("generation cancelled after %d tokens", tokens)


class CancelledGeneration(Exception):
    """The generation was dropped before it finished."""


@dataclass(frozen=True)
class _Cancel:
    future: Future[Completion]
    keep: bool = False  # resolve with the tokens so far instead of cancelling


_NOTHING: Any = object()
_SLOW_WAKE_S = 1.0  # LLM_SERVER_FAULT=slow-wake: longer than a ping period, well under the stall timeout
_CACHE_KEY = "model"  # LRUPromptCache keys entries by model too; this engine has one


def _context_window(config: dict[str, Any]) -> int | None:
    """The longest sequence the model was built for, if its config says."""
    for source in (config, config.get("text_config") or {}):
        for key in ("max_position_embeddings", "max_sequence_length", "n_positions", "seq_length"):
            value = source.get(key)
            if isinstance(value, int) and value > 0:
                return value
    return None
