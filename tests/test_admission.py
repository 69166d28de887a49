"""Admission by KV memory, the arithmetic alone: who joins, who waits, who never fits."""

from __future__ import annotations

from concurrent.futures import Future

import pytest

from llm_server.model_worker.admission import KV_STEP, Admission, KVCacheTooSmall
from llm_server.model_worker.jobs import Job

PER_TOKEN = 512


def job(prompt: int, max_tokens: int) -> Job:
    return Job([1] * prompt, max_tokens, Future())


def test_rows_are_reserved_as_long_as_the_longest_padding_included() -> None:
    """Three 1,000 + 24 token sequences fit exactly; a fourth waits; a longer newcomer makes every
    row as long as it (mlx-lm pads rows to the longest), so it waits too, and holds the line."""
    row = (1000 + 24 + KV_STEP) * PER_TOKEN
    admission = Admission(3 * row, PER_TOKEN, max_rows=256)
    admission.waiting.extend([job(1000, 24) for _ in range(4)])
    taken = admission.admit([])
    assert len(taken) == 3 and len(admission.waiting) == 1
    fourth = admission.waiting[0]
    assert admission.admit(taken) == []  # full: the fourth waits
    assert admission.admit(taken[:2]) == [fourth] and not admission.waiting  # one finished: room for it
    long, short = job(2000, 24), job(10, 1)
    admission.waiting.extend([long, short])
    assert admission.admit(taken[:1]) == []  # 2 rows x 2,280 > budget: the long one waits, and so does the short one
    assert admission.admit([]) == [long]  # nothing running: the head is always taken


def test_max_rows_caps_the_batch_and_a_group_counts_rows_only() -> None:
    admission = Admission(None, 1, max_rows=2)
    admission.waiting.extend([job(100_000, 100_000) for _ in range(3)])
    assert len(admission.admit([])) == 2
    admission.check(job(10**9, 10**9))  # no budget: never too large


def test_a_request_too_large_alone_names_the_sizes() -> None:
    admission = Admission(4 * 2**20, PER_TOKEN, max_rows=8)
    with pytest.raises(KVCacheTooSmall, match=r"needs 5\.0 MB of KV cache \(2000 prompt tokens \+ 8000 max_tokens, "
                                              r"512 bytes per token\).*kv_cache_mb 4\.0 MB"):  # fmt: skip
        admission.check(job(2000, 8000))
    admission.check(job(2000, 5000))  # 3.6 MB: fits alone


def test_a_cancelled_waiting_job_leaves_the_line() -> None:
    admission = Admission(None, 1, max_rows=1)
    first, second = job(1, 1), job(1, 1)
    admission.waiting.extend([first, second])
    assert admission.remove(second.future) is second and list(admission.waiting) == [first]
    assert admission.remove(Future()) is None
