"""Admission to the running batch by KV-cache memory: who may join now, who waits, who never fits.

A Metal out-of-memory abort under load would be a worker crash that fails every request in
flight, so sequences join the batch only while the batch's KV cache stays within a budget
(``kv_cache_mb``); the others wait, in arrival order (the head of the line is never overtaken,
so a long prompt is not starved by short ones). Load slows answers; it never crashes the worker.

How the batch really allocates (mlx-lm's ``BatchKVCache``): every row of a batch is as long as
its longest row (shorter ones are left-padded), grown 256 positions at a time. A sequence's
length only grows while it decodes, up to its prompt plus its ``max_tokens``. So the memory a
set of sequences can ever reach is ``rows × (longest prompt + max_tokens + 256) × bytes per
token``: admission reserves that up front (the growth during decoding is covered by reserving,
not by preempting: nothing admitted is ever evicted or re-prefilled). ``bytes per token`` is
measured from the model's own cache at load (``measure_bytes_per_token``), so it holds for any
dtype, quantisation or head layout.

The default budget (``default_budget``) is what the device has left for KV after the weights and
the prompt cache: on Metal MLX's recommended working set, on CUDA the GPU's memory, on the CPU
three quarters of the machine's memory (the share macOS gives Metal's working set).
"""

from __future__ import annotations

import collections
import logging
import os
from typing import Any, Iterable

from .jobs import Job

log = logging.getLogger("llm_server.engine")

KV_STEP = 256  # mlx-lm's KVCache and BatchKVCache grow by this many positions
CPU_SHARE = 0.75  # of the machine's memory, when no accelerator says what it can hold
MIN_BUDGET = 64 * 1024 * 1024  # a default never goes below this (the log warns when it had to)


class KVCacheTooSmall(Exception):
    """One sequence alone needs more KV cache than the budget holds (the client's fault: 400)."""


class Admission:
    """The waiting line and the budget it is admitted against (on the MLX thread only, except
    ``check``, which is pure)."""

    def __init__(self, budget_bytes: int | None, bytes_per_token: int, max_rows: int) -> None:
        self.budget_bytes = budget_bytes  # None: by count only (a distributed group: shards differ)
        self.bytes_per_token = bytes_per_token
        self.max_rows = max_rows
        self.waiting: collections.deque[Job] = collections.deque()

    def reserve(self, rows: int, longest: int) -> int:
        """The bytes ``rows`` sequences reach at most when the longest ends ``longest`` tokens long."""
        return rows * (longest + KV_STEP) * self.bytes_per_token

    def check(self, job: Job) -> None:
        """Raise ``KVCacheTooSmall`` if ``job`` could never be admitted, even alone."""
        if self.budget_bytes is None:
            return
        need = self.reserve(1, _final_length(job))
        if need > self.budget_bytes:
            raise KVCacheTooSmall(
                f"the request needs {_mb(need)} of KV cache ({len(job.prompt)} prompt tokens + {job.max_tokens} "
                f"max_tokens, {self.bytes_per_token} bytes per token), more than the whole budget "
                f"(kv_cache_mb {_mb(self.budget_bytes)}): shorten the prompt or max_tokens"
            )

    def admit(self, running: Iterable[Job]) -> list[Job]:
        """The waiting jobs that may join ``running`` now, in arrival order; they leave the line.
        With nothing running the head is always taken (``check`` let it in: it fits alone)."""
        rows = 0
        longest = 0
        for job in running:
            rows += 1
            longest = max(longest, _final_length(job))
        taken = []
        while self.waiting:
            head = self.waiting[0]
            length = max(longest, _final_length(head))
            if rows and (rows >= self.max_rows or not self._fits(rows + 1, length)):
                break
            taken.append(self.waiting.popleft())
            rows += 1
            longest = length
        return taken

    def _fits(self, rows: int, longest: int) -> bool:
        return self.budget_bytes is None or self.reserve(rows, longest) <= self.budget_bytes

    def remove(self, future: Any) -> Job | None:
        """Take the waiting job of ``future`` out of the line (its client went away)."""
        for job in self.waiting:
            if job.future is future:
                self.waiting.remove(job)
                return job
        return None


def _final_length(job: Job) -> int:
    return len(job.prompt) + job.max_tokens


def _mb(size: int) -> str:
    return f"{size / 2**20:.1f} MB"


def measure_bytes_per_token(model: Any) -> int:
    """KV bytes one more token of one sequence costs, read from a real cache after one step:
    the cache has allocated ``KV_STEP`` positions by then. Layers whose state does not grow with
    the sequence (sliding windows, recurrent state) are counted as if they did: an over-estimate."""
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    model(mx.array([[0]]), cache=cache)
    mx.eval([c.state for c in cache])
    return max(1, -(-sum(c.nbytes for c in cache) // KV_STEP))


def default_budget(weights_bytes: int, prompt_cache_bytes: int) -> tuple[int, str]:
    """The KV budget the device leaves after the weights and the prompt cache, and where it came from."""
    import mlx.core as mx

    info = mx.device_info()
    if "max_recommended_working_set_size" in info:  # Metal
        total, source = int(info["max_recommended_working_set_size"]), "Metal's recommended working set"
    elif "memory_size" in info and mx.default_device() != mx.cpu:
        total, source = int(info["memory_size"]), "the GPU's memory"
    else:
        total = int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") * CPU_SHARE)
        source = f"{CPU_SHARE:.0%} of this machine's memory"
    budget = total - weights_bytes - prompt_cache_bytes
    detail = f"{source} {_mb(total)} - weights {_mb(weights_bytes)} - prompt cache {_mb(prompt_cache_bytes)}"
    if budget < MIN_BUDGET:
        log.warning("the device leaves %s for the KV cache (%s): using %s", _mb(max(budget, 0)), detail,
                    _mb(MIN_BUDGET))  # fmt: skip
        return MIN_BUDGET, detail
    return budget, detail
