"""Tiny Qwen2-shaped MLX models for tests.

Why: tests need a real model folder that `mlx_lm.load` accepts (same tokenizer
class, chat template and tool-call parser as Qwen2.5-Instruct), builds in about
a second, and -- when trained -- answers scripted conversations exactly, so the
daemon's tool-calling loop can be tested end to end without downloading
anything.

The contract mirrors the daemon: every generation step renders
``tokenizer.apply_chat_template(messages_so_far, tools=tools or None,
add_generation_prompt=True)`` and generates greedily until ``<|im_end|>``.
Training supervises exactly the tokens that such a step must produce.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Bump when the produced files or the training recipe change on purpose (the
# cache key also hashes this file's source, so edits invalidate it anyway).
CACHE_VERSION = 1

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
ENDOFTEXT = "<|endoftext|>"
TOOL_CALL_START = "<tool_call>"
TOOL_CALL_END = "</tool_call>"
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END)  # control tokens, skipped on decode
TOOL_TOKENS = (TOOL_CALL_START, TOOL_CALL_END)  # added but not special, as in Qwen2.5
ADDED_TOKENS = SPECIAL_TOKENS + TOOL_TOKENS

# transformers 5.x rebuilds exactly this pipeline for Qwen2Tokenizer
# (transformers/models/qwen2/tokenization_qwen2.py); training with anything else
# makes `tokenizers` and the loaded tokenizer disagree on ids.
QWEN2_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"""
    r""" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# The chat template shipped in Qwen2.5-*-Instruct tokenizer_config.json.
QWEN25_CHAT_TEMPLATE = (
    "{%- if tools %}\n"
    "    {{- '<|im_start|>system\\n' }}\n"
    "    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- messages[0]['content'] }}\n"
    "    {%- else %}\n"
    "        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}\n"
    "    {%- endif %}\n"
    '    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.'
    '\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}\n'
    "    {%- for tool in tools %}\n"
    '        {{- "\\n" }}\n'
    "        {{- tool | tojson }}\n"
    "    {%- endfor %}\n"
    '    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and'
    " arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\\"name\\\":"
    ' <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}\n'
    "{%- else %}\n"
    "    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n"
    "    {%- else %}\n"
    "        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful"
    " assistant.<|im_end|>\\n' }}\n"
    "    {%- endif %}\n"
    "{%- endif %}\n"
    "{%- for message in messages %}\n"
    '    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or'
    ' (message.role == "assistant" and not message.tool_calls) %}\n'
    "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n"
    '    {%- elif message.role == "assistant" %}\n'
    "        {{- '<|im_start|>' + message.role }}\n"
    "        {%- if message.content %}\n"
    "            {{- '\\n' + message.content }}\n"
    "        {%- endif %}\n"
    "        {%- for tool_call in message.tool_calls %}\n"
    "            {%- if tool_call.function is defined %}\n"
    "                {%- set tool_call = tool_call.function %}\n"
    "            {%- endif %}\n"
    "            {{- '\\n<tool_call>\\n{\"name\": \"' }}\n"
    "            {{- tool_call.name }}\n"
    "            {{- '\", \"arguments\": ' }}\n"
    "            {{- tool_call.arguments | tojson }}\n"
    "            {{- '}\\n</tool_call>' }}\n"
    "        {%- endfor %}\n"
    "        {{- '<|im_end|>\\n' }}\n"
    '    {%- elif message.role == "tool" %}\n'
    '        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}\n'
    "            {{- '<|im_start|>user' }}\n"
    "        {%- endif %}\n"
    "        {{- '\\n<tool_response>\\n' }}\n"
    "        {{- message.content }}\n"
    "        {{- '\\n</tool_response>' }}\n"
    '        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}\n'
    "            {{- '<|im_end|>\\n' }}\n"
    "        {%- endif %}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|im_start|>assistant\\n' }}\n"
    "{%- endif %}\n"
)

# A little of everything a test might send, so common words get merged tokens.
BASE_CORPUS: tuple[str, ...] = (
    "You are a helpful assistant.",
    "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.",
    "Hello! How can I help you today?",
    "What is the capital of France? The capital of France is Paris.",
    "The quick brown fox jumps over the lazy dog. THE QUICK BROWN FOX!",
    "Please read the file, list the directory and tell me the current time.",
    "I'm sure it's fine; they've said we'll see what you'd do.",
    "0 1 2 3 4 5 6 7 8 9 10 42 100 2 + 3 = 5. 3.14159 -7 1e-3 2026-11-26T17:39:00Z",
    'def add(a: int, b: int) -> int:\n    return a + b\n',
    '{"type": "function", "function": {"name": "add", "description": "Add two numbers.", '
    '"parameters": {"type": "object", "properties": {"a": {"type": "integer"}, '
    '"b": {"type": "number"}, "path": {"type": "string"}}, "required": ["a", "b"]}}}',
    '{"name": "get_current_time", "arguments": {"timezone": "Europe/Paris"}}',
    "Error: the tool returned an error. Try again later.\r\n",
    "tabs\tand  double  spaces   and trailing newline\n\n",
    "Ünïcödé façade naïve café — “quotes” ‘single’ … ½ € £ ¥",
    "日本語のテキストです。中文文本。한국어 텍스트.",
    "Emoji: 😀 🎉 👍🏽 👨‍👩‍👧 🇫🇷 ❤️",
    "Русский текст и ελληνικά και עברית وعربي",
)

# A sample transcript so the template's fixed text is in the tokenizer corpus.
ADD_TOOL = {
    "type": "function",
    "function": {
        "name": "add",
        "description": "Add two integers.",
        "parameters": {
            "type": "object",
            "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
            "required": ["a", "b"],
        },
    },
}
_SAMPLE_TOOLS = [ADD_TOOL]
_SAMPLE_MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is 2 + 3?"},
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {"type": "function", "id": "call_0", "function": {"name": "add", "arguments": {"a": 2, "b": 3}}}
        ],
    },
    {"role": "tool", "tool_call_id": "call_0", "name": "add", "content": "5"},
    {"role": "assistant", "content": "2 + 3 = 5."},
]


@dataclass(frozen=True)
class Conversation:
    """One scripted chat: OpenAI-style messages ending with an assistant turn."""

    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None = None


@dataclass
class _Example:
    """Token ids of one conversation plus which next-token targets to supervise."""

    ids: list[int]
    targets: list[int] = field(default_factory=list)  # positions p: predict ids[p] from ids[:p]


# --------------------------------------------------------------------------- files


def write_tiny_model(
    out_dir: Path,
    *,
    seed: int = 0,
    extra_corpus: Sequence[str] = (),
    max_position_embeddings: int = 16384,
    vocab_size: int = 4096,
    hidden_size: int = 64,
    num_hidden_layers: int = 2,
    intermediate_size: int = 128,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
) -> Path:
    """Write an untrained, random-weight Qwen2 folder that `mlx_lm.load` accepts.

    The BPE is trained on a built-in corpus, the chat template's fixed text and
    `extra_corpus`; the final vocabulary is usually 0.5k-4k tokens.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = _train_tokenizer(_tokenizer_corpus(extra_corpus), vocab_size)
    tokenizer.save(str(out_dir / "tokenizer.json"))
    ids = {t: tokenizer.token_to_id(t) for t in ADDED_TOKENS}
    _write_json(out_dir / "tokenizer_config.json", _tokenizer_config(ids, max_position_embeddings))
    config = _model_config(
        vocab_size=tokenizer.get_vocab_size(with_added_tokens=True),
        token_ids=ids,
        max_position_embeddings=max_position_embeddings,
        hidden_size=hidden_size,
        num_hidden_layers=num_hidden_layers,
        intermediate_size=intermediate_size,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
    )
    _write_json(out_dir / "config.json", config)
    _save_weights(_random_model(config, seed), out_dir)
    return out_dir


def _write_json(path: Path, data: object) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _tokenizer_corpus(extra: Iterable[str]) -> list[str]:
    """Built-in text, the template's fixed text and the caller's text."""
    sample = render_text(_SAMPLE_MESSAGES, _SAMPLE_TOOLS, add_generation_prompt=True)
    plain = render_text(_SAMPLE_MESSAGES[:2], None, add_generation_prompt=True)
    return [*BASE_CORPUS, sample, plain, *extra]


def _split_added_tokens(texts: Iterable[str]) -> Iterable[str]:
    """Drop added-token strings so BPE does not waste merges on their pieces."""
    pattern = re.compile("|".join(re.escape(t) for t in ADDED_TOKENS))
    for text in texts:
        yield from (piece for piece in pattern.split(text) if piece)


def _train_tokenizer(corpus: Sequence[str], vocab_size: int):
    """Byte-level BPE with the exact normalizer/pre-tokenizer of Qwen2Tokenizer."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tokenizer = Tokenizer(
        models.BPE(
            unk_token=None,
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
            byte_fallback=False,
        )
    )
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    tokenizer.train_from_iterator(_split_added_tokens(corpus), trainer=trainer)
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in TOOL_TOKENS])
    return tokenizer


def _tokenizer_config(ids: dict[str, int], max_len: int) -> dict[str, Any]:
    """Qwen2.5-Instruct's tokenizer_config.json, with this vocab's added-token ids."""
    decoder = {
        str(ids[t]): {
            "content": t,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": t in SPECIAL_TOKENS,
        }
        for t in ADDED_TOKENS
    }
    return {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": decoder,
        "additional_special_tokens": [IM_START, IM_END],
        "bos_token": None,
        "chat_template": QWEN25_CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": IM_END,
        "errors": "replace",
        "model_max_length": max_len,
        "pad_token": ENDOFTEXT,
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }


def _model_config(
    *,
    vocab_size: int,
    token_ids: dict[str, int],
    max_position_embeddings: int,
    hidden_size: int,
    num_hidden_layers: int,
    intermediate_size: int,
    num_attention_heads: int,
    num_key_value_heads: int,
) -> dict[str, Any]:
    """A Qwen2.5-style config.json scaled down to test size."""
    return {
        "architectures": ["Qwen2ForCausalLM"],
        "attention_dropout": 0.0,
        "bos_token_id": token_ids[ENDOFTEXT],
        "eos_token_id": token_ids[IM_END],
        "hidden_act": "silu",
        "hidden_size": hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": intermediate_size,
        "max_position_embeddings": max_position_embeddings,
        "max_window_layers": num_hidden_layers,
        "model_type": "qwen2",
        "num_attention_heads": num_attention_heads,
        "num_hidden_layers": num_hidden_layers,
        "num_key_value_heads": num_key_value_heads,
        "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0,
        "sliding_window": max_position_embeddings,
        "tie_word_embeddings": True,
        "torch_dtype": "float32",
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": vocab_size,
    }


def _random_model(config: dict[str, Any], seed: int):
    """mlx_lm's own Qwen2 module, so parameter names match what load expects."""
    import mlx.core as mx
    from mlx_lm.models import qwen2

    mx.random.seed(seed)
    model = qwen2.Model(qwen2.ModelArgs.from_dict(config))
    mx.eval(model.parameters())
    return model


def _save_weights(model, out_dir: Path) -> None:
    import mlx.core as mx
    from mlx.utils import tree_flatten

    weights = dict(tree_flatten(model.parameters()))
    mx.save_safetensors(str(Path(out_dir) / "model.safetensors"), weights, metadata={"format": "mlx"})


def never_stop(folder: Path) -> None:
    """Zero the end-of-turn embedding row: with tied embeddings its logit is always 0 while the
    best other logit is positive, so greedy decoding never stops before ``max_tokens``."""
    import mlx.core as mx

    eos = json.loads((folder / "config.json").read_text())["eos_token_id"]
    weights_file = next(folder.glob("*.safetensors"))
    weights = mx.load(str(weights_file))
    (name,) = [k for k in weights if k.endswith("embed_tokens.weight")]
    table = weights[name]
    weights[name] = mx.where((mx.arange(table.shape[0]) == eos)[:, None], 0.0, table).astype(table.dtype)
    mx.save_safetensors(str(weights_file), weights)


# --------------------------------------------------------------------------- rendering


def render_text(
    messages: Sequence[dict[str, Any]],
    tools: Sequence[dict[str, Any]] | None,
    *,
    add_generation_prompt: bool = False,
) -> str:
    """Render the chat template without a tokenizer (used to build the BPE corpus)."""
    return _jinja_template().render(
        messages=list(messages), tools=list(tools) if tools else None, add_generation_prompt=add_generation_prompt
    )


_TEMPLATE_CACHE: list[Any] = []


def _jinja_template():
    """Compile the template the way transformers does (same tojson)."""
    if not _TEMPLATE_CACHE:
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        env.filters["tojson"] = lambda x, indent=None, separators=None, sort_keys=False: json.dumps(
            x, ensure_ascii=False, indent=indent, separators=separators, sort_keys=sort_keys
        )
        _TEMPLATE_CACHE.append(env.from_string(QWEN25_CHAT_TEMPLATE))
    return _TEMPLATE_CACHE[0]


def render_ids(
    tokenizer,
    messages: Sequence[dict[str, Any]],
    tools: Sequence[dict[str, Any]] | None,
    *,
    add_generation_prompt: bool = False,
) -> list[int]:
    """Token ids exactly as the daemon renders them (mlx_lm TokenizerWrapper)."""
    ids = tokenizer.apply_chat_template(
        list(messages), tools=list(tools) if tools else None, add_generation_prompt=add_generation_prompt
    )
    return [int(i) for i in ids]


def greedy_ids(
    model, tokenizer, prompt: Sequence[int], max_tokens: int = 256, prompt_cache: list[Any] | None = None
) -> tuple[list[int], bool]:
    """Greedy tokens after `prompt` until EOS (excluded); also whether EOS came.

    With `prompt_cache` (already holding the prompt's first tokens) pass only
    the remaining prompt tokens, as the daemon does when it reuses a prefix.
    """
    import mlx.core as mx
    from mlx_lm.generate import generate_step

    eos = set(tokenizer.eos_token_ids)
    out: list[int] = []
    steps = generate_step(mx.array(list(prompt)), model, max_tokens=max_tokens, prompt_cache=prompt_cache)
    for token, _ in steps:
        if token in eos:
            return out, True
        out.append(int(token))
    return out, False


def greedy_reply(
    model,
    tokenizer,
    messages: Sequence[dict[str, Any]],
    tools: Sequence[dict[str, Any]] | None = None,
    max_tokens: int = 256,
) -> str:
    """The assistant text the daemon would decode for the next turn."""
    prompt = render_ids(tokenizer, messages, tools, add_generation_prompt=True)
    ids, _ = greedy_ids(model, tokenizer, prompt, max_tokens)
    return tokenizer.decode(ids)


def parse_reply(tokenizer, text: str, tools: Sequence[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Turn generated text into the assistant message the daemon appends."""
    start, end = re.escape(tokenizer.tool_call_start), re.escape(tokenizer.tool_call_end)
    pattern = re.compile(f"{start}(.*?){end}", re.DOTALL)
    calls = [tokenizer.tool_parser(m.group(1), tools) for m in pattern.finditer(text)]
    content = pattern.sub("", text).strip()
    tool_calls = [
        {"type": "function", "id": f"call_{i}", "function": {"name": c["name"], "arguments": c["arguments"]}}
        for i, c in enumerate(calls)
    ]
    return {"role": "assistant", "content": content, "tool_calls": tool_calls}


# --------------------------------------------------------------------------- training


def train_tiny_model(
    out_dir: Path,
    conversations: Sequence[Conversation],
    *,
    seed: int = 0,
    max_steps: int = 400,
    extra_corpus: Sequence[str] = (),
    learning_rate: float = 1e-3,
    batch_tokens: int = 4096,
    max_sequence_tokens: int = 8192,
    min_margin: float = 1.0,
    prefix_refresh: int = 4,
    log: Callable[[str], None] | None = None,
    **model_kwargs: Any,
) -> Path:
    """Write a model that greedily reproduces every assistant turn, or raise.

    AdamW at a constant `learning_rate`: 1e-3 converged in fewer steps than
    3e-3 here, and 3e-3 oscillated for long tool-schema prompts.
    `min_margin` (logit gap of each target over the runner-up) keeps the
    memorised answers stable under the KV-cache and batched decoding paths.
    The long shared prefix (system prompt + tool schemas) is run without
    gradient and only every `prefix_refresh` steps: attention over thousands
    of tokens is what costs time on this CPU backend.
    """
    import mlx_lm

    _validate(conversations)
    corpus = [*(render_text(c.messages, c.tools) for c in conversations), *extra_corpus]
    write_tiny_model(out_dir, seed=seed, extra_corpus=corpus, **model_kwargs)
    model, tokenizer = mlx_lm.load(str(out_dir))
    examples = [_encode(tokenizer, c, max_sequence_tokens) for c in conversations]
    trainer = _Trainer(model, _batches(examples, batch_tokens), lr=learning_rate, seed=seed,
                       prefix_refresh=prefix_refresh, log=log)
    while True:  # a greedy miss (numerical near-tie) means: demand a wider margin
        trainer.fit(max_steps, min_margin)
        _save_weights(model, Path(out_dir))
        fresh_model, fresh_tokenizer = mlx_lm.load(str(out_dir))
        bad = _mismatches(fresh_model, fresh_tokenizer, conversations)
        if not bad:
            _write_json(Path(out_dir) / "tinymodel_training.json", trainer.summary(examples))
            return Path(out_dir)
        if trainer.steps >= max_steps:
            raise TrainingError(f"fresh load does not reproduce {len(bad)} assistant turn(s): {bad[:3]}")
        min_margin *= 2


class TrainingError(RuntimeError):
    """The tiny model did not memorise the conversations."""


def _validate(conversations: Sequence[Conversation]) -> None:
    """Reject transcripts the daemon could never produce (so training can't match)."""
    if not conversations:
        raise ValueError("need at least one conversation")
    for n, conv in enumerate(conversations):
        if not conv.messages or conv.messages[-1].get("role") != "assistant":
            raise ValueError(f"conversation {n} must end with an assistant message")
        for msg in conv.messages[:-1]:  # a final answer may be any text (the OpenAI endpoint returns it verbatim)
            content = msg.get("content")
            if msg.get("role") == "assistant" and content != (content or "").strip():
                raise ValueError(f"conversation {n}: assistant content must be stripped: {content!r}")


def _assistant_spans(tokenizer, conv: Conversation) -> tuple[list[int], list[tuple[int, int]]]:
    """Full ids plus [start, end] (EOS included) of each assistant turn's tokens."""
    eos = set(tokenizer.eos_token_ids)
    full = render_ids(tokenizer, conv.messages, conv.tools)
    spans = []
    for i, msg in enumerate(conv.messages):
        if msg.get("role") != "assistant":
            continue
        prefix = render_ids(tokenizer, conv.messages[:i], conv.tools, add_generation_prompt=True)
        upto = render_ids(tokenizer, conv.messages[: i + 1], conv.tools)
        if upto[: len(prefix)] != prefix or full[: len(upto)] != upto:
            raise ValueError(f"message {i}: generation prompt ids are not a prefix of the rendered turn")
        end = next((p for p in range(len(prefix), len(upto)) if upto[p] in eos), None)
        if end is None:
            raise ValueError(f"message {i}: no EOS after the assistant turn")
        spans.append((len(prefix), end))
    return full, spans


def _encode(tokenizer, conv: Conversation, max_tokens: int) -> _Example:
    full, spans = _assistant_spans(tokenizer, conv)
    if len(full) > max_tokens:
        raise ValueError(f"conversation renders to {len(full)} tokens (> {max_tokens})")
    return _Example(ids=full, targets=[p for start, end in spans for p in range(start, end + 1)])


def _header_length(ids: Sequence[int], eos: int) -> int:
    """Length of the first turn (system prompt + tools), shared by same-setup chats."""
    return ids.index(eos) + 1 if eos in ids else 0


@dataclass
class _Batch:
    """Padded suffixes that all continue the same `prefix` ids."""

    prefix: tuple[int, ...]
    inputs: Any
    targets: Any
    mask: Any


def _batches(examples: Sequence[_Example], batch_tokens: int) -> list[_Batch]:
    """Group by shared header, then pack the rest under `batch_tokens` padded tokens.

    Only the header (system prompt + tool schemas) becomes the frozen prefix:
    user turns stay in the trained part so their keys and values get gradients.
    """
    by_header: dict[tuple[int, ...], list[_Example]] = {}
    for ex in examples:
        eos = ex.ids[ex.targets[-1]]  # every conversation ends with the EOS target
        by_header.setdefault(tuple(ex.ids[: _header_length(ex.ids, eos)]), []).append(ex)
    batches = []
    for header, group in by_header.items():
        chunk: list[_Example] = []
        for ex in sorted(group, key=lambda e: len(e.ids)):
            if chunk and (len(ex.ids) - len(header)) * (len(chunk) + 1) > batch_tokens:
                batches.append(_pad(chunk, header))
                chunk = []
            chunk.append(ex)
        batches.append(_pad(chunk, header))
    return batches


def _pad(group: Sequence[_Example], header: tuple[int, ...]) -> _Batch:
    import mlx.core as mx
    import numpy as np

    start = len(header)
    width = max(len(e.ids) for e in group) - 1 - start
    inputs = np.zeros((len(group), width), np.int32)
    targets = np.zeros((len(group), width), np.int32)
    mask = np.zeros((len(group), width), np.float32)
    for row, ex in enumerate(group):
        n = len(ex.ids) - 1 - start
        inputs[row, :n] = ex.ids[start:-1]
        targets[row, :n] = ex.ids[start + 1 :]
        mask[row, [p - 1 - start for p in ex.targets]] = 1.0
    return _Batch(header, mx.array(inputs), mx.array(targets), mx.array(mask))


class _FrozenPrefix:
    """Stand-in KV cache: records a prefix's keys/values, then serves them to a batch."""

    def __init__(self, keys: Any = None, values: Any = None) -> None:
        self.keys, self.values = keys, values
        self.offset = 0 if keys is None else keys.shape[2]

    def update_and_fetch(self, keys, values):
        import mlx.core as mx

        if self.keys is None:
            self.keys, self.values = keys, values
            return keys, values
        shape = (keys.shape[0], *self.keys.shape[1:])
        return (
            mx.concatenate([mx.broadcast_to(self.keys, shape), keys], axis=2),
            mx.concatenate([mx.broadcast_to(self.values, shape), values], axis=2),
        )

    def make_mask(self, n: int, return_array: bool = False, window_size: int | None = None):
        return "causal" if n > 1 else None


def _prefix_kv(model, prefix: Sequence[int]) -> list[tuple[Any, Any]] | None:
    """Keys/values of the prefix under the current weights (no gradient)."""
    import mlx.core as mx

    if not prefix:
        return None
    caches = [_FrozenPrefix() for _ in model.layers]
    model(mx.array(list(prefix))[None], cache=caches)
    kv = [(mx.stop_gradient(c.keys), mx.stop_gradient(c.values)) for c in caches]
    mx.eval(kv)
    return kv


def _loss(model, kv, inputs, targets, mask):
    """Masked cross-entropy; also wrong-token count and worst margin (no grad)."""
    import mlx.core as mx
    import mlx.nn as nn

    cache = [_FrozenPrefix(k, v) for k, v in kv] if kv else None
    logits = model(inputs, cache=cache).astype(mx.float32)
    loss = (nn.losses.cross_entropy(logits, targets, reduction="none") * mask).sum() / mask.sum()
    flat = mx.stop_gradient(logits)
    target_logit = mx.take_along_axis(flat, targets[..., None], axis=-1)[..., 0]
    top2 = mx.topk(flat, 2, axis=-1)  # unordered pair
    best, second = mx.max(top2, axis=-1), mx.min(top2, axis=-1)
    rival = mx.where(target_logit >= best, second, best)
    margin = mx.where(mask > 0, target_logit - rival, mx.inf)
    return loss, (margin <= 0).astype(mx.float32).sum(), margin.min()


class _Trainer:
    """AdamW at a constant lr over fixed batches; keeps its state across `fit` calls."""

    def __init__(self, model, batches: list[_Batch], *, lr: float, seed: int, prefix_refresh: int, log) -> None:
        import mlx.core as mx
        import mlx.nn as nn
        import mlx.optimizers as optim

        mx.random.seed(seed)
        self.model, self.batches, self.log = model, batches, log
        self.refresh = max(1, prefix_refresh)
        self.optimizer = optim.AdamW(learning_rate=lr)
        self.loss_and_grad = nn.value_and_grad(model, _loss)
        self.kv: dict[tuple[int, ...], Any] = {}
        self.steps = 0
        self.started = time.perf_counter()

    def _refresh_prefixes(self) -> None:
        self.kv = {b.prefix: _prefix_kv(self.model, b.prefix) for b in self.batches}

    def _epoch(self, train: bool) -> tuple[float, float, float]:
        """One pass over all batches; (loss, wrong targets, worst margin) before updates."""
        import mlx.core as mx

        total, wrong, worst = 0.0, 0.0, float("inf")
        for batch in self.batches:
            args = (self.model, self.kv[batch.prefix], batch.inputs, batch.targets, batch.mask)
            if train:
                (loss, n_wrong, margin), grads = self.loss_and_grad(*args)
                self.optimizer.update(self.model, grads)
                mx.eval(self.model.parameters(), self.optimizer.state, loss, n_wrong, margin)
            else:
                loss, n_wrong, margin = _loss(*args)
            total, wrong, worst = total + loss.item(), wrong + n_wrong.item(), min(worst, margin.item())
        return total / len(self.batches), wrong, worst

    def fit(self, max_steps: int, min_margin: float) -> None:
        """Train until every target wins by `min_margin` with freshly computed prefixes."""
        epoch = 0
        while self.steps < max_steps:
            if epoch % self.refresh == 0:
                self._refresh_prefixes()
            loss, wrong, worst = self._epoch(train=True)
            self.steps += 1
            epoch += 1
            self._log(f"step {self.steps}: loss {loss:.4f} wrong {int(wrong)} margin {worst:.2f}")
            if wrong == 0 and worst >= min_margin:
                self._refresh_prefixes()
                loss, wrong, worst = self._epoch(train=False)
                self._log(f"check: loss {loss:.4f} wrong {int(wrong)} margin {worst:.2f}")
                if wrong == 0 and worst >= min_margin:
                    return
        raise TrainingError(f"no exact reproduction after {self.steps} steps (passes over all batches)")

    def summary(self, examples: Sequence[_Example]) -> dict[str, Any]:
        """What the training took, kept next to the weights for whoever debugs a slow test."""
        return {
            "steps": self.steps,
            "seconds": round(time.perf_counter() - self.started, 2),
            "batches": len(self.batches),
            "sequence_tokens": [len(e.ids) for e in examples],
            "supervised_tokens": sum(len(e.targets) for e in examples),
        }

    def _log(self, text: str) -> None:
        if self.log:
            self.log(f"{text} ({time.perf_counter() - self.started:.1f}s)")


def _mismatches(model, tokenizer, conversations: Sequence[Conversation]) -> list[str]:
    """Assistant turns that greedy decoding of daemon-style prompts gets wrong.

    The shared first turn is prefilled once and copied per turn, like a
    prompt cache would, instead of prefilling thousands of schema tokens each time.
    """
    import copy

    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    eos = next(iter(tokenizer.eos_token_ids))
    headers: dict[tuple[int, ...], list[Any]] = {}
    bad = []
    for n, conv in enumerate(conversations):
        full, spans = _assistant_spans(tokenizer, conv)
        header = tuple(full[: _header_length(full, eos)])
        if header not in headers:
            headers[header] = make_prompt_cache(model)
            model(mx.array(list(header))[None], cache=headers[header])
            mx.eval([c.state for c in headers[header]])
        for start, end in spans:
            expected = full[start:end]
            got, hit_eos = greedy_ids(
                model, tokenizer, full[len(header) : start], len(expected) + 1, copy.deepcopy(headers[header])
            )
            if got != expected or not hit_eos:
                bad.append(f"conv {n} @ {start}: expected {tokenizer.decode(expected)!r}, got {tokenizer.decode(got)!r}")
    return bad


# --------------------------------------------------------------------------- cache


def cache_key(key_material: object) -> str:
    """Stable hash of the inputs, this module's source and the library versions."""
    import mlx.core as mx
    import mlx_lm
    import tokenizers
    import transformers

    payload = {
        "cache_version": CACHE_VERSION,
        "source": hashlib.sha256(Path(__file__).read_bytes()).hexdigest(),
        "versions": [mx.__version__, mlx_lm.__version__, tokenizers.__version__, transformers.__version__],
        "key": _jsonable(key_material),
    }
    blob = json.dumps(payload, sort_keys=True, ensure_ascii=False, default=repr)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:24]


def _jsonable(value: object) -> object:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return value


def cached_model_dir(cache_root: Path, key_material: object, builder: Callable[[Path], Path]) -> Path:
    """Reuse `builder`'s folder for identical inputs; build atomically otherwise.

    The folder is built under a temporary name and renamed into place, so
    concurrent sessions (xdist workers) never see a half-written model.
    """
    cache_root = Path(cache_root)
    cache_root.mkdir(parents=True, exist_ok=True)
    final = cache_root / f"tiny-{cache_key(key_material)}"
    if (final / "config.json").is_file():
        return final
    tmp = cache_root / f".building-{final.name}-{os.getpid()}-{time.monotonic_ns()}"
    try:
        builder(tmp)
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / "config.json").is_file():  # lost a race only if the winner finished
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def cached_trained_model(
    cache_root: Path, conversations: Sequence[Conversation], *, seed: int = 0, **kwargs: Any
) -> Path:
    """`train_tiny_model` behind `cached_model_dir` (the usual test entry point)."""
    settings = {k: v for k, v in kwargs.items() if k != "log"}
    key = {"kind": "trained", "conversations": conversations, "seed": seed, "kwargs": settings}
    return cached_model_dir(
        cache_root, key, lambda out: train_tiny_model(out, conversations, seed=seed, **kwargs)
    )
