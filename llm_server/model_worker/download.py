"""Fetching a model from the Hugging Face Hub, with progress a person can watch.

``mlx_lm.load`` downloads a model that is not a local folder itself, silently. The worker
fetches it first with the same call mlx-lm makes (``snapshot_download`` with mlx-lm's
``DEFAULT_ALLOW_PATTERNS``), giving it a ``tqdm`` class that reports the bytes received, and then
loads from the local snapshot. The Hub's own bars are not shown (they would go to the log line
by line); the supervisor's console shows the report instead.
"""

from __future__ import annotations

import io
import threading
from pathlib import Path
from typing import Any, Callable

from tqdm import tqdm

Report = Callable[[int, int], None]  # bytes so far, bytes in all


def fetch(repo: str, report: Report) -> Path:
    """Download ``repo`` into the Hugging Face cache (or find it there); its local folder."""
    from huggingface_hub import snapshot_download
    from mlx_lm.utils import DEFAULT_ALLOW_PATTERNS

    return Path(snapshot_download(repo, allow_patterns=DEFAULT_ALLOW_PATTERNS, tqdm_class=_reporting(report)))


def _reporting(report: Report) -> type[tqdm]:
    """A silent ``tqdm`` whose byte counters are handed to ``report`` as they grow."""

    class ReportingTqdm(tqdm):  # type: ignore[misc]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs.pop("name", None)
            super().__init__(*args, **{**kwargs, "file": io.StringIO(), "disable": False})

        def update(self, n: float | None = 1) -> bool | None:
            shown = super().update(n)
            if self.unit == "B" and self.total:
                report(int(self.n), int(self.total))
            return shown

    # tqdm's default lock includes a multiprocessing semaphore, which the worker (leaving with
    # os._exit) would never release; a thread lock is all these bars need.
    ReportingTqdm.set_lock(threading.RLock())
    return ReportingTqdm
