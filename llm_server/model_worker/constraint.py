"""Constrained decoding: a grammar's allowed tokens, applied to one sequence's logits each step.

A constrained job carries a grammar (``common.grammars``); here it becomes an llguidance
``LLMatcher`` and an mlx-lm logits processor, so that a constrained sequence runs inside the same
``BatchGenerator`` batch as free ones (mlx-lm's per-sequence ``logits_processors``) and through
``generate_step`` alone like any other. llguidance computes the mask in Rust with the GIL
released; it is applied with plain MLX ops (``mx.where``), so it runs on every backend (the
library's own ``llguidance.mlx`` is a Metal kernel). Used on the MLX thread only.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

log = logging.getLogger("llm_server.engine")


class Grammars:
    """The model's vocabulary as llguidance sees it, made once, on first use (~10 ms for a small
    vocabulary, longer for a large one), and a processor per constrained job."""

    def __init__(self, tokenizer: Any, eos: frozenset[int]) -> None:
        self._tokenizer = tokenizer  # mlx-lm's TokenizerWrapper
        self._eos = sorted(eos)
        self._vocabulary: Any = None

    def processor(self, grammar: str) -> GrammarProcessor:
        import llguidance
        import llguidance.hf

        if self._vocabulary is None:
            self._vocabulary = llguidance.hf.from_tokenizer(self._tokenizer._tokenizer, eos_token=self._eos)
        matcher = llguidance.LLMatcher(self._vocabulary, grammar, log_level=0)
        if matcher.is_error():
            raise ValueError(f"the grammar does not compile: {matcher.get_error()}")
        return GrammarProcessor(matcher, self._vocabulary.vocab_size)


class GrammarProcessor:
    """An mlx-lm logits processor (``(tokens, logits) -> logits``) for one sequence.

    mlx-lm calls it once per decode step, with the tokens fed so far, the last of them the one
    just sampled. The first call after the sequence starts on a path (``enter``) sees the prompt,
    or, after a hand-over to the batch, the token the lone path already consumed; each later call
    brings exactly one new token.

    Reading that token waits for the step that sampled it, and for anything queued on the stream
    before it (MLX runs a stream's work in order). So the token is read first, and only then is
    the step's forward pass started (``mx.async_eval``), so that the mask is computed while it
    runs and the engine's work on the last token overlaps it too: alone in ``generate_step``
    here, in the batch by ``batch.FedTokens``, which reads every row's token at once. (Read
    after the pass was started, as first written, the token waited for the whole pass: py-spy
    put 69% of the MLX thread on those two lines at 32 clients.)
    """

    def __init__(self, matcher: Any, vocab_size: int) -> None:
        import llguidance.numpy

        self._matcher = matcher
        self._vocab_size = vocab_size
        self._bitmask = llguidance.numpy.allocate_token_bitmask(1, vocab_size)
        self._fresh = True
        self._alone = True
        # In the batch: reads the token this row was fed, given the logits (``batch.FedTokens``).
        self.fed: Callable[[Any], int | None] | None = None
        self._width: int | None = None  # the logits' width, once seen (rows past the vocabulary: never)

    def enter(self, alone: bool) -> GrammarProcessor:
        """The sequence starts on a path, alone or in the batch: the next call brings no token."""
        self._fresh, self._alone = True, alone
        return self

    def __call__(self, tokens: Any, logits: Any) -> Any:
        import mlx.core as mx
        import numpy as np
        from llguidance.numpy import fill_next_token_bitmask

        if self._fresh:
            self._fresh = False
        else:
            token = None if self._alone or self.fed is None else self.fed(logits)
            if token is None:
                token = int(tokens[-1].item())
            if not self._matcher.consume_token(token) and not self._matcher.is_stopped():
                log.warning("constrained generation left its grammar: %s", self._matcher.get_error()[:200])
        if self._alone:
            mx.async_eval(logits)  # the step's forward pass runs while its mask is computed
        fill_next_token_bitmask(self._matcher, self._bitmask)
        width = self._width = self._width or logits.shape[-1]
        allowed = np.unpackbits(self._bitmask.view(np.uint8), count=min(width, self._vocab_size), bitorder="little")
        if width > allowed.size:  # the model's rows past the vocabulary (padding) are never allowed
            allowed = np.pad(allowed, (0, width - allowed.size))
        return mx.where(mx.array(allowed.view(np.bool_)), logits, -mx.inf)
