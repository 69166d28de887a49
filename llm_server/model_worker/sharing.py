"""Group sharing: what rank 0's engine received, given to every rank of a distributed group.

Every rank runs the same engine loop, so every rank must act on the same jobs, cancellations and
stop, in the same turn. Rank 0 alone takes submissions; at each turn of the loop it sends what
arrived as one pickled message over ``mx.distributed`` collectives (as ``mlx_lm.server`` shares
its requests), and the other ranks act on it as if it had arrived in their own inbox. Jobs are
named across ranks by a key, since futures do not cross processes.
"""

from __future__ import annotations

from concurrent.futures import Future
from typing import Any

from .jobs import Cancel, Completion, Job


class Sharing:
    """One rank's side of the sharing: rank 0 sends, the others receive."""

    def __init__(self) -> None:
        self.group: Any = None  # the mx.distributed group, joined once the model is loaded
        self.rank = 0
        self._key_of: dict[Future[Completion], int] = {}  # rank 0: job keys by future, while they run
        self._jobs: dict[int, Job] = {}  # other ranks: the jobs rank 0 shared, while they run

    def join(self, group: Any) -> None:
        """Share over ``group`` (made by ``mx.distributed.init`` when the shard was loaded)."""
        self.group = group
        self.rank = group.rank()

    def track(self, job: Job) -> None:
        """Rank 0: remember the job's key while it runs, so a cancellation can name it."""
        self._key_of[job.future] = job.key
        job.future.add_done_callback(lambda done: self._key_of.pop(done, None))

    def send(self, items: list[Job | Cancel | None]) -> None:
        """Rank 0: give what arrived this turn to the other ranks."""
        self._share([self._wire(item) for item in items])

    def receive(self) -> list[Job | Cancel | None]:
        """The other ranks: what rank 0 received this turn."""
        return [self._unwire(item) for item in self._share(None)]

    def _share(self, message: Any) -> Any:
        """Rank 0's ``message`` on every rank: its pickled size, then its bytes, each summed over
        the group with zeros from the others (``mlx_lm.server``'s ``_share_object``)."""
        import pickle

        import mlx.core as mx

        if self.rank == 0:
            data = mx.array(pickle.dumps(message))
            mx.eval(mx.distributed.all_sum(data.size, group=self.group))
            mx.eval(mx.distributed.all_sum(data, group=self.group))
            return message
        size = mx.distributed.all_sum(0, group=self.group).item()
        data = mx.distributed.all_sum(mx.zeros(size, dtype=mx.uint8), group=self.group)
        return pickle.loads(bytes(data))

    def _wire(self, item: Job | Cancel | None) -> tuple[Any, ...]:
        if item is None:
            return ("stop",)
        if isinstance(item, Cancel):
            return ("cancel", self._key_of.get(item.future), item.keep)
        return ("job", item.key, item.prompt, item.max_tokens, item.sampling, item.stop_words, item.grammar)

    def _unwire(self, wire: tuple[Any, ...]) -> Job | Cancel | None:
        if wire[0] == "stop":
            return None
        if wire[0] == "cancel":
            job = self._jobs.get(wire[1])
            return Cancel(job.future if job is not None else Future(), wire[2])
        _, key, prompt, max_tokens, sampling, stop_words, grammar = wire
        job = self._jobs[key] = Job(prompt, max_tokens, Future(), sampling, stop_words, grammar, key=key)
        job.future.add_done_callback(lambda _: self._jobs.pop(key, None))
        job.future.set_running_or_notify_cancel()
        return job
