"""A reasoning variant of the tiny test model: ``<think>`` and ``</think>`` in its vocabulary, and
a chat template whose generation prompt opens a thinking block, as Qwen3's and DeepSeek-R1's do.

mlx-lm then sees a model that thinks (``TokenizerWrapper.has_thinking``: both markers are single
tokens) and every answer starts in its reasoning. The two new embedding rows are zero (the
embeddings are tied), so greedy decoding never picks ``</think>``: everything the model writes
up to ``max_tokens`` is reasoning, which is what the dialects must show as thinking (or hide).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

THINK_START, THINK_END = "<think>", "</think>"


def write_thinking_model(tiny: Path, out_dir: Path) -> Path:
    import mlx.core as mx

    shutil.copytree(tiny, out_dir)
    config = json.loads((out_dir / "config.json").read_text())
    tokenizer = json.loads((out_dir / "tokenizer.json").read_text())
    tokenizer_config = json.loads((out_dir / "tokenizer_config.json").read_text())
    first = 1 + max([token["id"] for token in tokenizer["added_tokens"]] + list(tokenizer["model"]["vocab"].values()))
    for offset, content in enumerate((THINK_START, THINK_END)):
        token = {"id": first + offset, "content": content, "single_word": False, "lstrip": False, "rstrip": False,
                 "normalized": False, "special": False}  # fmt: skip
        tokenizer["added_tokens"].append(token)
        tokenizer_config["added_tokens_decoder"][str(first + offset)] = {k: v for k, v in token.items() if k != "id"}
    template = tokenizer_config["chat_template"]
    opening = "{{- '<|im_start|>assistant\\n' }}\n{%- endif %}\n"
    assert template.endswith(opening), "the tiny model's template changed"
    tokenizer_config["chat_template"] = template[: -len(opening)] + "{{- '<|im_start|>assistant\\n<think>\\n' }}\n{%- endif %}\n"
    weights_file = next(out_dir.glob("*.safetensors"))
    weights = mx.load(str(weights_file))
    (name,) = [k for k in weights if k.endswith("embed_tokens.weight")]
    table = weights[name]
    rows = first + 2 - table.shape[0]
    weights[name] = mx.concatenate([table, mx.zeros((rows, table.shape[1]), dtype=table.dtype)])
    mx.save_safetensors(str(weights_file), weights)
    config["vocab_size"] = first + 2
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    (out_dir / "tokenizer.json").write_text(json.dumps(tokenizer, ensure_ascii=False))
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    return out_dir
