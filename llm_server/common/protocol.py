"""Typed messages that cross process boundaries.

This module is the whole vocabulary spoken over the pipes between the supervisor, the HTTP
process and the model worker. It imports nothing heavy (no MLX, no Sanic) so every process can
load it cheaply. Each message is a small frozen dataclass; messages that belong to a request
carry its ``request_id``. Failures are data with a category, and ``http_status`` is the one place
that maps a category to an HTTP status.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any


class FailureCategory(str, enum.Enum):
    """Why a request failed; decides the HTTP status in ``http_status``."""

    BAD_REQUEST = "bad_request"  # the client's input cannot be served (e.g. too long)
    INTERNAL = "internal"  # generation or tool machinery failed
    UNAVAILABLE = "unavailable"  # not taken: no model worker right now (it is restarting); retry


def http_status(category: FailureCategory) -> int:
    """Map a failure category to the HTTP status the client sees (bad input 400, not taken 503,
    else 500)."""
    return {FailureCategory.BAD_REQUEST: 400, FailureCategory.UNAVAILABLE: 503}.get(category, 500)


# --- HTTP process -> model worker -------------------------------------------------------------


def prompt_messages(system_prompt: str, prompt: str) -> list[dict[str, Any]]:
    """The conversation a ``POST /`` prompt starts (no system turn when the system prompt is
    empty); in the chat template's format, like every ``Generate``'s messages."""
    messages: list[dict[str, Any]] = []
    if system_prompt:
        messages.append({"role": "system", "content": system_prompt})
    messages.append({"role": "user", "content": prompt})
    return messages


@dataclass(frozen=True)
class Options:
    """One request's generation settings; None means the config's value."""

    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    min_p: float | None = None
    top_k: int | None = None  # 0: no top-k cut
    stop: tuple[str, ...] = ()  # stop words (not part of the answer)
    client_tools: tuple[dict[str, Any], ...] = ()  # OpenAI function specs the client runs itself
    use_tools: bool = True  # False (tool_choice "none"): no tools offered at all
    stream: bool = False  # send ``Delta`` pieces before the ``Reply``
    verbatim: bool = False  # the answer as the model wrote it (whitespace, tool markup that does not parse)
    return_unknown_calls: bool = False  # a call no MCP server runs goes to the client as a tool call
    answer_schema: dict[str, Any] | None = None  # the answer is JSON valid against it (checked by the HTTP process)
    call_required: bool = False  # tool_choice "required": the first round is tool calls only
    call_name: str | None = None  # tool_choice names a tool: the first round calls it
    count_only: bool = False  # generate nothing: the Reply's stats count the prompt's tokens
    reasoning: bool = False  # the client is shown the model's reasoning (``Reply.reasoning``, reasoning ``Delta``s)


@dataclass(frozen=True)
class Generate:
    """Answer the conversation ``messages`` (OpenAI-style, the whole history: nothing is kept
    between requests); the worker replies with ``Delta``s if the request streams, then exactly
    one ``Reply`` or ``Failure``."""

    request_id: str
    messages: list[dict[str, Any]]
    options: Options = field(default_factory=Options)


@dataclass(frozen=True)
class Cancel:
    """The client went away: stop working on ``request_id`` and send nothing more for it."""

    request_id: str


# --- model worker -> HTTP process -------------------------------------------------------------


@dataclass(frozen=True)
class GenerationStats:
    """Counters reported with a reply, for the response log line."""

    prompt_tokens: int = 0  # summed over the rounds: every round's prompt was processed
    completion_tokens: int = 0
    tool_calls: int = 0
    rounds: int = 0
    seconds: float = 0.0
    cached_tokens: int = 0  # of those, taken from the prompt cache (never more than prompt_tokens)


@dataclass(frozen=True)
class ClientToolCall:
    """A call of one of the client's own tools, for the client to run (``arguments``: JSON)."""

    id: str
    name: str
    arguments: str


@dataclass(frozen=True)
class Delta:
    """A piece of a streaming request's visible answer, as soon as it is decoded."""

    request_id: str
    text: str
    reasoning: bool = False  # a piece of the model's reasoning, not of its answer


@dataclass(frozen=True)
class Reply:
    """The final answer to a ``Generate`` (when it streamed, ``text`` is the pieces joined)."""

    request_id: str
    text: str
    stats: GenerationStats = field(default_factory=GenerationStats)
    finish_reason: str = "stop"  # "stop", "length" or "tool_calls"
    tool_calls: tuple[ClientToolCall, ...] = ()
    reasoning: str = ""  # the model's reasoning, when ``Options.reasoning`` asked for it
    stop_word: str | None = None  # the stop word (``Options.stop``) that ended the answer


@dataclass(frozen=True)
class Failure:
    """A ``Generate`` that could not be answered."""

    request_id: str
    category: FailureCategory
    message: str
    param: str | None = None  # the request field at fault, for a bad request


# --- lifecycle (supervisor <-> children, over each child's own control pipe) -----------------


class StartupFailure(str, enum.Enum):
    """What kind of start-up failure a child reports; each has its own exit code."""

    MODEL = "model"
    INTERNAL = "internal"


@dataclass(frozen=True)
class Ready:
    """Worker -> supervisor: MCP servers started and model loaded; HTTP may start."""

    model_name: str
    context_window: int | None
    tools: int = 0


@dataclass(frozen=True)
class Listening:
    """HTTP -> supervisor: the port is bound and accepting."""

    host: str
    port: int


@dataclass(frozen=True)
class Notice:
    """Worker -> supervisor, while starting: a progress line for the console (an MCP server up or
    failed, the model loading, download progress). ``key`` groups lines that replace each other
    on a terminal (a download's progress), else empty."""

    text: str
    key: str = ""
    fraction: float | None = None  # how far a keyed progress line has got (0..1)


@dataclass(frozen=True)
class ListenerClosed:
    """HTTP -> supervisor, while draining: it accepts no more connections; what is still in the
    socket's backlog is the supervisor's to answer (503)."""


@dataclass(frozen=True)
class Link:
    """Supervisor -> child: a fresh data pipe end to the other child, which was (re)started; it
    replaces the previous one. (A ``Connection`` pickles through ``multiprocessing``'s resource
    sharer, which passes the file descriptor itself.)"""

    conn: Connection


@dataclass(frozen=True)
class Linked:
    """HTTP -> supervisor: the pipe from the last ``Link`` is in use (requests go to the new
    worker from now on)."""


@dataclass(frozen=True)
class StartupFailed:
    """Child -> supervisor: the child cannot start; it exits right after sending this."""

    kind: StartupFailure
    reason: str


@dataclass(frozen=True)
class Shutdown:
    """Supervisor -> child: finish what is in flight, release resources, exit."""


@dataclass(frozen=True)
class Ping:
    """Supervisor -> worker, while serving: answer with a ``Pong`` (proves the event loop runs)."""

    seq: int


@dataclass(frozen=True)
class Pong:
    """Worker -> supervisor: the answer to ``Ping`` ``seq``, with how long the MLX thread has had
    work pending without making progress (0 when it is idle or moving)."""

    seq: int
    engine_stalled_s: float


@dataclass(frozen=True)
class Stopped:
    """Child -> supervisor: the child finished its shutdown sequence; ``detail`` says how."""

    detail: str = ""
