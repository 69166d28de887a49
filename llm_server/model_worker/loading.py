"""Loading the engine's model: fetching it, ``mlx_lm.load`` or ``sharded_load``, and preparing it.

Called on the MLX thread (MLX streams belong to the thread that made them). Everything between
the load and the first request (the sampler, the stream, the batch generator, the prompt cache)
belongs to loading too, so that any failure before serving is a ``ModelLoadError`` with its
reason (exit 3), not a worker crash.

Distributed (``sharding`` "pipeline" or "tensor", in a process group that ``mlx.launch``
started): every rank loads its shard with mlx-lm's ``sharded_load``, and the random state is
made the same on every rank (as ``mlx_lm.server`` does), so that sampling agrees.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..common import faults
from ..common.config import is_local
from ..common.faults import Faults
from .admission import KV_STEP, Admission, default_budget, measure_bytes_per_token
from .download import fetch
from .jobs import ModelLoadError, SamplingSettings
from .prompt_cache import PromptCache
from .weights import indexed_folder

log = logging.getLogger("llm_server.engine")


@dataclass
class Loaded:
    """A loaded model with what the engine's loop runs it with."""

    model: Any
    tokenizer: Any
    context_window: int | None
    generator: Any  # mlx-lm's BatchGenerator
    sampler: Any  # the default sampler (the config's settings)
    stream: Any
    eos: frozenset[int]
    solo_allowed: bool  # a lone sequence can be handed to the batch
    prompt_cache: PromptCache
    group: Any  # the mx.distributed group when sharded, else None
    admission: Admission


def load(
    model_name: str, sampling: SamplingSettings, max_batch_size: int, prompt_cache_bytes: int,
    kv_cache_bytes: int | None, sharding: str | None, on_download: Callable[[int, int], None] | None, fault: Faults,
) -> Loaded:  # fmt: skip
    """Load ``model_name`` (a folder, or a Hub name fetched first) and prepare it for serving."""
    if fault.active(faults.INTERNAL):
        raise faults.injected(faults.INTERNAL)
    while fault.active(faults.LOAD_STALL):
        time.sleep(1)
    try:
        import mlx.core as mx
    except ImportError as exc:  # Linux without the cpu or cuda extra: mlx has no backend
        raise ModelLoadError(
            f"MLX has no backend here ({exc}): install llm-server[cpu], or llm-server[cuda] for an NVIDIA GPU"
        ) from exc
    from mlx_lm import load as load_model
    from mlx_lm.generate import BatchGenerator
    from mlx_lm.models.cache import can_trim_prompt_cache, make_prompt_cache
    from mlx_lm.sample_utils import make_sampler
    from mlx_lm.utils import sharded_load

    started = time.monotonic()
    group = None
    try:
        path = model_name
        if not is_local(path):
            path = str(fetch(path, on_download or (lambda done, total: None)))
        if sharding is None:
            model, tokenizer, config = load_model(path, return_config=True)
        else:
            group = _join_group()
            pipeline = group if sharding == "pipeline" else None
            tensor = group if sharding == "tensor" else None
            folder = Path(path).expanduser()
            # Pipeline mode needs a weight index, which a one-file model lacks (``weights``).
            with indexed_folder(folder) if pipeline else contextlib.nullcontext(folder) as loaded:
                model, tokenizer, config = sharded_load(str(loaded), pipeline, tensor, return_config=True)
            # The same random state on every rank, so that sampling agrees (mlx_lm.server).
            seed = mx.distributed.all_sum(mx.random.state[0], group=group).view(mx.uint64).item()
            mx.random.seed(seed)
            prompt_cache_bytes = 0  # eviction by bytes would differ between the ranks' shards
    except Exception as exc:
        raise ModelLoadError(f"cannot load model {model_name!r}: {type(exc).__name__}: {exc}") from exc
    try:
        if fault.active(faults.PREPARE):
            raise faults.injected(faults.PREPARE)
        context_window = _context_window(config)
        sampler = make_sampler(
            temp=sampling.temperature,
            top_p=sampling.top_p,
            min_p=sampling.min_p,
            min_tokens_to_keep=sampling.min_tokens_to_keep,
        )
        stream = mx.default_stream(mx.default_device())
        eos = frozenset(tokenizer.eos_token_ids)
        # A lone sequence can be handed to the batch only if its cache can drop its last token.
        solo_allowed = can_trim_prompt_cache(make_prompt_cache(model))
        generator = BatchGenerator(
            model,
            stop_tokens=[[token] for token in sorted(eos)],
            sampler=sampler,
            completion_batch_size=max_batch_size,
            prefill_batch_size=min(max_batch_size, 8),
            stream=stream,
        )
        prompt_cache = PromptCache(prompt_cache_bytes)
        admission = _admission(model, group, max_batch_size, prompt_cache_bytes, kv_cache_bytes)
    except Exception as exc:
        raise ModelLoadError(f"cannot prepare model {model_name!r}: {type(exc).__name__}: {exc}") from exc
    log.info(
        "model %s loaded in %.1f s (context window %s, device %s)",
        model_name,
        time.monotonic() - started,
        context_window,
        mx.default_device(),
    )
    return Loaded(
        model, tokenizer, context_window, generator, sampler, stream, eos, solo_allowed, prompt_cache, group, admission
    )


def _admission(
    model: Any, group: Any, max_batch_size: int, prompt_cache_bytes: int, kv_cache_bytes: int | None
) -> Admission:
    """Admission by KV memory (``admission``): the budget configured or derived from the device.
    In a distributed group by count only: each rank holds a different shard, so budgets measured
    per rank would disagree about who joins, and the ranks would fall out of step."""
    if group is not None:
        return Admission(None, 1, max_batch_size)
    from mlx.utils import tree_flatten

    try:
        per_token = measure_bytes_per_token(model)
    except Exception as exc:  # noqa: BLE001 - a model whose forward wants more than token ids
        log.warning("cannot measure the model's KV cache (%s: %s): admission by max_batch_size only",
                    type(exc).__name__, exc)  # fmt: skip
        return Admission(None, 1, max_batch_size)
    if kv_cache_bytes is None:
        weights = sum(value.nbytes for _, value in tree_flatten(model.parameters()))
        kv_cache_bytes, source = default_budget(weights, prompt_cache_bytes)
    else:
        source = "kv_cache_mb"
    log.info("KV cache budget %.1f MB (%s), %d bytes per token: at most %d sequences of 4,096 tokens at once",
             kv_cache_bytes / 2**20, source, per_token, kv_cache_bytes // ((4096 + KV_STEP) * per_token))  # fmt: skip
    return Admission(kv_cache_bytes, per_token, max_batch_size)


def _context_window(config: dict[str, Any]) -> int | None:
    """The longest sequence the model was built for, if its config says."""
    for source in (config, config.get("text_config") or {}):
        for key in ("max_position_embeddings", "max_sequence_length", "n_positions", "seq_length"):
            value = source.get(key)
            if isinstance(value, int) and value > 0:
                return value
    return None


_JOIN_S = 300.0  # how long a rank keeps trying to reach the others before the start-up fails


def _join_group() -> Any:
    """``mx.distributed.init()``, tried again while a peer is not listening yet.

    MLX's ring backend gives up on a peer that does not accept within ~31 s ("Couldn't connect
    (error: 111)"). The ranks start at different moments: rank 0 starts the MCP servers before
    the model (up to ``mcp_startup_timeout_s``), and ranks started through ssh on a loaded machine
    were measured 18 s apart, so a follower could give up on a leader that was still coming. A
    failed init leaves no group behind, and a second one joins once the peer listens (measured:
    a rank started 25 s after its peer joined on the peer's second try).
    """
    import mlx.core as mx

    deadline = time.monotonic() + _JOIN_S
    while True:
        try:
            return mx.distributed.init()
        except RuntimeError as exc:
            if "Couldn't connect" not in str(exc) or time.monotonic() > deadline:
                raise
            log.info("the group's other ranks are not listening yet (%s): trying again", exc)
