"""Tests for the tiny-model factory other tests build on (tests/tinymodel.py)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a missing folder must never turn into a hub download
sys.path.insert(0, str(Path(__file__).resolve().parent))  # `tinymodel` without a conftest

import tinymodel as tm  # noqa: E402

SYSTEM = {"role": "system", "content": "You are a helpful assistant."}
ADD_TOOL = tm.ADD_TOOL
ADD_CALL = {"type": "function", "id": "call_0", "function": {"name": "add", "arguments": {"a": 2, "b": 3}}}

CONVERSATIONS = [
    tm.Conversation(
        [
            SYSTEM,
            {"role": "user", "content": "What is the capital of France?"},
            {"role": "assistant", "content": "The capital of France is Paris."},
        ]
    ),
    tm.Conversation(
        [
            SYSTEM,
            {"role": "user", "content": "What is 2 + 3?"},
            {"role": "assistant", "content": "", "tool_calls": [ADD_CALL]},
            {"role": "tool", "tool_call_id": "call_0", "name": "add", "content": "5"},
            {"role": "assistant", "content": "2 + 3 = 5."},
        ],
        [ADD_TOOL],
    ),
    tm.Conversation(
        [
            SYSTEM,
            {"role": "user", "content": "Say hello in Japanese."},
            {"role": "assistant", "content": "こんにちは 👋"},
        ],
        [ADD_TOOL],
    ),
]

UNICODE_SAMPLES = [
    "plain ASCII, with punctuation: {\"a\": [1, 2.5e-3]}\n\ttab",
    "emoji 😀🎉 👍🏽 family 👨‍👩‍👧 flag 🇯🇵 heart ❤️",
    "中文 日本語のテキスト 한국어",
    "Ünïcödé café — “quotes” ½ € \u00a0nbsp",
    "zero width \u200b joiner \u200d and RTL עברית عربي",
    "astral 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𓀀 and control \x01\x7f",
    "<|im_end|> inside text and <tool_call> markers",
]


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tm.write_tiny_model(tmp_path_factory.mktemp("tiny-base") / "model", seed=1)


@pytest.fixture(scope="module")
def base_model(base_dir: Path) -> tuple[Any, Any]:
    import mlx_lm

    return mlx_lm.load(str(base_dir))


@pytest.fixture(scope="module")
def trained_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tm.cached_trained_model(tmp_path_factory.mktemp("tiny-cache"), CONVERSATIONS, max_steps=200)


def test_untrained_model_loads_with_qwen_tool_calling(base_dir: Path, base_model: tuple[Any, Any]) -> None:
    _, tokenizer = base_model
    config = json.loads((base_dir / "config.json").read_text())
    im_end = tokenizer.convert_tokens_to_ids(tm.IM_END)
    assert type(tokenizer._tokenizer).__name__ == "Qwen2Tokenizer"
    assert tokenizer.has_tool_calling
    assert tokenizer.tool_call_start == "<tool_call>" and tokenizer.tool_call_end == "</tool_call>"
    assert tokenizer.tool_parser('{"name": "add", "arguments": {"a": 1}}') == {"name": "add", "arguments": {"a": 1}}
    assert tokenizer.eos_token == tm.IM_END
    assert set(tokenizer.eos_token_ids) == {im_end} == {config["eos_token_id"]}
    assert config["vocab_size"] == len(tokenizer._tokenizer)


def test_added_tokens_are_single_ids(base_model: tuple[Any, Any]) -> None:
    _, tokenizer = base_model
    for token in tm.ADDED_TOKENS:
        assert len(tokenizer.encode(token, add_special_tokens=False)) == 1, token
    assert tokenizer.decode(tokenizer.encode("<tool_call>x</tool_call>", add_special_tokens=False)) == (
        "<tool_call>x</tool_call>"
    )


@pytest.mark.parametrize("text", UNICODE_SAMPLES)
def test_tokenizer_round_trips_unicode_and_matches_tokenizers(base_dir: Path, base_model: tuple[Any, Any], text: str) -> None:
    from tokenizers import Tokenizer

    _, tokenizer = base_model
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids) == text
    assert Tokenizer.from_file(str(base_dir / "tokenizer.json")).encode(text).ids == ids


def test_chat_template_is_qwen25(base_model: tuple[Any, Any]) -> None:
    _, tokenizer = base_model
    conv = CONVERSATIONS[1]
    text = tokenizer.decode(tm.render_ids(tokenizer, conv.messages, conv.tools))
    assert text == tm.render_text(conv.messages, conv.tools)
    assert "\n<tools>\n" + json.dumps(ADD_TOOL, ensure_ascii=False) + "\n</tools>\n" in text
    assert '<|im_start|>assistant\n<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3}}\n</tool_call><|im_end|>\n' in text
    assert "<|im_start|>user\n<tool_response>\n5\n</tool_response><|im_end|>\n" in text
    prompt = tokenizer.decode(tm.render_ids(tokenizer, CONVERSATIONS[0].messages[:2], None, add_generation_prompt=True))
    assert prompt.endswith("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")


def test_untrained_model_generates_for_unicode_prompt(base_model: tuple[Any, Any]) -> None:
    import mlx_lm

    model, tokenizer = base_model
    messages = [{"role": "user", "content": "こんにちは 🌍 — naïve?"}]
    prompt = tm.render_ids(tokenizer, messages, None, add_generation_prompt=True)
    ids, _ = tm.greedy_ids(model, tokenizer, prompt, max_tokens=8)
    assert len(ids) <= 8 and isinstance(tokenizer.decode(ids), str)  # random weights may stop at once
    assert isinstance(mlx_lm.generate(model, tokenizer, prompt=prompt, max_tokens=8), str)


def test_trained_model_replays_every_turn_after_fresh_load(trained_dir: Path) -> None:
    import mlx_lm

    model, tokenizer = mlx_lm.load(str(trained_dir))
    for conv in CONVERSATIONS:
        assert _replay(model, tokenizer, conv) == [m for m in conv.messages if m["role"] == "assistant"]


def test_trained_tool_turn_parses_to_the_call(trained_dir: Path) -> None:
    import mlx_lm

    model, tokenizer = mlx_lm.load(str(trained_dir))
    conv = CONVERSATIONS[1]
    text = tm.greedy_reply(model, tokenizer, conv.messages[:2], conv.tools)
    assert text == '<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3}}\n</tool_call>'
    inner = text[len(tokenizer.tool_call_start) : -len(tokenizer.tool_call_end)]
    assert tokenizer.tool_parser(inner, conv.tools) == {"name": "add", "arguments": {"a": 2, "b": 3}}


def test_cache_reuses_a_built_model(tmp_path: Path, trained_dir: Path) -> None:
    built: list[Path] = []

    def builder(out: Path) -> Path:
        built.append(out)
        return tm.write_tiny_model(out)

    first = tm.cached_model_dir(tmp_path, {"case": 1}, builder)
    again = tm.cached_model_dir(tmp_path, {"case": 1}, builder)
    other = tm.cached_model_dir(tmp_path, {"case": 2}, builder)
    assert first == again != other and len(built) == 2
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    cached = tm.cached_trained_model(trained_dir.parent, CONVERSATIONS, max_steps=200)
    assert cached == trained_dir  # same inputs: no second training


@pytest.mark.parametrize(
    "conv",
    [
        tm.Conversation([SYSTEM, {"role": "user", "content": "hi"}]),
        # An unstripped assistant turn before the last one (only a final answer is returned verbatim
        # and may be any text).
        tm.Conversation([{"role": "user", "content": "hi"}, {"role": "assistant", "content": " hi "},
                         {"role": "user", "content": "again"}, {"role": "assistant", "content": "hi"}]),
    ],
)
def test_training_rejects_transcripts_the_daemon_cannot_produce(tmp_path: Path, conv: tm.Conversation) -> None:
    with pytest.raises(ValueError):
        tm.train_tiny_model(tmp_path, [conv])


def _replay(model, tokenizer, conv: tm.Conversation) -> list[dict[str, Any]]:
    """Drive the conversation like the daemon: generate each assistant turn, feed back tool results."""
    messages: list[dict[str, Any]] = []
    replies = []
    for message in conv.messages:
        if message["role"] != "assistant":
            messages.append(message)
            continue
        reply = tm.parse_reply(tokenizer, tm.greedy_reply(model, tokenizer, messages, conv.tools), conv.tools)
        messages.append(reply)
        replies.append(_as_expected(reply, message))
    return replies


def _as_expected(reply: dict[str, Any], expected: dict[str, Any]) -> dict[str, Any]:
    """Drop what the daemon invents (call ids, empty tool_calls) to compare with the script."""
    out: dict[str, Any] = {"role": "assistant", "content": reply["content"]}
    if reply["tool_calls"]:
        ids = [c["id"] for c in expected.get("tool_calls", [])]
        out["tool_calls"] = [dict(c, id=i) for c, i in zip(reply["tool_calls"], ids + [None] * len(reply["tool_calls"]))]
    return out
