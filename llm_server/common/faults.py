"""Test-only fault injection: the one place product code asks whether a fault is switched on.

Faults that real models and real servers do not produce on demand (an MLX thread that dies, an
event loop that hangs, a model load that never ends) are switched on by the tests through the
environment variable ``LLM_SERVER_FAULT`` (unset in normal use, so every check is False). Each
component reads it once, when it is built, never per request or per decode step, and consults
it at named points with ``Faults.active(NAME)``; every name is listed here, so a reader sees in one
place what the tests can break.
"""

from __future__ import annotations

import os

ENGINE_DEATH = "engine-death"  # the MLX thread raises when a generation finishes
ENGINE_STALL = "engine-stall"  # the MLX thread hangs once work arrives
LOOP_STALL = "loop-stall"  # the worker's event loop hangs on a request
PREPARE = "prepare"  # preparing the loaded model fails (a model error: exit 3)
INTERNAL = "internal"  # a bug while the worker starts (exit 1)
LOAD_STALL = "load-stall"  # the model load never ends
SLOW_WAKE = "slow-wake"  # new work waits 1 s before the idle MLX thread takes it
SUPERVISOR_BUG = "supervisor-bug"  # the supervisor's watch loop raises
SIGNAL_AT_SPAWN = "signal-at-spawn"  # the supervisor sends its group SIGINT inside every spawn

ENV = "LLM_SERVER_FAULT"


class Faults:
    """The faults switched on for one component, read once when it is built (an engine, a
    worker, the arbiter), so checks on hot paths cost a string comparison, not an environ read."""

    def __init__(self) -> None:
        self._on = os.environ.get(ENV, "")

    def active(self, name: str) -> bool:
        """Whether the tests switched fault ``name`` on."""
        return self._on == name


def injected(name: str) -> RuntimeError:
    """The error an injected fault raises (its message names the fault)."""
    return RuntimeError(f"injected fault ({ENV}={name})")
