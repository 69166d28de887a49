"""Constrained decoding: a grammar's allowed tokens, applied to a sequence's logits each step.

A constrained job carries a grammar (``common.grammars``); here it becomes an llguidance
``LLMatcher`` (``GrammarProcessor``). Alone in ``generate_step`` it is an mlx-lm logits
processor; in the running ``BatchGenerator`` batch, beside free rows, the masks of all its
constrained rows are applied at once by ``BatchMasks``. llguidance computes the masks in Rust
with the GIL released; they are applied with plain MLX ops (``mx.where``), so they run on every
backend (the library's own ``llguidance.mlx`` is a Metal kernel). Used on the MLX thread only.
"""

from __future__ import annotations

import functools
import logging
from typing import Any, Callable, Mapping

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


def allowed_rows(bitmask: Any, width: int, vocab_size: int) -> Any:
    """llguidance's packed bitmask rows as booleans over the logits' ``width`` (a model's rows
    past the vocabulary, padding, are never allowed)."""
    import numpy as np

    allowed = np.unpackbits(bitmask.view(np.uint8), axis=1, count=min(width, vocab_size), bitorder="little")
    if width > allowed.shape[1]:
        allowed = np.pad(allowed, ((0, 0), (0, width - allowed.shape[1])))
    return allowed.view(np.bool_)


class GrammarProcessor:
    """One sequence's grammar; alone, an mlx-lm logits processor (``(tokens, logits) -> logits``).

    Each decode step brings the token the sequence was just fed, the one sampled last step,
    except the first step on a path (``enter``): that one feeds the prompt's last token or, after
    a hand-over to the batch, the token the lone path already consumed.

    Reading that token waits for the step that sampled it, and for anything queued on the stream
    before it (MLX runs a stream's work in order). So the token's read is queued first, then the
    step's forward pass (``mx.async_eval`` both), and only then is the token waited for: the
    stream is never left empty while the mask is computed, and the mask is computed while the
    forward pass runs. (Read after the pass was queued, as first written, the token waited for
    the whole pass: py-spy put 69% of the MLX thread on those two lines at 32 clients; read
    before it, the stream ran dry each step, waiting for the read to come back.)
    """

    def __init__(self, matcher: Any, vocab_size: int) -> None:
        import llguidance.numpy

        self.matcher = matcher
        self.vocab_size = vocab_size
        self._bitmask = llguidance.numpy.allocate_token_bitmask(1, vocab_size)
        self._fresh = True

    def enter(self) -> GrammarProcessor:
        """The sequence starts on a path, alone or in the batch: the next step brings no token."""
        self._fresh = True
        return self

    def take(self, fed: Callable[[], int]) -> None:
        """This step's fed token (read by ``fed`` only if the matcher has not consumed it)."""
        if self._fresh:
            self._fresh = False
            return
        if not self.matcher.consume_token(fed()) and not self.matcher.is_stopped():
            log.warning("constrained generation left its grammar: %s", self.matcher.get_error()[:200])

    def __call__(self, tokens: Any, logits: Any) -> Any:
        import mlx.core as mx
        from llguidance.numpy import fill_next_token_bitmask

        last = None if self._fresh else tokens[-1]  # the token fed, a slice of mlx-lm's context
        if last is not None:
            mx.async_eval(last)  # queued right behind the step that sampled it
        mx.async_eval(logits)  # the step's forward pass, behind that; its mask is computed meanwhile
        self.take(lambda: int(last.item()))  # waits for the token, not the forward pass
        fill_next_token_bitmask(self.matcher, self._bitmask)
        allowed = allowed_rows(self._bitmask, logits.shape[-1], self.vocab_size)
        return mx.where(mx.array(allowed), logits, -mx.inf)


class BatchMasks:
    """The masks of the batch's constrained rows, applied in one op by the rows' shared sampler.

    mlx-lm's per-sequence logits processors cost every row of the batch, each step, a slice of
    the logits, a token context and its update, the processor's ops and one more concatenation;
    each small MLX op costs tens of µs on this CPU, and 32 rows with an identity processor were
    already 11% slower than free ones (in-process, 8 rounds, medians). ``BatchGenerator`` has no
    batch-level logits hook, but it samples the whole batch in one call when every row shares a
    sampler object: so every row gets a ``MaskedSampler`` over its own sampler (one per sampler,
    hence shared by rows of the same settings), and the step's first call computes every
    constrained row's mask (``fill_next_token_bitmask_par``, one Rust call) and applies them all
    with one ``mx.where``. The masked log-probabilities are not renormalized (mlx-lm
    renormalizes after processors): every mlx-lm sampler (greedy, temperature, top-p against the
    total mass, min-p, top-k, XTC) is invariant to a row's constant shift, and with a 150k
    vocabulary at 32 rows the extra ``logsumexp`` cost ~35% of the step on this CPU. Rows of
    different settings are sampled one at a time, in row order, so those calls take the step's
    mask row by row.

    A row's first token is sampled before it joins the running batch: mlx-lm steps the rows
    leaving prompt processing once as a batch of their own, then appends them. That step, whose
    rows are not known here, runs the row's ``GrammarProcessor`` as an mlx-lm logits processor
    (``Batch.enter`` passes it); ``settle`` then drops the processors of the rows in the running
    batch, so that their later steps take the masks here, and the sampler's calls past the
    running batch's rows (the new rows' first step) pass through untouched.

    The running batch's fed tokens are one array, ``GenerationBatch._current_tokens`` (rows in
    the order of its ``uids``), read once for all rows, after the step's forward pass is queued
    behind them (``GrammarProcessor`` says why): read through each row's own context, each constrained row
    paid an ``eval`` of its own, a hand-over to MLX's stream thread (~145 µs on this CPU, a
    command buffer's round trip on Metal), a third of the step at 32 rows (py-spy). These are
    mlx-lm's private names and call order (the version is pinned); ``tests/test_constraint.py``
    holds the answers to those of mlx-lm's own per-row processors.
    """

    def __init__(self, generator: Any, active: Mapping[int, Any]) -> None:
        self._generator = generator
        self._active = active  # the batch's jobs by uid; a constrained one has a ``processor``
        self._samplers: dict[Any, MaskedSampler] = {}  # by the row's own sampler
        self._executor: Any = None
        self._mask: Any = None  # this step's (rows, width) mask, False: no row constrained
        self._left = 0  # the running batch's rows not sampled yet this step

    def sampler(self, base: Any) -> MaskedSampler:
        """The sampler a row of sampler ``base`` is given (the same object for the same ``base``)."""
        masked = self._samplers.get(base)
        if masked is None:
            if len(self._samplers) > 128:  # the engine's samplers come and go with their settings
                self._samplers.clear()
            masked = self._samplers[base] = MaskedSampler(base, self)
        return masked

    def begin(self) -> None:
        """A new step: the masks computed belong to the last one."""
        self._mask = None

    def settle(self) -> None:
        """After a step: the rows now in the running batch take their masks here."""
        batch = self._generator._generation_batch
        if any(batch.logits_processors):
            batch.logits_processors = [()] * len(batch.uids)

    def apply(self, logprobs: Any) -> Any:
        """``logprobs`` (the running batch's, or one row's, in row order) with the grammars' masks."""
        import mlx.core as mx

        if self._mask is None:
            self._mask = self._compute(logprobs)
        if self._mask is False or self._left == 0:  # no grammar, or the new rows' first step
            return logprobs
        rows = self._mask.shape[0]
        if logprobs.shape[0] == self._left == rows:
            mask, self._left = self._mask, 0
        else:
            row = rows - self._left
            mask, self._left = self._mask[row : row + 1], self._left - 1
        return mx.where(mask, logprobs, -mx.inf)

    def _compute(self, logprobs: Any) -> Any:
        """The running batch's (rows, width) mask this step, or False when no row is constrained."""
        import llguidance
        import mlx.core as mx
        import numpy as np
        from llguidance.numpy import allocate_token_bitmask, fill_next_token_bitmask_par

        batch = self._generator._generation_batch
        uids = batch.uids
        self._left = len(uids)
        rows = [(row, job.processor) for row, uid in enumerate(uids)
                if (job := self._active.get(uid)) is not None and job.processor is not None]  # fmt: skip
        if not rows:
            return False
        # The step's forward pass is queued first: the fed tokens, already queued before it, are
        # ready before it runs, and the masks are computed while it does.
        mx.async_eval(logprobs)
        fed: list[int] = []

        def token(row: int) -> int:
            if not fed:
                fed.extend(batch._current_tokens.tolist())
            return fed[row]

        for row, processor in rows:
            processor.take(functools.partial(token, row))
        if self._executor is None:
            self._executor = llguidance.LLExecutor()
        vocab_size = rows[0][1].vocab_size
        bitmask = allocate_token_bitmask(len(uids), vocab_size)
        fill_next_token_bitmask_par(self._executor, [(p.matcher, row) for row, p in rows], bitmask)
        allowed = allowed_rows(bitmask, logprobs.shape[-1], vocab_size)
        free = np.ones(len(uids), dtype=np.bool_)
        free[[row for row, _ in rows]] = False
        allowed[free] = True
        return mx.array(allowed)


class MaskedSampler:
    """A row's sampler in the batch: its own (mlx-lm's ``make_sampler``) after the masks."""

    def __init__(self, base: Any, masks: BatchMasks) -> None:
        self._base = base
        self._masks = masks

    def __call__(self, logprobs: Any) -> Any:
        return self._base(self._masks.apply(logprobs))
