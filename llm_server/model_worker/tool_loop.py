"""Answering one conversation: generate, run the tools the model asks for, generate again.

This is the request-level logic of the worker, kept apart from MLX (``engine``) and MCP
(``mcp_host``) so it reads top to bottom: render the conversation with the tools on offer (the
MCP servers' live tools and the client's own), generate, read the output with mlx-lm's
detokenizer and text state machine (``output``), call each MCP tool once (never retried: tools
have side effects), append the results as ``tool`` messages, and repeat until the model answers
in plain text or the round limit is reached, after which it answers without tools. A call to one
of the client's tools ends the turn instead: the calls go back to the client to run
(``finish_reason`` ``tool_calls``), as does, where the client can take one (OpenAI), a call of a
tool nobody offered. When the client streams, each round's visible text is handed out as it is
decoded; reasoning and tool-call markup never are (except markup that does not parse, which the
OpenAI endpoints show as text). Usage counts every round: its prompt and its completion.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Protocol

from ..common.logs import TRACE
from ..common.protocol import ClientToolCall, GenerationStats, Options
from .chat import Message, ToolCall, assistant_message, render, render_opening, tool_message, withdraw_tool_results
from . import metrics
from .engine import Engine
from .jobs import Completion, SamplingSettings
from .output import RoundReader, VisibleText
from .structure import round_grammar

log = logging.getLogger("llm_server.model_worker")

OnText = Callable[[str, bool], None]  # a streamed piece: (text, whether it is reasoning)


class PromptTooLong(Exception):
    """The user's prompt does not fit the model's context window (the client's fault: 400)."""


class ToolClash(Exception):
    """A client tool has the name of a server tool (the client's fault: 400)."""


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

    def runs(self, name: str) -> bool: ...

    async def call_tool(self, name: str, arguments: dict[str, Any]) -> ToolResultLike: ...


@dataclass(frozen=True)
class Answer:
    text: str
    stats: GenerationStats
    finish_reason: str = "stop"  # "stop", "length" or "tool_calls"
    tool_calls: tuple[ClientToolCall, ...] = ()  # calls of the client's tools, for it to run
    reasoning: str = ""  # every round's reasoning, when the client asked to see it
    stop_word: str | None = None  # the stop word that ended the answer


class ToolLoop:
    """Turns a conversation into the assistant's answer, with the host's live tools (possibly none)."""

    def __init__(
        self,
        engine: Engine,
        *,
        sampling: SamplingSettings,
        max_tokens: int,
        max_tool_rounds: int,
        host: ToolHost,
    ) -> None:
        self.engine = engine
        self.sampling = sampling
        self.max_tokens = max_tokens
        self.max_tool_rounds = max_tool_rounds
        self.host = host
        # Chat templates render off the event loop, on one thread: more would only contend for the
        # GIL with the MLX thread, and a fixed pool keeps the worker's thread count flat.
        self._renderer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="render")

    async def answer(
        self, messages: list[Message], options: Options, on_text: OnText | None = None
    ) -> Answer:
        """Answer ``messages`` (the whole conversation); ``on_text`` gets visible text as it
        comes, and reasoning (flagged) when ``options.reasoning`` asks for it."""
        started = time.monotonic()
        tokenizer = self.engine.tokenizer
        client_tools = list(options.client_tools) if options.use_tools else []
        client_names = {tool["function"]["name"] for tool in client_tools}
        sampling = self._sampling(options)
        visible = VisibleText(options.verbatim)
        thought: list[str] = []
        rounds = calls_made = completion_tokens = 0
        prompt_tokens = cached_tokens = 0
        overflowed = False
        while True:
            limit_reached = rounds >= self.max_tool_rounds
            tools = None
            if options.use_tools and not limit_reached and not overflowed:
                tools = self._offer(client_tools) or None
            log.log(TRACE, "tools offered: %s", ", ".join(t["function"]["name"] for t in tools or []) or "none")
            if limit_reached and rounds and not overflowed:
                log.info("tool round limit (%d) reached: answering without tools", self.max_tool_rounds)
            ids = await asyncio.get_running_loop().run_in_executor(self._renderer, render, tokenizer, messages, tools)
            if options.count_only:  # the first round's prompt, as a generation would pay for it
                return Answer("", GenerationStats(prompt_tokens=len(ids), seconds=time.monotonic() - started))
            try:
                budget = self._budget(len(ids), options, first=rounds == 0)
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
            prompt_tokens += len(ids)  # every round's prompt is paid for (its cached part included)
            grammar = round_grammar(tokenizer, options, tools, ids, first=rounds == 0)
            reader = RoundReader(tokenizer, ids, tools, options.stop, keep_malformed=options.verbatim)
            visible.new_round()
            completion = await self._generate(ids, budget, sampling, options, grammar, reader, visible, on_text)
            thought.append(reader.reasoning)
            completion_tokens += completion.completion_tokens
            cached_tokens += completion.cached_tokens
            for body in reader.malformed:
                shown = " (returned as text)" if options.verbatim else ""
                log.warning("model emitted a tool call that does not parse%s: %.200s", shown, body)

            def stats() -> GenerationStats:
                return GenerationStats(
                    prompt_tokens, completion_tokens, calls_made, rounds + 1, time.monotonic() - started, cached_tokens
                )

            if not reader.calls or tools is None:
                finish = "length" if completion.finish_reason == "length" else "stop"
                return Answer(visible.text, stats(), finish, reasoning="".join(thought), stop_word=reader.stop_word)
            # A call the daemon cannot run goes to the client when it can be handed one (OpenAI):
            # never answered behind its back. (POST / has no such turn: the model is told.)
            unknown = {c.name for c in reader.calls if c.name not in client_names and not self.host.runs(c.name)}
            if not options.return_unknown_calls:
                unknown = set()
            for_client = [call for call in reader.calls if call.name in client_names or call.name in unknown]
            if for_client:
                # The client runs these; server tools called in the same round are not run (the
                # client could not be shown their results: nothing is kept between requests).
                calls = tuple(ClientToolCall(c.id, c.name, json.dumps(c.arguments)) for c in for_client)
                if unknown:
                    log.warning("the model called %s, offered by no MCP server nor the client: returned to the client",
                                ", ".join(repr(name) for name in sorted(unknown)))  # fmt: skip
                log.info("returning %d call(s) of the client's tools", len(calls))
                return Answer(visible.text, stats(), "tool_calls", calls, "".join(thought))
            rounds += 1
            messages.append(assistant_message(reader.content, reader.calls))
            for call in reader.calls:
                calls_made += 1
                result = await self._call(call)
                messages.append(tool_message(call, result.text, result.is_error))

    async def warm(self, system_prompt: str) -> int:
        """Prefill the system turn that every request without its own system message starts
        with (the config's system prompt and the MCP servers' tools, as the chat template
        renders them) into the prompt cache, so that the first request reuses it like every
        later one; the number of tokens prefilled (a one-token generation on top, dropped)."""
        ids = await asyncio.get_running_loop().run_in_executor(
            self._renderer, render_opening, self.engine.tokenizer, system_prompt, self.host.tools() or None
        )
        await asyncio.wrap_future(self.engine.submit(ids, 1))
        return len(ids)

    def _offer(self, client_tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The server's live tools, then the client's; a shared name is the client's mistake."""
        server_tools = self.host.tools()
        names = {tool["function"]["name"] for tool in server_tools}
        for tool in client_tools:
            if tool["function"]["name"] in names:
                raise ToolClash(f"tool {tool['function']['name']!r} clashes with a tool of this server's MCP servers")
        return server_tools + client_tools

    def _sampling(self, options: Options) -> SamplingSettings | None:
        """The request's own sampling settings, or None for the config's."""
        if options.temperature is None and options.top_p is None and options.min_p is None and options.top_k is None:
            return None
        return SamplingSettings(
            self.sampling.temperature if options.temperature is None else options.temperature,
            self.sampling.top_p if options.top_p is None else options.top_p,
            self.sampling.min_p if options.min_p is None else options.min_p,
            self.sampling.min_tokens_to_keep,
            self.sampling.top_k if options.top_k is None else options.top_k,
        )

    def _budget(self, prompt_len: int, options: Options, first: bool) -> int:
        wanted = self.max_tokens if options.max_tokens is None else options.max_tokens
        window = self.engine.context_window
        if window is None:
            return wanted
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
        return min(wanted, room)

    async def _generate(
        self, ids: list[int], budget: int, sampling: SamplingSettings | None, options: Options, grammar: str | None,
        reader: RoundReader, visible: VisibleText, on_text: Callable[[str], None] | None,
    ) -> Completion:  # fmt: skip
        """One round. When the client streams, or stop words must be watched for, each token
        comes over from the MLX thread as it is made and is read at once (its text shown; a stop
        word ends the generation there); otherwise the tokens are read when the round is done."""
        future: Future[Completion] | None = None
        on_token = None
        if on_text is not None or options.stop:
            loop = asyncio.get_running_loop()

            def read(token: int) -> None:
                if reader.stopped:
                    return
                piece = visible.push(reader.add((token,)))
                if on_text is not None:
                    _show(piece, reader, options, on_text)
                if reader.stopped and future is not None:
                    self.engine.finish_early(future)

            def on_token(token: int) -> None:
                loop.call_soon_threadsafe(read, token)

        future = self.engine.submit(ids, budget, sampling, options.stop, on_token, grammar)
        try:
            completion = await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            self.engine.cancel(future)
            raise
        metrics.generation(completion)
        if on_token is None:
            visible.push(reader.add(completion.tokens))  # decoded here, not on the MLX thread
        piece = visible.push(reader.close(completion.finish_reason))
        if on_text is not None:
            _show(piece, reader, options, on_text)
        if reader.stopped:
            completion = dataclasses.replace(completion, finish_reason="stop")
        return completion

    async def _call(self, call: ToolCall) -> ToolResultLike:
        """One tool call; the host logs it and turns every failure into readable text."""
        return await self.host.call_tool(call.name, call.arguments)


def _show(piece: str, reader: RoundReader, options: Options, on_text: OnText) -> None:
    """Stream what a token made: its reasoning first (when the client sees reasoning), then text."""
    thought = reader.take_reasoning()
    if thought and options.reasoning:
        on_text(thought, True)
    if piece:
        on_text(piece, False)
