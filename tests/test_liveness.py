"""The restart budget and the stall reading, driven by a fake clock (no sleeping)."""

from __future__ import annotations

from llm_server.supervisor.liveness import Liveness, RestartBudget


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_restart_budget_refills_after_its_window() -> None:
    """1 restart within 8 s: spent; refused within the window; given back once it is older."""
    clock = Clock()
    budget = RestartBudget(1, 8.0, clock)
    assert budget.take() and budget.left == 0
    clock.now += 7.9
    assert not budget.take()
    clock.now += 0.6  # the first restart is now 8.5 s old
    assert budget.take() and budget.left == 0
    clock.now += 1.0
    assert not budget.take()


def test_liveness_reads_silence_and_stalls() -> None:
    clock = Clock()
    live = Liveness(clock)
    assert live.stuck(2.0) is None
    clock.now += 2.5
    assert "has not answered a ping for 2 s" in (live.stuck(2.0) or "")
    live.pong(3.0)
    assert "without progress for 3 s" in (live.stuck(2.0) or "")
    live.reset()
    assert live.stuck(2.0) is None
