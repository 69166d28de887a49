"""Answering one prompt: generate, run the tools the model asks for, generate again.

This is the request-level logic of the worker, kept apart from MLX (``engine``) and MCP
(``mcp_host``) so it reads top to bottom: render the conversation with the live tool list,
generate, parse tool calls with the tokenizer's parser, call each tool once (never retried:
tools have side effects), append the results as ``tool`` messages, and repeat until the model
answers in plain text or the round limit is reached, after which it answers without tools.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

from ..common.protocol import GenerationStats
from .chat import (
    ToolCall,
    assistant_message,
    first_messages,
    parse_output,
    render,
    tool_message,
    withdraw_tool_results,
)
from .engine import Completion, Engine

log = logging.getLogger("llm_server.worker")


class PromptTooLong(Exception):
    """The user's prompt does not fit the model's context window (the client's fault: 400)."""


class ContextExhausted(Exception):
    """Tool results filled the context window before the model could answer."""


class ToolResultLike(Protocol):
    text: str
    is_error: bool
    server: str
    duration_s: float


class ToolHost(Protocol):
    """What the loop needs from the MCP host."""

    def tools(self) -> list[dict[str, Any]]: ...

    async def call_tool(self, name: str, arguments: dict[str, Any]) -> ToolResultLike: ...


@dataclass(frozen=True)
class Answer:
    text: str
    stats: GenerationStats


class ToolLoop:
    """Turns a prompt into the final assistant text, with the host's live tools (possibly none)."""

    def __init__(
        self,
        engine: Engine,
        *,
        system_prompt: str,
        max_tokens: int,
        max_tool_rounds: int,
        host: ToolHost,
    ) -> None:
        self.engine = engine
        self.system_prompt = system_prompt
        self.max_tokens = max_tokens
        self.max_tool_rounds = max_tool_rounds
        self.host = host
        # Chat templates render off the event loop, on one thread: more would only contend for the
        # GIL with the MLX thread, and a fixed pool keeps the worker's thread count flat.
        self._renderer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="render")

    async def answer(self, prompt: str) -> Answer:
        started = time.monotonic()
        tokenizer = self.engine.tokenizer
        messages = first_messages(self.system_prompt, prompt)
        rounds = calls_made = completion_tokens = 0
        prompt_tokens = cached_tokens = 0
        overflowed = False
        while True:
            limit_reached = rounds >= self.max_tool_rounds
            tools = None if limit_reached or overflowed else (self.host.tools() or None)
            if limit_reached and rounds and not overflowed:
                log.info("tool round limit (%d) reached: answering without tools", self.max_tool_rounds)
            ids = await asyncio.get_running_loop().run_in_executor(self._renderer, render, tokenizer, messages, tools)
            try:
                budget = self._budget(len(ids), first=rounds == 0)
            except ContextExhausted:
                if overflowed:
                    raise
                # Tool results too large for the window: the model is told so and answers without
                # tools, rather than the request failing for what a tool returned.
                overflowed = True
                log.warning(
                    "tool results do not fit the context window (%s tokens): answering without them",
                    self.engine.context_window,
                )
                withdraw_tool_results(messages)
                continue
            if rounds == 0:
                prompt_tokens = len(ids)
            completion = await self._generate(ids, budget)
            completion_tokens += completion.completion_tokens
            cached_tokens += completion.cached_tokens
            # Decoded here, not on the MLX thread, which has the next step to run.
            parsed = parse_output(tokenizer, tokenizer.decode(completion.tokens), tools)
            for body in parsed.malformed:
                log.warning("model emitted a tool call that does not parse: %.200s", body)
            if not parsed.calls or tools is None:
                stats = GenerationStats(
                    prompt_tokens, completion_tokens, calls_made, rounds + 1, time.monotonic() - started, cached_tokens
                )
                return Answer(parsed.content, stats)
            rounds += 1
            messages.append(assistant_message(parsed.content, parsed.calls))
            for call in parsed.calls:
                calls_made += 1
                result = await self._call(call)
                messages.append(tool_message(call, result.text, result.is_error))

    def _budget(self, prompt_len: int, first: bool) -> int:
        window = self.engine.context_window
        if window is None:
            return self.max_tokens
        room = window - prompt_len
        if room <= 0:
            if first:
                raise PromptTooLong(
                    f"prompt is {prompt_len} tokens with the chat template and system prompt; "
                    f"the model's context window is {window} tokens"
                )
            raise ContextExhausted(
                f"tool results filled the model's context window ({window} tokens) before it answered"
            )
        return min(self.max_tokens, room)

    async def _generate(self, ids: list[int], budget: int) -> Completion:
        future = self.engine.submit(ids, budget)
        try:
            return await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            self.engine.cancel(future)
            raise

    async def _call(self, call: ToolCall) -> ToolResultLike:
        """One tool call; the host logs it and turns every failure into readable text."""
        return await self.host.call_tool(call.name, call.arguments)
