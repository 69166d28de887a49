"""Reading what the model generates: token ids → visible text, tool calls, hidden reasoning.

One ``RoundReader`` per generation round, fed token ids as they come (streaming) or all at once.
mlx-lm's streaming detokenizer turns them into text, and mlx-lm's ``TextStateMachine`` (built by
``make_text_state_machine`` from the tokenizer's thinking and tool-call markers and the stop
words, exactly as ``mlx_lm.server`` builds it) splits the text into normal text, reasoning and
tool-call bodies, holding back whatever might still turn into a marker. Tool-call bodies are
parsed with the tokenizer's own ``tool_parser``. Streamed or not, a round goes through this same
code, so a streamed answer is the non-streamed answer in pieces.

``VisibleText`` assembles what the client sees from the rounds of one request: each round's
normal text with its outer whitespace trimmed, rounds separated by a blank line, handed out as
soon as it is certain (trailing whitespace waits until more text follows it); or, ``verbatim``
(the OpenAI endpoints), every round's text exactly as the model wrote it, one after the other.
A tool call that does not parse is dropped, or with ``keep_malformed`` shown as the text it was.
"""

from __future__ import annotations

import json
from functools import lru_cache
from typing import Any, Iterable, Sequence

from mlx_lm.generate import TextStateMachine, make_text_state_machine

from .chat import ToolCall


def initial_state(tokenizer: Any, prompt: Sequence[int]) -> str:
    """Where the generation starts: in reasoning if the prompt left a thinking block open (the
    template opened it), else normal; as ``mlx_lm.server`` decides it."""
    state = "normal"
    if getattr(tokenizer, "has_thinking", False):
        if tokenizer.rfind_think_start(prompt) > tokenizer.rfind_think_end(prompt):
            state = "reasoning"
    return getattr(tokenizer, "response_initial_state", None) or state


@lru_cache(maxsize=64)
def _machine(tokenizer: Any, stop_words: tuple[str, ...]) -> TextStateMachine:
    """mlx-lm's ``make_text_state_machine``, except that a stop word *ends* the text (state None)
    instead of being stripped and passed over: mlx-lm stops on a stop word's token ids only,
    which misses the word whenever the model spells it with other tokens (" he" for "he"), so
    here the text stops the generation itself (``TextReader.stopped``)."""
    if not stop_words:
        return make_text_state_machine(tokenizer)
    transitions = _transitions(tokenizer)
    for state in set(transitions) | {"normal"}:
        transitions.setdefault(state, []).extend((word, None) for word in stop_words)
    return TextStateMachine(transitions)


def _transitions(tokenizer: Any) -> dict[str, list[tuple[str, str | None]]]:
    """The reasoning and tool-call transitions exactly as ``make_text_state_machine`` (mlx-lm
    0.32, ``generate.py``) builds them, which it does not expose on their own."""
    transitions: dict[str, list[tuple[str, str | None]]] = {}
    if tokenizer.has_thinking:
        transitions.setdefault("normal", []).append((tokenizer.think_start, "reasoning"))
        transitions["reasoning"] = [(tokenizer.think_end, "normal")]
    if tokenizer.has_tool_calling:
        targets = {dst for edges in tokenizer.response_transitions.values() for _, dst in edges}
        if "tool" not in targets:
            transitions.setdefault("normal", []).append((tokenizer.tool_call_start, "tool"))
        if tokenizer.has_thinking:
            transitions["reasoning"].append((tokenizer.tool_call_start, "tool"))
        transitions["tool"] = [(tokenizer.tool_call_end, "normal")] if tokenizer.tool_call_end else []
    for marker in tokenizer.structural_markers or ():
        transitions.setdefault("normal", []).append((marker, "normal"))
    for state, edges in tokenizer.response_transitions.items():
        transitions.setdefault(state, []).extend(edges)
    return transitions


class TextReader:
    """One round's generated *text*, split as it arrives (``feed``), closed by ``finish``."""

    def __init__(
        self, tokenizer: Any, tools: Sequence[dict[str, Any]] | None, start: str = "normal",
        stop_words: Sequence[str] = (), keep_malformed: bool = False,
    ) -> None:  # fmt: skip
        self._parser = tokenizer.tool_parser if getattr(tokenizer, "has_tool_calling", False) else None
        self._markers = (getattr(tokenizer, "tool_call_start", "") or "", getattr(tokenizer, "tool_call_end", "") or "")
        self._keep_malformed = keep_malformed
        self._tools = list(tools or [])
        self._state = _machine(tokenizer, tuple(stop_words)).make_state(start)
        self._stop_words = tuple(stop_words)
        self.stop_word: str | None = None  # the stop word that ended the text, once one has
        self._in = start
        self._tool_text = ""
        self.calls: list[ToolCall] = []
        self.malformed: list[str] = []
        self._shown: list[str] = []
        self._thought: list[str] = []  # the round's reasoning text
        self._taken = 0  # how much of it ``take_reasoning`` has handed out

    @property
    def content(self) -> str:
        """The round's visible text so far, trimmed (what the conversation keeps of it)."""
        return "".join(self._shown).strip()

    @property
    def stopped(self) -> bool:
        """A stop word has appeared: nothing after it counts, and the generation may end."""
        return self._state[0] is None

    def feed(self, text: str) -> str:
        """Take more text; return the visible text it made certain."""
        if self.stopped:
            return ""
        pending = self._state[3] + text
        self._state, segments = TextStateMachine.split(self._state, text)
        if self.stopped:  # the machine stops at the first stop word to end in the text
            ends = {word: pending.find(word) + len(word) for word in self._stop_words if word in pending}
            self.stop_word = min(ends, key=lambda word: (ends[word], -len(word)), default=None)
        return self._route(segments)

    @property
    def reasoning(self) -> str:
        """The round's reasoning so far, exactly as written between the markers."""
        return "".join(self._thought)

    def take_reasoning(self) -> str:
        """The reasoning read since the last call (for a stream)."""
        taken, self._taken = self._thought[self._taken :], len(self._thought)
        return "".join(taken)

    def finish(self, finish_reason: str) -> str:
        """The round ended: held-back text is shown after a length cut (it was no marker), and
        dropped after a stop (a stop word or marker in the making); an open call is parsed."""
        if self.stopped:
            visible = ""
        elif finish_reason == "length":
            self._state, rest, current = TextStateMachine.flush(self._state)
            visible = self._route([(current, rest)])
        else:
            self._state, current = TextStateMachine.discard(self._state)
            visible = ""
        if self._in == "tool":
            visible += self._close_call(ended=False)
        return visible

    def _route(self, segments: Iterable[tuple[str | None, str]]) -> str:
        visible = []
        for state, text in segments:
            if self._in == "tool" and state != "tool":
                visible.append(self._close_call(ended=state is not None))
            if state == "normal":
                visible.append(text)
                self._shown.append(text)
            elif state == "tool":
                self._tool_text += text
            elif state == "reasoning" and text:
                self._thought.append(text)
            self._in = state or self._in
        return "".join(visible)

    def _close_call(self, ended: bool) -> str:
        """Parse the call just read (``ended``: its end marker was seen); the text to show for
        it: none, or the markup itself when it does not parse and ``keep_malformed`` says so."""
        body, self._tool_text = self._tool_text, ""
        if self._parser is None or not body.strip():
            return ""
        calls: list[ToolCall] = []
        try:
            parsed = self._parser(body, self._tools)
        except Exception:  # noqa: BLE001 - any parser failure means "not a usable call"
            parsed = None
        for item in parsed if isinstance(parsed, list) else [parsed]:
            call = _as_call(item)
            if call is None:
                calls = []
                break
            calls.append(call)
        if calls:
            self.calls += calls
            return ""
        self.malformed.append(body.strip())
        if not self._keep_malformed:
            return ""
        markup = self._markers[0] + body + (self._markers[1] if ended else "")
        self._shown.append(markup)
        return markup


class RoundReader(TextReader):
    """One round's generated *token ids*: mlx-lm's streaming detokenizer in front of the text."""

    def __init__(
        self, tokenizer: Any, prompt: Sequence[int], tools: Sequence[dict[str, Any]] | None,
        stop_words: Sequence[str] = (), keep_malformed: bool = False,
    ) -> None:  # fmt: skip
        super().__init__(tokenizer, tools, initial_state(tokenizer, prompt), stop_words, keep_malformed)
        self._tokenizer = tokenizer
        self._detokenizer = tokenizer.detokenizer
        self._first = True

    def add(self, tokens: Iterable[int]) -> str:
        for token in tokens:
            self._detokenizer.add_token(token)
        return self.feed(self._untrimmed(self._detokenizer.last_segment))

    def close(self, finish_reason: str) -> str:
        self._detokenizer.finalize()
        return self.feed(self._untrimmed(self._detokenizer.last_segment)) + self.finish(finish_reason)

    def _untrimmed(self, segment: str) -> str:
        """mlx-lm's BPE streaming detokenizer drops the first space of a generation (a habit of
        SentencePiece models, where that space is no text); the first piece gets it back when
        the tokenizer's own ``decode`` says the model wrote it."""
        if not self._first or not segment:
            return segment
        self._first = False
        detokenizer = self._detokenizer
        if self._tokenizer.decode(detokenizer.tokens) == " " + detokenizer.text:
            return " " + segment
        return segment


class VisibleText:
    """What the client sees of one request's rounds, released as soon as it is certain.

    The whole is each round's text stripped, non-empty rounds joined by a blank line (or, when
    ``verbatim``, every piece as it came); ``push`` hands out the same text in pieces.
    """

    def __init__(self, verbatim: bool = False) -> None:
        self._verbatim = verbatim
        self._parts: list[str] = []
        self._held = ""  # trailing whitespace: shown only if more text follows in this round
        self._round_open = False  # this round has shown text
        self._shown_any = False

    def new_round(self) -> None:
        self._held = ""
        self._round_open = False

    def push(self, text: str) -> str:
        if self._verbatim:
            if text:
                self._parts.append(text)
            return text
        if not self._round_open:
            text = text.lstrip()
            if not text:
                return ""
            if self._shown_any:
                text = "\n\n" + text
            self._round_open = self._shown_any = True
        text = self._held + text
        body = text.rstrip()
        self._held = text[len(body) :]
        if body:
            self._parts.append(body)
        return body

    @property
    def text(self) -> str:
        return "".join(self._parts)


def _as_call(item: Any) -> ToolCall | None:
    if not isinstance(item, dict) or not isinstance(item.get("name"), str):
        return None
    arguments = item.get("arguments", {})
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except ValueError:
            return None
    if not isinstance(arguments, dict):
        return None
    return ToolCall(item["name"], arguments)
