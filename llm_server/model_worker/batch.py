"""The engine's batch: several sequences at once through mlx-lm's ``BatchGenerator``.

Continuous batching: sequences join and leave the running batch between steps, new prompts are
prefilled together, and each keeps its own sampler and stop words. Used on the MLX thread only.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future
from typing import Any

from .constraint import BatchMasks
from .jobs import Completion, Finish, Job
from .prompt_cache import PromptCache

log = logging.getLogger("llm_server.engine")


class Batch:
    """The ``BatchGenerator`` and the jobs in it, by uid."""

    def __init__(self, generator: Any, prompt_cache: PromptCache, finish: Finish, eos: frozenset[int]) -> None:
        self.generator = generator
        self._eos = eos
        self.active: dict[int, Job] = {}  # in the batch, by uid
        self._prompt_cache = prompt_cache
        self._finish = finish
        self._masks = BatchMasks(generator, self.active)

    def insert(self, job: Job) -> None:
        """Start ``job`` in the batch, from the prompt cache's longest prefix of its prompt."""
        try:
            cache, rest = self._prompt_cache.cached_prefix(job.prompt)
        except Exception as exc:
            job.future.set_exception(exc)
            return
        job.cached_tokens = len(job.prompt) - len(rest)
        self.enter(job, rest, cache, job.prompt[: job.cached_tokens])

    def enter(self, job: Job, tokens: list[int], cache: Any, done: list[int]) -> bool:
        """Insert ``job`` into the batch: ``tokens`` still to feed on top of ``cache`` (which holds
        ``done``), for the tokens the job has left, with its own sampler and stop words."""
        try:
            (uid,) = self.generator.insert(
                [tokens],
                max_tokens=[job.max_tokens - len(job.tokens)],
                caches=[cache],
                all_tokens=[done],
                samplers=[self._masks.sampler(job.sampler)],
                stop_sequences=[job.stops] if job.stops else None,
                # the first step's mask; later ones are the batch's (``BatchMasks``)
                logits_processors=[[job.processor.enter()]] if job.processor is not None else None,
            )
        except Exception as exc:
            job.future.set_exception(exc)
            return False
        job.uid = uid
        self.active[uid] = job
        return True

    def kv_bytes(self, alone: Any = None) -> int:
        """The KV cache the batch holds (padding included), and a lone sequence's (``alone``)."""
        held = self.generator.prompt_cache_nbytes
        if alone is not None:
            held += sum(layer.nbytes for layer in alone.cache)
        return held

    def remove(self, future: Future[Completion]) -> list[Job]:
        """Take the job of ``future`` out of the batch; the jobs taken (the inbox is FIFO, so a
        job is inserted, or finished, before its cancellation arrives)."""
        taken = []
        for uid, job in list(self.active.items()):
            if job.future is future:
                del self.active[uid]
                self.generator.remove([uid])
                taken.append(job)
        return taken

    def step(self) -> None:
        """One decode step of every sequence in the batch; finished ones are resolved."""
        active = self.active
        self._masks.begin()
        try:
            _, responses = self.generator.next()
        except Exception as exc:
            # A failed step poisons the whole batch: fail every request in it, keep serving.
            log.exception("generation step failed")
            self.generator.remove(list(active))
            for job in active.values():
                job.future.set_exception(exc)
            active.clear()
            return
        self._masks.settle()
        now = time.monotonic()
        for response in responses:
            job = active.get(response.uid)
            if job is None:
                continue
            if response.finish_reason != "stop" or (job.stops and response.token not in self._eos):
                # A stop word's last token is kept (unlike EOS): the text reader sees the word,
                # strips it and knows which one it was (the Messages API reports it).
                job.take(response.token, now)
            if response.finish_reason is not None:
                if response.all_tokens:
                    self._prompt_cache.remember(self.generator, list(response.all_tokens), response.prompt_cache)
                self._finish(job, response.finish_reason)
                del active[response.uid]  # only now: should finishing fail, the job is still held
