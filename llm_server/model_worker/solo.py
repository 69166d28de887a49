"""The engine's lone-sequence path, and its hand-over to the batch when a second request comes.

One sequence alone runs through mlx-lm's ``generate_step`` (the loop behind ``stream_generate``:
a plain ``KVCache``, step n+1 built and queued with ``mx.async_eval`` before step n is read), the
single-stream limit of mlx-lm itself. When a second request arrives, the lone sequence moves
into the batch without losing its work. Used on the MLX thread only.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from .batch import Batch
from .jobs import Finish, Job
from .prompt_cache import PromptCache

log = logging.getLogger("llm_server.engine")


@dataclass
class Solo:
    """The one sequence running alone: its ``generate_step`` and the KV cache it fills."""

    job: Job
    cache: list[Any]
    steps: Iterator[tuple[int, Any]]
    fed: list[int]  # the tokens in `cache`: the prompt, then each generated token as it is fed
    stops: Any = None  # a StopSequences matcher when the job has stop words (eos included)


class SoloPath:
    """Starts, steps and hands over lone sequences, on the model the batch runs too."""

    def __init__(
        self, model: Any, stream: Any, eos: frozenset[int], batch: Batch, prompt_cache: PromptCache,
        finish: Finish, on_prefill: Callable[[int, int], None],
    ) -> None:  # fmt: skip
        self.model = model
        self.stream = stream
        self.eos = eos
        self.batch = batch
        self._prompt_cache = prompt_cache
        self._finish = finish
        self._on_prefill = on_prefill  # a long prompt is progress too

    def start(self, job: Job) -> Solo | None:
        """Start ``job`` alone (from the prompt cache's longest prefix); None if that failed."""
        import mlx.core as mx
        from mlx_lm.generate import generate_step
        from mlx_lm.models.cache import make_prompt_cache

        try:
            cache, rest = self._prompt_cache.cached_prefix(job.prompt)
            job.cached_tokens = len(job.prompt) - len(rest)
            cache = cache if cache is not None else make_prompt_cache(self.model)
            steps = generate_step(
                mx.array(rest),
                self.model,
                self.stream,
                max_tokens=job.max_tokens,
                sampler=job.sampler,
                prompt_cache=cache,
                logits_processors=[job.processor.enter()] if job.processor is not None else None,
                prompt_progress_callback=self._on_prefill,
            )
        except Exception as exc:
            job.future.set_exception(exc)
            return None
        log.debug("sequence runs alone")
        return Solo(job, cache, steps, list(job.prompt), job.stops.matcher() if job.stops else None)

    def step(self, solo: Solo) -> bool:
        """One token of the lone sequence; True when it is finished (or failed)."""
        job = solo.job
        try:
            token, _ = next(solo.steps)
        except Exception as exc:
            log.exception("generation step failed")
            job.future.set_exception(exc)
            return True
        solo.fed.append(token)  # generate_step has already fed it to the model
        now = time.monotonic()
        if solo.stops.advance(token) if solo.stops is not None else token in self.eos:
            reason = "stop"
            if token not in self.eos:  # a stop word's last token: kept, as the batch keeps it
                job.take(token, now)
        else:
            job.take(token, now)
            if len(job.tokens) < job.max_tokens:
                return False
            reason = "length"
        solo.steps.close()
        self._prompt_cache.remember(self.batch.generator, solo.fed, solo.cache)
        self._finish(job, reason)
        return True

    def hand_over(self, solo: Solo) -> None:
        """Move the lone sequence into the batch, keeping its KV cache (a second request came):
        its cache, less the last token, which the batch feeds again to get the next one."""
        from mlx_lm.models.cache import trim_prompt_cache

        solo.steps.close()
        job = solo.job
        if not job.tokens:  # nothing generated yet (first step failed or not taken): start over
            self.batch.insert(job)
            return
        # The cache holds every token fed so far, the last generated one included; the batch
        # feeds that token again to produce the next, so it leaves the cache.
        trim_prompt_cache(solo.cache, 1)
        if self.batch.enter(job, solo.fed[-1:], solo.cache, solo.fed[:-1]):
            log.debug("lone sequence handed to the batch after %d tokens", len(job.tokens))
