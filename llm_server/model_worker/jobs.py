"""What the engine's pieces share: a job and its result, the sampling settings, the engine's errors.

The engine's loop (``engine``), its lone-sequence path (``solo``), its batch (``batch``), its
prompt cache, its group sharing and its loading all import from here, and this module imports
none of them, so no import runs back up.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable

log = logging.getLogger("llm_server.engine")


class ModelLoadError(Exception):
    """The configured model could not be loaded or prepared for generation."""


class EngineDead(Exception):
    """The MLX thread has ended: nothing more will be generated in this process."""


class CancelledGeneration(Exception):
    """The generation was dropped before it finished."""


@dataclass(frozen=True)
class SamplingSettings:
    """What ``mlx_lm.sample_utils.make_sampler`` is built from (the config's, or a request's)."""

    temperature: float
    top_p: float
    min_p: float
    min_tokens_to_keep: int
    top_k: int = 0


@dataclass(frozen=True)
class Completion:
    """One finished generation: the generated token ids, without the stop token."""

    tokens: list[int]
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    seconds: float
    cached_tokens: int = 0  # prompt tokens taken from the prompt cache
    queue_s: float = 0.0  # from submit until the sequence joined the batch (admission, ``admission``)
    first_token_s: float | None = None  # from submit until its first token
    token_times: list[float] = field(default_factory=list)  # when each token came (the job's list, not copied)


@dataclass
class Job:
    """One submitted generation, from ``submit`` until its future resolves."""

    prompt: list[int]
    max_tokens: int
    future: Future[Completion]
    sampling: SamplingSettings | None = None  # None: the engine's default
    stop_words: tuple[str, ...] = ()
    grammar: str | None = None  # the answer's grammar (``common.grammars``), None: free
    on_token: Callable[[int], None] | None = None  # called on the MLX thread (streaming)
    sampler: Any = None  # made on the MLX thread
    stops: Any = None  # StopSequences when there are stop words, made on the MLX thread
    processor: Any = None  # the grammar's logits processor (``constraint``), made on the MLX thread
    key: int = 0  # names the job to the other ranks (distributed)
    tokens: list[int] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)
    admitted: float | None = None  # when it left the waiting line
    token_times: list[float] = field(default_factory=list)  # when each token came
    uid: int | None = None
    cached_tokens: int = 0

    def take(self, token: int, now: float) -> None:
        """A generated token: kept, timed, and streamed if the caller streams."""
        self.tokens.append(token)
        self.token_times.append(now)
        if self.on_token is not None:
            self.on_token(token)


@dataclass(frozen=True)
class Load:
    """What the engine holds, as of its last turn (read by the worker for its metrics)."""

    running: int = 0  # sequences decoding (in the batch or alone)
    waiting: int = 0  # arrived, waiting for room in the KV budget (``admission``)
    kv_bytes: int = 0  # the KV cache those running hold, as mlx-lm allocated it


@dataclass(frozen=True)
class Cancel:
    """Drop the generation of ``future`` (or, with ``keep``, end it with what it has)."""

    future: Future[Completion]
    keep: bool = False  # resolve with the tokens so far instead of cancelling


Finish = Callable[[Job, str], None]  # resolves a job with its tokens and a finish reason


def complete(job: Job, finish_reason: str) -> None:
    """Resolve the job's future with its ``Completion`` (unless it was resolved already)."""
    completion = Completion(
        tokens=job.tokens,
        prompt_tokens=len(job.prompt),
        completion_tokens=len(job.tokens),
        finish_reason=finish_reason,
        seconds=time.monotonic() - job.started,
        cached_tokens=job.cached_tokens,
        queue_s=(job.admitted or job.started) - job.started,
        first_token_s=job.token_times[0] - job.started if job.token_times else None,
        token_times=job.token_times,  # the gaps are the metrics' to compute, off the MLX thread
    )
    if not job.future.done():
        job.future.set_result(completion)


def cancelled(future: Future[Completion], tokens: int) -> None:
    """Fail a dropped generation's future with ``CancelledGeneration`` (after ``tokens``)."""
    future.cancel() or future.set_exception(CancelledGeneration())
    log.info("generation cancelled after %d tokens", tokens)
